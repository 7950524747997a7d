"""Every example workflow opens cleanly in the real frontend: real ComfyUI, real page, headless Chromium.

For the frontend ComfyUI 0.3.75 pins (1.32.9) and the newest (1.58.1, classic canvas), a ComfyUI
server starts with the pack and every file the workflows name (the tiny models under the SD1.5 and
ControlNet file names, a photo folder, a layout image, a LoRA), and ``tests/browser/load_workflows.cjs``
opens each ``example_workflows/*.json`` with the app's ``app.loadGraphData``, as opening a file does.
The test fails on a dialog (e.g. "missing node types"), a node type the frontend has not registered,
a node or link count other than the file's, widget values that ``app.graph.serialize()`` gives back
different from the file's, a page error, a console error or a failed request; the frontend's known
noise (``tests/browser/known_noise.cjs``, shared with the live-view test) is set aside.

Needs Chromium, Node and playwright-core (``tests/support/browser.py``); ``python3 scripts/dev.py
test --legs browser`` installs what is missing. Run directly, the tests skip when Chromium or Node is
missing; in CI the browser leg fails instead.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dreambooth_test_support import browser, tiny_models
from dreambooth_test_support.comfyui import ComfyServer
from dreambooth_test_support.paths import PACK_NAME, REPO_ROOT

pytestmark = [pytest.mark.browser]

DRIVER = REPO_ROOT / "tests" / "browser" / "load_workflows.cjs"
WORKFLOWS = REPO_ROOT / "example_workflows"
PINNED_FRONTEND = "1.32.9"  # the one ComfyUI 0.3.75 pins, installed in the venv
FRONTENDS = [PINNED_FRONTEND, browser.NEW_FRONTEND_VERSION]
TIMEOUTS = {"boot": 60}
SETTLE_MS = 400  # after each load, for a dialog the frontend opens a moment later


def _screenshot_script() -> Any:
    """scripts/screenshot_workflow.py, whose prepare() provides every file the workflows name."""
    name = "dreambooth_scripts_screenshot_workflow"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / "screenshot_workflow.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tools() -> dict[str, Any]:
    return browser.tools_or_skip()


@pytest.mark.parametrize("version", FRONTENDS)
def test_every_example_workflow_loads_cleanly(version: str, tools: dict[str, Any], comfyui_root: Path,
                                              tmp_path: Path) -> None:
    started = time.monotonic()
    extra_args = [] if version == PINNED_FRONTEND else ["--front-end-root", str(browser.ensure_frontend(version))]
    server = ComfyServer(comfyui_root, tmp_path / "comfy base", extra_args=extra_args)
    server.install_pack(REPO_ROOT, PACK_NAME)
    _screenshot_script().prepare(server, tiny_models, comfyui_root)
    files = sorted(WORKFLOWS.glob("*.json"))
    assert len(files) >= 7, f"example workflows not found in {WORKFLOWS}"
    workflows = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in files}
    with server:
        config = {
            "url": server.url, "chromium": tools["chromium"], "args": browser.CHROMIUM_ARGS,
            "profile": str(tmp_path / "browser profile"), "viewport": [1600, 1000],
            "workflows": workflows, "timeouts": TIMEOUTS, "settleMs": SETTLE_MS,
        }
        report = browser.run_node_script(tools["node"], DRIVER, tools["node_modules"], config, tmp_path,
                                         timeout=TIMEOUTS["boot"] + 30 * len(workflows))
        server_log = server.log_tail(4000)
    print(f"frontend {version}: {time.monotonic() - started:.1f} s in all; seconds in the page "
          f"{json.dumps(report.get('seconds'))}; /api/jobs errors set aside: {report.get('jobsApiErrors')}")
    detail = ("problems:\n  " + "\n  ".join(report["problems"]) + f"\ndriver log (tail):\n{report['driver_log'][-3000:]}"
              f"\nComfyUI log (tail):\n{server_log}")
    assert not report["problems"], detail
    assert report["frontend"] == version, f"the page runs frontend {report['frontend']}, not {version}"
    assert set(report["workflows"]) == set(workflows), detail
    for name, workflow in workflows.items():
        seen = report["workflows"][name]
        assert seen["nodes"] == seen["serialized"] == len(workflow["nodes"]), (name, seen)
        assert seen["types"] == sorted({n["type"] for n in workflow["nodes"]}), (name, seen)
        assert not seen["unregistered"] and not seen["changed"] and not seen["dialogs"], (name, seen)
