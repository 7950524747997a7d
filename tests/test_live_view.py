"""The live training view's server side: the run history, the Stop route and the trainer pre-start setting.

The store is unit-tested on its own (nodes/live_view.py is loaded from its file: importing it as part of
the pack would run nodes/__init__.py, which imports ComfyUI). The routes are tested on a real server
training the tiny SD1.5 checkpoint, watched by a second browser-like websocket client.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dreambooth_test_support.comfyui import ComfyServer, PromptRejected
from dreambooth_test_support.training import copy_dog_photos

REPO_ROOT = Path(__file__).resolve().parents[1]
EVENT = "dreambooth.train"
CKPT = "tiny-sd15.safetensors"


def _load_live_view() -> ModuleType:
    name = "dreambooth_live_view_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "nodes" / "live_view.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


live_view = _load_live_view()


# --------------------------------------------------------------------------------------------- the store


def metrics(step: int, loss: float = 0.5) -> dict[str, Any]:
    return {"type": "metrics", "step": step, "loss": loss, "lr": 1e-4, "eta_s": 9.0, "ms_per_step": 300.0,
            "time": 1000.0 + step}


def test_loss_points_thin_to_an_even_stride_that_keeps_the_whole_range() -> None:
    record = live_view.RunRecord("2", "p", "dog")
    for step in range(1, 5 * live_view.MAX_POINTS + 2):
        record.add(metrics(step, loss=1.0 / step))
    points = [e for e in record.events() if e["type"] == "metrics"]
    assert len(points) <= live_view.MAX_POINTS + 1
    steps = [p["step"] for p in points]
    assert steps[0] <= record.stride and steps[-1] == 5 * live_view.MAX_POINTS + 1, "first and newest kept"
    assert {b - a for a, b in zip(steps[:-2], steps[1:-1], strict=True)} == {record.stride}, "evenly spaced"
    assert all(p["loss"] == 1.0 / p["step"] for p in points)
    # Older points are slim; the newest is the whole event, for the step line (it/s, eta).
    assert "lr" not in points[0] and points[-1]["ms_per_step"] == 300.0


def test_samples_progress_statuses_and_the_end_state_are_kept_for_replay() -> None:
    record = live_view.RunRecord("5:2", "p", "people/alice")
    record.add({"type": "hello", "pid": 42})
    for i in range(3):
        record.add({"type": "progress", "phase": "class_images", "step": i + 1, "total": 3})
    for i in range(live_view.MAX_STATUS + 5):
        record.add({"type": "status", "message": f"line {i}", "level": "info"})
    for step in (1, 2):
        record.add({"type": "progress", "phase": "train", "step": step, "total": 2})
        record.add(metrics(step))
        record.add({"type": "sample", "step": step, "index": 0, "prompt": "a dog", "url": f"/view?s={step}"})
    record.add({"type": "checkpoint", "step": 2})
    assert record.state == "running"
    record.add({"type": "done", "status": "stopped", "step": 2})
    assert record.state == "stopped"

    events = record.events()
    kinds = [e["type"] for e in events]
    assert kinds[0] == "hello" and kinds[-1] == "done" and kinds[-2] == "checkpoint"
    assert [e["step"] for e in events if e["type"] == "progress"] == [3, 2], "the last of each phase, in order"
    statuses = [e["message"] for e in events if e["type"] == "status"]
    assert len(statuses) == live_view.MAX_STATUS and statuses[-1] == f"line {live_view.MAX_STATUS + 4}"
    assert [e["url"] for e in events if e["type"] == "sample"] == ["/view?s=1", "/view?s=2"]
    json.dumps(events)  # what GET /dreambooth/runs sends

    reused = live_view.RunRecord("2", "q", "dog")
    reused.add({"type": "status", "message": "already holds this training", "reused": True})
    assert reused.state == "finished"
    failed = live_view.RunRecord("2", "r", "dog")
    failed.add({"type": "error", "kind": "data", "message": "bad photo"})
    assert failed.state == "error"


def test_stop_flags_reach_only_the_running_run_of_that_node_and_name() -> None:
    store = live_view.RunStore(max_runs=3)
    old = ("2", "p1", "dog")
    store.record(old, {"type": "status", "message": "replacing dog.safetensors"})  # then execute raised
    flag = store.attach(("2", "p2", "dog"))
    assert store.runs(with_events=False)[1]["state"] == "error", "a run that never reached its trainer ended"
    assert not store.request_stop("2", "cat") and not store.request_stop("3", "dog")
    assert not flag.is_set()
    assert store.request_stop("2", "dog") and flag.is_set()
    assert not store.request_stop("2", "dog"), "asked once; the driver is stopping it"
    store.detach(("2", "p2", "dog"), stopped=True)
    newest = store.runs()[0]
    assert (newest["prompt_id"], newest["state"], newest["stoppable"]) == ("p2", "stopped", False)

    for i in range(4):
        store.record(("7", f"x{i}", "cat"), {"type": "done", "status": "done", "step": 1})
    assert [r["prompt_id"] for r in store.runs()] == ["x3", "x2", "x1"], "the last few, newest first"


# --------------------------------------------------------------------------------------------- real server


def train_inputs(server: ComfyServer, folder: str, lora_name: str, steps: int, **overrides: Any) -> dict[str, Any]:
    """Dataset "1" -> Train "2"; every train input the node has, defaults where this test does not care."""
    info = server.object_info("DreamBoothTrain")["DreamBoothTrain"]["input"]
    wanted = {"ckpt_name": CKPT, "dataset": ["1", 0], "lora_name": lora_name, "steps": steps,
              "train_text_encoder": False, "rank": 4, "alpha": 4.0, "mixed_precision": "no",
              "checkpointing_steps": 0, "validation_prompts": "", "validation_steps": 0, "seed": 7} | overrides
    train: dict[str, Any] = {}
    for name, spec in info["required"].items():
        options = spec[1].get("options") if spec[0] == "COMBO" else spec[0] if isinstance(spec[0], list) else None
        default = spec[1].get("default") if len(spec) > 1 else None
        train[name] = wanted.get(name, default if default is not None else (options or [None])[0])
    dataset = {"folder": folder, "instance_prompt": "a photo of fac dog", "use_captions": True, "resolution": 64,
               "crop": "center"}
    return {"1": {"class_type": "DreamBoothDataset", "inputs": dataset},
            "2": {"class_type": "DreamBoothTrain", "inputs": train}}


def photos(server: ComfyServer, name: str, count: int = 3) -> str:
    copy_dog_photos(server.input_dir / name, count=count)
    return name


class Socket:
    """A websocket client of its own id, like a browser tab."""

    def __init__(self, server: ComfyServer) -> None:
        import websocket

        self.client_id = uuid.uuid4().hex
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}",
                                              timeout=10)
        self.ws.settimeout(0.5)
        self.events: list[dict[str, Any]] = []

    def poll(self, limit: int = 20) -> list[dict[str, Any]]:
        """The next messages, until none comes for half a second or ``limit`` came (a caller reacts to
        a run while it streams)."""
        import websocket

        new: list[dict[str, Any]] = []
        while len(new) < limit:
            try:
                message = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                break
            if isinstance(message, str):
                new.append(json.loads(message))
        self.events += new
        return new

    def drain(self) -> None:
        while self.poll():
            pass

    def train_events(self, run_name: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e.get("type") == EVENT and e["data"].get("run_name") == run_name]

    def close(self) -> None:
        self.ws.close()


def follow(server: ComfyServer, prompt: dict[str, Any], on_train_event: Callable[[dict[str, Any]], None],
           timeout: float = 240.0) -> str:
    """Queue ``prompt`` from one socket and call ``on_train_event`` with each live-view message until the
    prompt ends; returns how it ended (success, error or interrupted)."""
    tab = Socket(server)
    try:
        prompt_id = server.queue_prompt(prompt, tab.client_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in tab.poll():
                data = event.get("data") or {}
                if event.get("type") == EVENT:
                    on_train_event(data)
                elif data.get("prompt_id") == prompt_id and event.get("type") in (
                        "execution_success", "execution_error", "execution_interrupted"):
                    return str(event["type"]).removeprefix("execution_")
        raise AssertionError(f"prompt did not end in {timeout} s:\n{server.log_tail()}")
    finally:
        tab.close()


def runs_of(server: ComfyServer, run_name: str) -> list[dict[str, Any]]:
    return [r for r in server.get_json("/dreambooth/runs")["runs"] if r["run_name"] == run_name]


def test_a_run_is_kept_for_other_tabs_with_its_loss_points_and_samples(comfy_server: ComfyServer) -> None:
    tag = uuid.uuid4().hex[:6]
    name = f"live/dog {tag}"
    prompt = train_inputs(comfy_server, photos(comfy_server, f"live {tag}", 2), name, steps=3,
                          validation_prompts="a photo of fac dog")
    other_tab = Socket(comfy_server)
    seen_running: list[dict[str, Any]] = []

    def look_mid_run(data: dict[str, Any]) -> None:
        if data["event"]["type"] == "metrics" and not seen_running:
            seen_running.extend(runs_of(comfy_server, name))

    try:
        assert follow(comfy_server, prompt, look_mid_run) == "success"
        other_tab.drain()
    finally:
        other_tab.close()
    assert seen_running and seen_running[0]["state"] == "running" and seen_running[0]["stoppable"] is True
    assert [e["type"] for e in seen_running[0]["events"]].count("metrics") >= 1

    run = runs_of(comfy_server, name)[0]
    assert (run["node"], run["state"], run["stoppable"]) == ("2", "finished", False)
    events = run["events"]
    assert [e["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3]
    assert [e["status"] for e in events if e["type"] == "done"] == ["done"]
    samples = [e for e in events if e["type"] == "sample"]
    assert len(samples) == 1 and samples[0]["prompt"] == "a photo of fac dog" and samples[0]["step"] == 3
    with urllib.request.urlopen(comfy_server.url + samples[0]["url"], timeout=10) as resp:
        assert resp.status == 200 and resp.read(8) == b"\x89PNG\r\n\x1a\n"

    # The tab that did not queue the prompt saw the same run live, under the run's name and prompt.
    watched = other_tab.train_events(name)
    assert {d["node"] for d in watched} == {"2"} and {d["prompt_id"] for d in watched} == {run["prompt_id"]}
    assert [d["event"]["step"] for d in watched if d["event"]["type"] == "metrics"] == [1, 2, 3]


def test_stop_from_the_web_ui_keeps_a_checkpoint_and_queueing_again_resumes(comfy_server: ComfyServer) -> None:
    tag = uuid.uuid4().hex[:6]
    name = f"live_stop_{tag}"
    # Stopped at its first validation sample, long before its last step.
    prompt = train_inputs(comfy_server, photos(comfy_server, f"stop {tag}"), name, steps=1000,
                          validation_prompts="a photo of fac dog", validation_steps=2)
    answers: list[Any] = []
    resumed_from: list[str] = []

    def stop_at_first_sample(data: dict[str, Any]) -> None:
        inner = data["event"]
        if inner["type"] == "sample" and not answers:
            answers.append(comfy_server.post_json("/dreambooth/stop", {"node": "2", "run_name": name}))
        elif inner["type"] == "status" and str(inner.get("message", "")).startswith("resumed from"):
            resumed_from.append(inner["message"])

    assert follow(comfy_server, prompt, stop_at_first_sample) == "interrupted"
    assert answers == [{"stopping": True}] and not resumed_from
    run = runs_of(comfy_server, name)[0]
    assert run["state"] == "stopped", run["state"]
    done = [e for e in run["events"] if e["type"] == "done"]
    assert done and done[0]["status"] == "stopped"
    checkpoints = sorted((comfy_server.output_dir / "dreambooth" / name / "checkpoints").glob("step_*"))
    assert checkpoints and (checkpoints[-1] / "state.json").is_file()

    status, body = comfy_server._request("POST", "/dreambooth/stop", {"node": "2", "run_name": name})
    assert status == 404 and "no training of node 2" in body["error"], body
    status, body = comfy_server._request("POST", "/dreambooth/stop", {"run_name": name})
    assert status == 400 and '"node"' in body["error"], body

    answers.clear()
    assert follow(comfy_server, prompt, stop_at_first_sample) == "interrupted"
    assert answers == [{"stopping": True}] and len(resumed_from) == 1 and checkpoints[-1].name in resumed_from[0]
    resumed = runs_of(comfy_server, name)[0]
    assert resumed["prompt_id"] != run["prompt_id"] and resumed["state"] == "stopped"
    history = next(e for e in resumed["events"] if e["type"] == "loss_history")
    assert history["points"] and history["points"][-1][0] <= int(checkpoints[-1].name.split("_")[1])
    # The gallery keeps the samples of the stopped run: they come back with the resume, served by /view.
    earlier = [e for e in resumed["events"] if e["type"] == "sample" and e.get("earlier")]
    first_samples = [e for e in run["events"] if e["type"] == "sample"]
    assert first_samples and [e["url"] for e in earlier][:len(first_samples)] == [e["url"] for e in first_samples]
    assert all(e["prompt"] == "a photo of fac dog" for e in earlier)
    with urllib.request.urlopen(comfy_server.url + earlier[0]["url"], timeout=10) as resp:
        assert resp.status == 200 and resp.read(8) == b"\x89PNG\r\n\x1a\n"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_the_prestart_setting_turns_warm_trainers_off_and_on(comfy_server: ComfyServer) -> None:
    rejected = train_inputs(comfy_server, "unused", "unused", steps=1, ckpt_name="missing.safetensors")

    def queue_training() -> None:
        # The queue hook starts a warm trainer before the prompt is validated (and here rejected).
        with pytest.raises(PromptRejected):
            comfy_server.queue_prompt(rejected)

    try:
        off = comfy_server.post_json("/dreambooth/settings", {"prestart_trainer": False})
        assert off["prestart_trainer"] is False and comfy_server.get_json("/dreambooth/settings") == off
        wait_for(lambda: not comfy_server.warm_trainers(), "the waiting trainer to be closed", timeout=20)
        queue_training()
        assert comfy_server.post_json("/dreambooth/prewarm")["warm"] is False
        time.sleep(3)  # a trainer would be in the process table within milliseconds of the hook
        assert not comfy_server.warm_trainers()

        assert comfy_server.post_json("/dreambooth/settings", {"prestart_trainer": True})["prestart_trainer"]
        queue_training()
        assert len(wait_for(comfy_server.warm_trainers, "a warm trainer once switched on")) == 1
    finally:
        comfy_server.post_json("/dreambooth/settings", {"prestart_trainer": True})
    status, body = comfy_server._request("POST", "/dreambooth/settings", {"prestart_trainer": "yes"})
    assert status == 400 and "prestart_trainer" in body["error"]
