"""The dataset, prior and train nodes inside a real ComfyUI server, training the tiny SD1.5 checkpoint.

Every test trains (or fails to train) through the server's HTTP and websocket API, exactly as the web
UI does: the trainer is a real child process of the server, interrupted with POST /interrupt and
killed with SIGKILL. Photos are DreamBench dogs downscaled to 128 px so each step takes well under
a second; names are unique per test because ComfyUI caches unchanged nodes between prompts.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dreambooth_test_support.comfyui import ComfyServer, PromptRejected, PromptResult
from dreambooth_test_support.paths import DREAMBENCH_DIR
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.comfy

REPO_ROOT = Path(__file__).resolve().parents[1]
DOG_DIR = DREAMBENCH_DIR / "dog"
CKPT = "tiny-sd15.safetensors"
PACK = "comfyui_dreambooth_lora"
NONE_FOLDER = "(none: use images or folder_path)"
EVENT = "dreambooth.train"


def add_photos(server: ComfyServer, folder: str, count: int = 4) -> str:
    """Copy `count` DreamBench dog photos, downscaled to 128 px, into input/<folder>."""
    photos = sorted(DOG_DIR.glob("*.jpg"))[:count]
    assert len(photos) == count, f"need {count} DreamBench photos in {DOG_DIR}"
    target = server.input_dir / folder
    target.mkdir(parents=True, exist_ok=True)
    for src in photos:
        with Image.open(src) as img:
            small = img.convert("RGB")
            small.thumbnail((128, 128), Image.Resampling.LANCZOS)
            small.save(target / src.name, quality=92)
    return folder


def train_prompt(folder: str, lora_name: str, steps: int, **overrides: Any) -> dict[str, Any]:
    """Dataset "1" -> Train "2" -> SaveImage of preview "3", loss_curve "4", samples "5"."""
    dataset = {"folder": folder, "instance_prompt": "a photo of fac dog", "use_captions": True,
               "resolution": 64, "crop": "center"}
    dataset |= {k: overrides.pop(k) for k in list(overrides) if k in ("folder_path", "images")}
    train = {
        "ckpt_name": CKPT, "dataset": ["1", 0], "lora_name": lora_name, "steps": steps,
        "learning_rate": 1e-4, "text_encoder_lr": 5e-5, "train_text_encoder": True, "rank": 4, "alpha": 4.0,
        "unet_target": "attn", "batch_size": 1, "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False, "mixed_precision": "no", "lr_scheduler": "constant",
        "lr_warmup_steps": 0, "min_snr_gamma": 0.0, "seed": 7, "checkpointing_steps": 0,
        "validation_prompts": "", "validation_steps": 0, "overwrite": False,
    } | overrides
    prefix = f"train_{uuid.uuid4().hex[:8]}"
    return {
        "1": {"class_type": "DreamBoothDataset", "inputs": dataset},
        "2": {"class_type": "DreamBoothTrain", "inputs": train},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": f"{prefix}_preview"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": f"{prefix}_loss"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["2", 2], "filename_prefix": f"{prefix}_samples"}},
    }


def with_lora_render(prompt: dict[str, Any]) -> dict[str, Any]:
    """Add: checkpoint -> DreamBoothLoraLoader(lora from the train node) -> 2-step txt2img -> SaveImage "16"."""
    return prompt | {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "11": {"class_type": "DreamBoothLoraLoader", "inputs": {
            "model": ["10", 0], "clip": ["10", 1], "lora_name": "(use the lora input)",
            "strength_model": 1.0, "strength_clip": 1.0, "lora": ["2", 0]}},
        **txt2img_nodes(["11", 0], ["11", 1], ["10", 2], "trained_render", first=12),
    }


def txt2img_nodes(model: list[Any], clip: list[Any], vae: list[Any], prefix: str, first: int = 2) -> dict[str, Any]:
    ids = [str(first + i) for i in range(5)]
    return {
        ids[0]: {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of fac dog", "clip": clip}},
        ids[1]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        ids[2]: {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [ids[0], 0], "negative": [ids[0], 0], "latent_image": [ids[1], 0],
            "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        ids[3]: {"class_type": "VAEDecode", "inputs": {"samples": [ids[2], 0], "vae": vae}},
        ids[4]: {"class_type": "SaveImage", "inputs": {"images": [ids[3], 0], "filename_prefix": prefix}},
    }


def train_events(result: PromptResult | FollowResult, node: str = "2") -> list[dict[str, Any]]:
    return [d["event"] for d in result.events_of(EVENT) if d.get("node") == node]


@dataclass
class FollowResult:
    prompt_id: str
    status: str
    events: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e.get("data", {}) for e in self.events if e.get("type") == kind]


def follow(server: ComfyServer, prompt: dict[str, Any], on_event: Callable[[dict[str, Any]], None],
           timeout: float = 240.0) -> FollowResult:
    """Queue `prompt` and call `on_event` with every websocket event until the prompt ends."""
    import websocket

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=10)
    try:
        prompt_id = server.queue_prompt(prompt, client_id)
        result = FollowResult(prompt_id, "")
        ws.settimeout(1.0)
        deadline = time.monotonic() + timeout
        while not result.status:
            assert time.monotonic() < deadline, f"prompt did not finish in {timeout} s:\n{server.log_tail()}"
            try:
                message = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            result.events.append(event)
            on_event(event)
            data = event.get("data") or {}
            if data.get("prompt_id") == prompt_id:
                kind = event.get("type")
                if kind == "execution_success":
                    result.status = "success"
                elif kind in ("execution_error", "execution_interrupted"):
                    result.status, result.error = kind.removeprefix("execution_"), data
        return result
    finally:
        ws.close()


def node_error(result: PromptResult, node: str) -> str:
    assert result.status == "error", f"expected an error, got {result.status}: {result.outputs}"
    assert result.error is not None and result.error.get("node_id") == node, result.error
    return str(result.error.get("exception_message", ""))


def rejection(excinfo: pytest.ExceptionInfo[PromptRejected], node: str) -> str:
    errors = excinfo.value.node_errors.get(node, {}).get("errors", [])
    assert errors, excinfo.value.body
    return " ".join(f"{e.get('message')} {e.get('details')}" for e in errors)


def image_sizes(server: ComfyServer, result: PromptResult, node: str) -> list[tuple[int, int]]:
    sizes = []
    for path in server.output_files(result, node_id=node):
        with Image.open(path) as img:
            sizes.append(img.size)
    return sizes


# --------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(comfy_server: ComfyServer) -> dict[str, Any]:
    """One real 4-step training through the server, shared by the tests that inspect it."""
    tag = uuid.uuid4().hex[:6]
    folder = add_photos(comfy_server, f"dog photos {tag}", count=4)
    name = f"test dog {tag}"
    prompt = with_lora_render(train_prompt(folder, name, steps=4, validation_prompts="a photo of fac dog",
                                           validation_steps=0))
    result = comfy_server.run_prompt(prompt, timeout=300)
    result.raise_for_status()
    return {"folder": folder, "name": name, "prompt": prompt, "result": result,
            "lora": comfy_server.models_dir / "loras" / f"{name}.safetensors",
            "run_dir": comfy_server.output_dir / "dreambooth" / name}


def test_training_writes_a_lora_comfyui_lists(comfy_server: ComfyServer, trained: dict[str, Any]) -> None:
    lora: Path = trained["lora"]
    assert lora.is_file(), f"no LoRA at {lora}"
    names = comfy_server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"]
    options = names[1]["options"] if names[0] == "COMBO" else names[0]
    assert lora.name in options
    with safe_open(str(lora), framework="pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4"
    assert len(meta["user.dataset_fingerprint"]) == 64
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te") for k in keys)
    run_dir: Path = trained["run_dir"]
    assert (run_dir / "run.json").is_file() and (run_dir / "trainer.log").stat().st_size > 0
    assert (comfy_server.output_dir / "dreambooth" / "_cache").is_dir()


def test_training_events_reach_the_websocket(comfy_server: ComfyServer, trained: dict[str, Any]) -> None:
    result: PromptResult = trained["result"]
    events = train_events(result)
    kinds = [e["type"] for e in events]
    assert kinds.count("hello") == 1 and isinstance(events[kinds.index("hello")]["pid"], int)
    losses = [e["loss"] for e in events if e["type"] == "metrics"]
    assert len(losses) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in losses), losses
    assert {e["total"] for e in events if e["type"] == "metrics"} == {4}
    assert kinds[-1] == "done" and events[-1]["status"] == "done"
    progress = [p for p in result.events_of("progress") if p.get("node") == "2"]
    assert progress and progress[-1]["value"] == 4 and progress[-1]["max"] == 4, progress
    samples = [e for e in events if e["type"] == "sample"]
    assert len(samples) == 1 and samples[0]["url"].startswith("/view?")
    with urllib.request.urlopen(comfy_server.url + samples[0]["url"], timeout=10) as resp:
        assert resp.status == 200 and resp.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_outputs(comfy_server: ComfyServer, trained: dict[str, Any]) -> None:
    result: PromptResult = trained["result"]
    assert image_sizes(comfy_server, result, "3") == [(64, 64)] * 4, "preview: the 4 trained 64x64 crops"
    assert image_sizes(comfy_server, result, "4") == [(512, 256)], "one loss-curve image"
    samples = comfy_server.output_files(result, node_id="5")
    assert len(samples) == 1
    with Image.open(samples[0]) as img:
        assert img.size == (64, 64)
        assert np.asarray(img.convert("L")).std() > 1.0, "the validation sample is not the black placeholder"
    renders = comfy_server.output_files(result, node_id="16")
    assert len(renders) == 1, "the trained LoRA went through DreamBoothLoraLoader into txt2img"


def test_same_prompt_does_not_retrain(comfy_server: ComfyServer, trained: dict[str, Any]) -> None:
    lora: Path = trained["lora"]
    before = lora.stat().st_mtime_ns
    again = comfy_server.run_prompt(trained["prompt"], timeout=120).raise_for_status()
    events = train_events(again)
    assert not [e for e in events if e["type"] == "hello"], f"a trainer was started again: {events}"
    assert any(e.get("reused") for e in events if e["type"] == "status") or not events
    assert lora.stat().st_mtime_ns == before
    assert image_sizes(comfy_server, again, "4") == [(512, 256)]
    third = comfy_server.run_prompt(trained["prompt"], timeout=120).raise_for_status()
    cached = [n for d in third.events_of("execution_cached") for n in d.get("nodes", [])]
    assert "2" in cached and not train_events(third)


def test_other_settings_need_overwrite(comfy_server: ComfyServer, trained: dict[str, Any]) -> None:
    prompt = train_prompt(trained["folder"], trained["name"], steps=4, rank=8)
    result = comfy_server.run_prompt(prompt, timeout=120)
    message = node_error(result, "2")
    assert trained["lora"].name in message and "overwrite" in message and "ss_network_dim" not in message
    assert "rank: 4 in the file, 8 now" in message, message
    assert not [e for e in train_events(result) if e["type"] == "hello"]


def test_moving_the_photo_folder_keeps_the_trained_lora(comfy_server: ComfyServer) -> None:
    """Reuse is decided by the engine's training identity: contents, not folder names."""
    tag = uuid.uuid4().hex[:6]
    folder = add_photos(comfy_server, f"before move {tag}", count=2)
    name = f"test_moved_{tag}"
    comfy_server.run_prompt(train_prompt(folder, name, steps=2), timeout=300).raise_for_status()
    lora = comfy_server.models_dir / "loras" / f"{name}.safetensors"
    written = lora.stat().st_mtime_ns

    moved = f"renamed after training {tag}"
    (comfy_server.input_dir / folder).rename(comfy_server.input_dir / moved)
    again = comfy_server.run_prompt(train_prompt(moved, name, steps=2), timeout=120)
    again.raise_for_status()
    events = train_events(again)
    assert not [e for e in events if e["type"] == "hello"], f"a trainer was started again: {events}"
    assert any(e.get("reused") for e in events if e["type"] == "status"), events
    assert lora.stat().st_mtime_ns == written

    fewer = comfy_server.run_prompt(train_prompt(moved, name, steps=1), timeout=120)
    message = node_error(fewer, "2")
    assert "steps: 2 in the file, 1 now" in message and "overwrite" in message, message


def test_a_half_downloaded_checkpoint_is_refused_before_any_photo_is_read(comfy_server: ComfyServer,
                                                                          tiny_checkpoint: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    with tiny_checkpoint.open("rb") as fh:
        head = fh.read(4 << 20)
    ckpt = f"half_{tag}.safetensors"
    (comfy_server.models_dir / "checkpoints" / ckpt).write_bytes(head)
    folder = add_photos(comfy_server, f"never read {tag}", count=1)
    prompt = train_prompt(folder, f"test_half_{tag}", steps=2, ckpt_name=ckpt)
    del prompt["3"]  # an output that does not need the train node would let the prompt run partly
    with pytest.raises(PromptRejected) as excinfo:
        comfy_server.queue_prompt(prompt)
    message = rejection(excinfo, "2")
    assert ckpt in message and "cannot be trained on" in message and "the download is incomplete" in message


# --------------------------------------------------------------------------------------------- stop, resume, kill


def test_interrupt_keeps_a_checkpoint_and_queueing_again_resumes(comfy_server: ComfyServer) -> None:
    tag = uuid.uuid4().hex[:6]
    folder = add_photos(comfy_server, f"interrupt {tag}", count=3)
    name = f"test_interrupt_{tag}"
    prompt = train_prompt(folder, name, steps=200)
    asked: list[float] = []

    def interrupt_on_first_loss(event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("type") == EVENT and data["event"]["type"] == "metrics" and not asked:
            asked.append(time.monotonic())
            comfy_server.interrupt()

    first = follow(comfy_server, prompt, interrupt_on_first_loss)
    assert first.status == "interrupted", first.error
    stopped_after = time.monotonic() - asked[0]
    assert stopped_after < 20, f"the trainer took {stopped_after:.0f} s to stop"
    checkpoints = sorted((comfy_server.output_dir / "dreambooth" / name / "checkpoints").glob("step_*"))
    assert checkpoints and (checkpoints[-1] / "state.json").is_file()
    assert any(e.get("interrupted") for e in train_events(first) if e["type"] == "status")
    assert not (comfy_server.models_dir / "loras" / f"{name}.safetensors").exists()

    resumed: list[str] = []

    def interrupt_once_resumed(event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("type") != EVENT:
            return
        inner = data["event"]
        if inner["type"] == "status" and str(inner.get("message", "")).startswith("resumed from"):
            resumed.append(inner["message"])
        if resumed and inner["type"] == "metrics" and len(resumed) == 1:
            resumed.append("stopping")
            comfy_server.interrupt()

    second = follow(comfy_server, prompt, interrupt_once_resumed)
    assert resumed and checkpoints[-1].name in resumed[0], resumed
    assert second.status == "interrupted", second.error
    steps = [e["step"] for e in train_events(second) if e["type"] == "metrics"]
    assert steps and steps[0] > int(checkpoints[-1].name.split("_")[1]), steps


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_the_next_run_gets_a_trainer_started_ahead_of_it(comfy_server: ComfyServer) -> None:
    tag = uuid.uuid4().hex[:6]
    folder = add_photos(comfy_server, f"warm {tag}", count=2)
    comfy_server.run_prompt(train_prompt(folder, f"test_warm_a_{tag}", steps=1), timeout=300).raise_for_status()
    # A finished run leaves one trainer importing its libraries and then waiting for the next run.
    waiting = wait_for(lambda: comfy_server.warm_trainers(), "a warm trainer after the run")
    assert len(waiting) == 1, waiting
    second = comfy_server.run_prompt(train_prompt(folder, f"test_warm_b_{tag}", steps=2), timeout=300)
    second.raise_for_status()
    events = train_events(second)
    started = next(e for e in events if e["type"] == "status" and "pid" in e)
    assert started["warm"] is True and started["pid"] == waiting[0], started
    assert "warm trainer (pid" in started["message"]
    hello = next(e for e in events if e["type"] == "hello")
    ready = next(e for e in events if e["type"] == "ready")
    assert hello["pid"] == waiting[0], "the process that existed before the prompt was queued"
    assert ready["import_s"] > 0.5
    assert [e["step"] for e in events if e["type"] == "metrics"] == [1, 2]
    assert (comfy_server.models_dir / "loras" / f"test_warm_b_{tag}.safetensors").is_file()
    assert "warm trainer (started" in (comfy_server.output_dir / "dreambooth" / f"test_warm_b_{tag}" /
                                       "trainer.log").read_text(encoding="utf-8")

    # Queuing a prompt that trains starts one at once, even before the prompt is validated.
    spare = wait_for(lambda: comfy_server.warm_trainers(), "a warm trainer after the second run")[0]
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: spare not in comfy_server.child_processes(), "the killed trainer to be reaped", timeout=15)
    rejected = train_prompt(folder, f"test_warm_c_{tag}", steps=1, ckpt_name="missing.safetensors")
    del rejected["3"]  # the preview does not need the train node: the prompt would run partly
    with pytest.raises(PromptRejected):
        comfy_server.queue_prompt(rejected)
    fresh = wait_for(lambda: comfy_server.warm_trainers(), "a warm trainer started by the queued prompt")
    assert spare not in fresh


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_the_web_extension_can_ask_for_a_warm_trainer(comfy_server: ComfyServer) -> None:
    """What web/dreambooth.js calls when a workflow with a training node is opened."""
    killed = set(comfy_server.warm_trainers())
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    # Gone from the process table, not just on its way out (a dying process has an empty command line).
    wait_for(lambda: not killed & set(comfy_server.child_processes()), "the killed trainers to exit", timeout=15)
    body = comfy_server.post_json("/dreambooth/prewarm")
    assert body["warm"] is True and body["idle_s"] > 0, body
    assert comfy_server.warm_trainers() == [body["pid"]]
    again = comfy_server.post_json("/dreambooth/prewarm")
    assert again["pid"] == body["pid"], "one warm trainer, its idle clock restarted"
    assert "/dreambooth/prewarm" in (REPO_ROOT / "web" / "dreambooth.js").read_text(encoding="utf-8")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_killed_trainer_is_a_node_error_and_the_server_keeps_working(comfy_server: ComfyServer) -> None:
    tag = uuid.uuid4().hex[:6]
    folder = add_photos(comfy_server, f"kill {tag}", count=3)
    pids: list[int] = []

    def kill_mid_run(event: dict[str, Any]) -> None:
        if event.get("type") != EVENT:
            return
        inner = event["data"]["event"]
        if inner["type"] == "hello":
            pids.append(int(inner["pid"]))
        elif inner["type"] == "metrics" and len(pids) == 1:
            os.kill(pids[0], signal.SIGKILL)
            pids.append(-1)

    result = follow(comfy_server, train_prompt(folder, f"test_kill_{tag}", steps=200), kill_mid_run)
    assert result.status == "error" and result.error is not None
    assert result.error["node_id"] == "2"
    assert "the trainer process was killed (signal 9" in result.error["exception_message"], result.error
    after = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
             **txt2img_nodes(["1", 0], ["1", 1], ["1", 2], f"after_kill_{tag}")}
    ok = comfy_server.run_prompt(after, timeout=120).raise_for_status()
    assert len(comfy_server.output_files(ok, node_id="6")) == 1


def test_images_input_with_prior_preservation(comfy_server: ComfyServer) -> None:
    """An IMAGE batch from core nodes as the dataset, plus class images generated by the base model."""
    tag = uuid.uuid4().hex[:6]
    names = []
    for i, src in enumerate(sorted(DOG_DIR.glob("*.jpg"))[:2]):
        with Image.open(src) as img:
            names.append(f"db_{tag}_{i}.png")
            img.convert("RGB").resize((96, 96), Image.Resampling.LANCZOS).save(comfy_server.input_dir / names[-1])
    prompt = train_prompt(NONE_FOLDER, f"test_prior_{tag}", steps=2, prior=["6", 0])
    prompt["1"]["inputs"]["images"] = ["22", 0]
    prompt |= {
        "20": {"class_type": "LoadImage", "inputs": {"image": names[0]}},
        "21": {"class_type": "LoadImage", "inputs": {"image": names[1]}},
        "22": {"class_type": "ImageBatch", "inputs": {"image1": ["20", 0], "image2": ["21", 0]}},
        "6": {"class_type": "DreamBoothPriorPreservation", "inputs": {
            "class_prompt": "a photo of dog", "num_class_images": 2, "prior_loss_weight": 1.0}},
    }
    result = comfy_server.run_prompt(prompt, timeout=300).raise_for_status()
    assert image_sizes(comfy_server, result, "3") == [(64, 64)] * 2
    written = list((comfy_server.temp_dir / "dreambooth_images").glob("*/image_*.png"))
    assert len(written) >= 2
    metrics = [e for e in train_events(result) if e["type"] == "metrics"]
    assert len(metrics) == 2 and all(e["prior_loss"] > 0 for e in metrics), metrics
    with safe_open(str(comfy_server.models_dir / "loras" / f"test_prior_{tag}.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["dreambooth.class_prompt"] == "a photo of dog"
    assert json.loads(meta["dreambooth.config"])["with_prior_preservation"] is True
    assert list((comfy_server.output_dir / "dreambooth" / "_cache").rglob("*.png")), "class images are cached"


# --------------------------------------------------------------------------------------------- bad input


def test_empty_folder_is_a_node_error_naming_it(comfy_server: ComfyServer) -> None:
    folder = f"empty {uuid.uuid4().hex[:6]}"
    (comfy_server.input_dir / folder).mkdir()
    (comfy_server.input_dir / folder / "notes.txt").write_text("no photos here", encoding="utf-8")
    result = comfy_server.run_prompt(train_prompt(folder, f"test_empty_{folder[-6:]}", steps=2))
    message = node_error(result, "1")
    assert folder in message and "contains no images" in message


def test_broken_jpg_is_a_node_error_naming_the_file(comfy_server: ComfyServer) -> None:
    tag = uuid.uuid4().hex[:6]
    folder = add_photos(comfy_server, f"broken {tag}", count=2)
    (comfy_server.input_dir / folder / "zz_not_a_photo.jpg").write_bytes(b"this is text, not a JPEG\n" * 20)
    result = comfy_server.run_prompt(train_prompt(folder, f"test_broken_{tag}", steps=2))
    assert "zz_not_a_photo.jpg" in node_error(result, "1")


def test_missing_checkpoint_is_a_validation_error(comfy_server: ComfyServer) -> None:
    folder = add_photos(comfy_server, f"valid {uuid.uuid4().hex[:6]}", count=1)
    prompt = train_prompt(folder, "test_missing_ckpt", steps=2, ckpt_name="nope.safetensors")
    del prompt["3"]  # an output that does not need the train node would let the prompt run partly
    with pytest.raises(PromptRejected) as excinfo:
        comfy_server.queue_prompt(prompt)
    assert "nope.safetensors" in rejection(excinfo, "2")
    assert [e["extra_info"]["input_name"] for e in excinfo.value.node_errors["2"]["errors"]] == ["ckpt_name"]


def test_paths_outside_input_are_refused(comfy_server: ComfyServer, tmp_path: Path) -> None:
    outside = tmp_path / "private photos"
    outside.mkdir()
    with pytest.raises(PromptRejected) as excinfo:
        comfy_server.queue_prompt(train_prompt(NONE_FOLDER, "test_outside", steps=2, folder_path=str(outside)))
    message = rejection(excinfo, "1")
    assert "DREAMBOOTH_ALLOW_ANY_PATH=1" in message and "outside ComfyUI's input folder" in message
    with pytest.raises(PromptRejected) as excinfo:
        comfy_server.queue_prompt(train_prompt("../models", "test_escape", steps=2))
    assert "not a subfolder" in rejection(excinfo, "1")
    folder = add_photos(comfy_server, f"escape {uuid.uuid4().hex[:6]}", count=1)
    escaped = comfy_server.run_prompt(train_prompt(folder, "../../escape", steps=2))
    assert "'..'" in node_error(escaped, "2")
    assert not list(comfy_server.base_dir.rglob("escape.safetensors"))


def test_the_any_path_opt_in_reads_a_folder_outside_input(comfyui_root: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """The server owner's opt-in (an environment variable, never a workflow setting) lifts the refusal."""
    outside = tmp_path_factory.mktemp("photos elsewhere")
    for src in sorted(DOG_DIR.glob("*.jpg"))[:2]:
        with Image.open(src) as img:
            img.convert("RGB").resize((96, 80), Image.Resampling.LANCZOS).save(outside / f"{src.stem}.png")
    server = ComfyServer(comfyui_root, tmp_path_factory.mktemp("comfy any path"),
                         env={"DREAMBOOTH_ALLOW_ANY_PATH": "1"})
    server.install_pack(REPO_ROOT, PACK)
    with server:
        prompt = train_prompt(NONE_FOLDER, "unused", steps=1, folder_path=str(outside))
        previews = {"1": prompt["1"], "3": prompt["3"]}  # the dataset and its crops preview only
        result = server.run_prompt(previews, timeout=120).raise_for_status()
        assert image_sizes(server, result, "3") == [(64, 64), (64, 64)], "both outside photos, center-cropped"


# --------------------------------------------------------------------------------------------- schema, web


def test_schema_has_tooltips_and_a_fixed_seed(comfy_server: ComfyServer) -> None:
    for node in ("DreamBoothDataset", "DreamBoothPriorPreservation", "DreamBoothTrain"):
        info = comfy_server.object_info(node)[node]
        assert info["category"].startswith("DreamBooth/")
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        missing = [name for name, spec in inputs.items() if not (len(spec) > 1 and spec[1].get("tooltip"))]
        assert not missing, f"{node}: inputs without tooltip: {missing}"
    train = comfy_server.object_info("DreamBoothTrain")["DreamBoothTrain"]
    assert train["output_node"] is True
    assert train["input"]["required"]["seed"][1]["control_after_generate"] is False, "a random seed would retrain"
    # Saved workflows link outputs by position: new outputs are appended.
    assert train["output"] == ["DREAMBOOTH_LORA", "IMAGE", "IMAGE", "DREAMBOOTH_LORA_LIST", "DREAMBOOTH_CHECKPOINT"]


def test_web_extension_is_served(comfy_server: ComfyServer) -> None:
    for name, needle in (("dreambooth.js", EVENT), ("dreambooth.css", ".dreambooth-panel")):
        with urllib.request.urlopen(f"{comfy_server.url}/extensions/{PACK}/{name}", timeout=10) as resp:
            assert resp.status == 200
            assert needle in resp.read().decode("utf-8")
