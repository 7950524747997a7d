"""The train node's live view in a real browser: real ComfyUI, real frontend, real trainer.

For each frontend (the 1.32.9 that ComfyUI 0.3.75 pins, and the newest, 1.58.1, with the classic
canvas and with its Vue-based node rendering) a ComfyUI server starts with the pack and the tiny
SD1.5 checkpoint, and headless Chromium, driven from Node by ``tests/browser/live_view.cjs``, does
what a user does: loads the example training workflow, makes it a short run through the node's
widgets, queues it with the Run button, waits for the loss chart and a validation sample, clicks
Stop, reloads the page and sees the run's history again, queues again and sees the run resume,
and stops it. Page errors and console errors fail the test.

Needs Chromium, Node and playwright-core (``tests/support/browser.py``); ``python3 scripts/dev.py
test --legs browser`` installs what is missing. Run directly, the tests skip when Chromium or Node
is missing. Screenshots of the panel go to pytest's tmp folder; their paths are printed.

A second check runs one training whose LoRA folder is a full disk (a small tmpfs): the panel must say
that the run waits for disk space for as long as it waits, and finish once the test frees the space.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dreambooth_test_support import browser, disks
from dreambooth_test_support.comfyui import ComfyServer
from dreambooth_test_support.paths import PACK_NAME, REPO_ROOT
from dreambooth_test_support.training import copy_dog_photos

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WORKFLOW = "dreambooth_train_with_prior"
DRIVER = REPO_ROOT / "tests" / "browser" / "live_view.cjs"
VIEWPORT = (1600, 1000)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Settings of a fresh user that would otherwise open a templates dialog over the graph, or draw a
# minimap and frame-rate figures over part of it.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
# Set through the page's widgets: a run small enough for two CPU cores that still lasts long
# enough to be stopped half-way, with a sample early and a checkpoint to resume from.
SHORT_RUN = {
    "resolution": 64, "steps": 400, "rank": 4, "train_text_encoder": False,
    "validation_prompts": "a photo of fac dog", "validation_steps": 5, "checkpointing_steps": 50,
}
# Class-image generation would double every step and add minutes before the first one.
REMOVED_NODES = ["DreamBoothPriorPreservation"]
# A run that only has to reach its end: its LoRA then waits for room on the full disk.
DISK_FULL_RUN = {"resolution": 64, "steps": 3, "rank": 4, "train_text_encoder": False, "validation_prompts": ""}
# How long the panel shows a passing message (BRIEF_MS in web/dreambooth.js).
BRIEF_MS = 4000
# Seconds; each wait in the driver names what it waited for when it runs out.
TIMEOUTS = {"boot": 60, "firstStep": 150, "train": 90, "stop": 60, "history": 30, "resume": 150}


@dataclass(frozen=True)
class Frontend:
    label: str
    version: str
    vue_nodes: bool

    @property
    def pinned_by_comfyui(self) -> bool:
        return self.version == "1.32.9"


FRONTENDS = [
    Frontend("1.32.9-classic", "1.32.9", vue_nodes=False),
    Frontend(f"{browser.NEW_FRONTEND_VERSION}-classic", browser.NEW_FRONTEND_VERSION, vue_nodes=False),
    Frontend(f"{browser.NEW_FRONTEND_VERSION}-vue-nodes", browser.NEW_FRONTEND_VERSION, vue_nodes=True),
]


@pytest.fixture(scope="module")
def tools() -> dict[str, Any]:
    return browser.tools_or_skip()


def api_inputs(workflow: str, class_type: str) -> dict[str, Any]:
    api = json.loads((REPO_ROOT / "example_workflows" / "api" / f"{workflow}.json").read_text(encoding="utf-8"))
    found = [n["inputs"] for n in api.values() if n["class_type"] == class_type]
    assert len(found) == 1, f"{workflow}: expected one {class_type} node, found {len(found)}"
    return found[0]


def prepare_server(server: ComfyServer, checkpoint: Path, frontend: Frontend) -> None:
    """The checkpoint and photos under the names the workflow uses, and the UI settings."""
    server.install_pack(REPO_ROOT, PACK_NAME)
    server.add_model("checkpoints", checkpoint, api_inputs(WORKFLOW, "DreamBoothTrain")["ckpt_name"])
    copy_dog_photos(server.input_dir / api_inputs(WORKFLOW, "DreamBoothDataset")["folder"], count=4)
    settings = server.base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    # Written either way: newer frontends may turn the Vue nodes on by default.
    settings.write_text(json.dumps({**UI_SETTINGS, "Comfy.VueNodes.Enabled": frontend.vue_nodes}), encoding="utf-8")


def run_driver(tools: dict[str, Any], config: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Run the Node driver; kill it with its browser if it overruns. Returns its JSON report."""
    config = {**config, "result": str(work / "result.json")}
    cfg_path = work / "driver.json"
    cfg_path.write_text(json.dumps(config), encoding="utf-8")
    env = {**os.environ, "NODE_PATH": str(tools["node_modules"])}
    log_path = work / "driver.log"
    with open(log_path, "wb") as log:
        # Its own process group, so a kill also takes Chromium's processes with it.
        proc = subprocess.Popen([tools["node"], str(DRIVER), str(cfg_path)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result_path = Path(config["result"])
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    assert result_path.is_file(), f"the browser driver exited {proc.returncode} without a report:\n{log_text[-4000:]}"
    report: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    report["driver_log"] = log_text
    return report


@pytest.mark.parametrize("frontend", FRONTENDS, ids=[f.label for f in FRONTENDS])
def test_live_view_stop_reload_resume(frontend: Frontend, tools: dict[str, Any], comfyui_root: Path,
                                      tiny_checkpoint: Path, tmp_path: Path) -> None:
    extra_args: list[str] = []
    if not frontend.pinned_by_comfyui:
        extra_args = ["--front-end-root", str(browser.ensure_frontend(frontend.version))]
    server = ComfyServer(comfyui_root, tmp_path / "comfy base", extra_args=extra_args)
    prepare_server(server, tiny_checkpoint, frontend)
    workflow = json.loads((REPO_ROOT / "example_workflows" / f"{WORKFLOW}.json").read_text(encoding="utf-8"))
    shots = tmp_path / "screenshots"
    with server:
        config = {
            "url": server.url, "chromium": tools["chromium"], "args": CHROMIUM_ARGS,
            "profile": str(tmp_path / "browser profile"), "viewport": VIEWPORT, "label": frontend.label,
            "workflow": workflow, "workflowName": f"{WORKFLOW}.json", "removeTypes": REMOVED_NODES,
            "widgets": SHORT_RUN, "timeouts": TIMEOUTS, "screenshotDir": str(shots),
        }
        report = run_driver(tools, config, tmp_path, timeout=sum(TIMEOUTS.values()) + 120)
        server_log = server.log_tail(6000)
    for kind, path in report.get("screenshots", {}).items():
        print(f"{frontend.label} screenshot ({kind}): {path}")
    seen = report.get("seen", {})
    print(f"{frontend.label}: seconds per phase {json.dumps({p['name']: p['s'] for p in report.get('phases', [])})}")
    print(f"{frontend.label}: panel when stopped {json.dumps(seen.get('stopped'))}, resumed by "
          f"{json.dumps(seen.get('resumed', {}).get('by'))}, finally {json.dumps(seen.get('final'))}")
    detail = ("problems:\n  " + "\n  ".join(report["problems"]) + f"\nseen: {json.dumps(seen, indent=1)}\n"
              "the pack's websocket messages (last 40):\n  " + "\n  ".join(report.get("events", [])[-40:]) +
              f"\ndriver log (tail):\n{report['driver_log'][-3000:]}\nComfyUI log (tail):\n{server_log}")
    assert not report["problems"], detail
    expected = frontend.version
    assert seen.get("frontend") == expected, f"the page runs frontend {seen.get('frontend')}, not {expected}"
    assert bool(seen.get("vueNodes")) is frontend.vue_nodes, f"Comfy.VueNodes.Enabled is {seen.get('vueNodes')}"
    stopped, final = seen["stopped"], seen["final"]
    # Drawn inside the Vue node component, not left floating over the canvas.
    assert stopped["inVueNode"] is frontend.vue_nodes, detail
    assert stopped["points"] >= 3 and stopped["thumbsLoaded"] >= 1, detail
    assert seen["reloaded"]["points"] >= stopped["points"], detail
    # The resumed run carries the curve up to its checkpoint on.
    assert final["step"] >= stopped["step"] and final["points"] >= stopped["points"], detail


def test_live_view_keeps_saying_the_run_waits_for_disk_space(tools: dict[str, Any], comfyui_root: Path,
                                                              tiny_checkpoint: Path, tmp_path: Path) -> None:
    frontend = FRONTENDS[1]  # the newest frontend, classic canvas: the panel's logic is the same in all
    server = ComfyServer(comfyui_root, tmp_path / "comfy base",
                         extra_args=["--front-end-root", str(browser.ensure_frontend(frontend.version))])
    loras = server.models_dir / "loras"
    disks.mount_small_disk(loras, 64)
    try:
        prepare_server(server, tiny_checkpoint, frontend)
        filler = disks.fill(loras, 4096)
        workflow = json.loads((REPO_ROOT / "example_workflows" / f"{WORKFLOW}.json").read_text(encoding="utf-8"))
        with server:
            config = {
                "url": server.url, "chromium": tools["chromium"], "args": CHROMIUM_ARGS,
                "profile": str(tmp_path / "browser profile"), "viewport": VIEWPORT, "label": f"{frontend.label}-disk",
                "workflow": workflow, "workflowName": f"{WORKFLOW}.json", "removeTypes": REMOVED_NODES,
                "widgets": DISK_FULL_RUN, "timeouts": TIMEOUTS, "screenshotDir": str(tmp_path / "screenshots"),
                "scenario": "disk full", "filler": str(filler), "briefMs": BRIEF_MS,
            }
            report = run_driver(tools, config, tmp_path, timeout=sum(TIMEOUTS.values()) + 120)
            server_log = server.log_tail(6000)
        lora_names = sorted(p.name for p in loras.rglob("*.safetensors"))
    finally:
        disks.unmount(loras)
    for kind, path in report.get("screenshots", {}).items():
        print(f"disk full screenshot ({kind}): {path}")
    seen = report.get("seen", {})
    detail = ("problems:\n  " + "\n  ".join(report["problems"]) + f"\nseen: {json.dumps(seen, indent=1)}\n"
              "the pack's websocket messages (last 40):\n  " + "\n  ".join(report.get("events", [])[-40:]) +
              f"\ndriver log (tail):\n{report['driver_log'][-3000:]}\nComfyUI log (tail):\n{server_log}")
    assert not report["problems"], detail
    lora_name = Path(api_inputs(WORKFLOW, "DreamBoothTrain")["lora_name"]).name
    waiting = seen["waiting"]["status"]
    assert waiting.startswith(f"waiting for disk space: not enough disk space to save {lora_name}.safetensors in "), detail
    assert str(loras) in waiting and "stop the training to give up" in waiting, detail
    assert seen["waitingLevel"] == "warning" and seen["stillWaiting"]["status"] == waiting, detail
    assert seen["final"]["status"].startswith("done: 3 steps"), detail
    assert lora_names == [f"{lora_name}.safetensors"], lora_names
