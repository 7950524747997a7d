"""Shared pytest fixtures: the pack as an importable package and a real ComfyUI server.

Two import rules shape this file:
- The repo root is never put on sys.path (its `nodes/` would shadow ComfyUI's `nodes.py`).
  `import_pack()` registers the repo as the package `comfyui_dreambooth_lora`, so unit tests
  write `from comfyui_dreambooth_lora.trainer import ...`.
- ComfyUI is never imported into the pytest process; it runs as a server child process and
  tests talk to it over HTTP / websocket (`comfy_server`).

`tests/support/` is loaded as the package `dreambooth_test_support` for the same reason
(pytest runs with `--import-mode=importlib`, which adds nothing to sys.path):
`from dreambooth_test_support.comfyui import ComfyServer`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SUPPORT_PACKAGE = "dreambooth_test_support"
_REPO_ROOT = Path(__file__).resolve().parents[1]

# `python -m pytest` prepends the current directory to sys.path; from the repo root that would
# make the pack's `nodes/` importable as top-level `nodes`, ComfyUI's module name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO_ROOT]


def _load_support() -> ModuleType:
    if SUPPORT_PACKAGE in sys.modules:
        return sys.modules[SUPPORT_PACKAGE]
    here = Path(__file__).resolve().parent / "support"
    spec = importlib.util.spec_from_file_location(
        SUPPORT_PACKAGE, here / "__init__.py", submodule_search_locations=[str(here)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[SUPPORT_PACKAGE] = module
    spec.loader.exec_module(module)
    return module


_load_support()
paths = importlib.import_module(f"{SUPPORT_PACKAGE}.paths")
comfyui = importlib.import_module(f"{SUPPORT_PACKAGE}.comfyui")
tiny_models = importlib.import_module(f"{SUPPORT_PACKAGE}.tiny_models")

# Registered at collection time so test modules may import the pack at module level.
paths.import_pack()

PACK_DIR_NAME = paths.PACK_NAME
TINY_CKPT_NAME = "tiny-sd15.safetensors"
TINY_CONTROLNET_NAME = "tiny-controlnet.safetensors"


@pytest.fixture(scope="session")
def pack() -> ModuleType:
    """The repository imported as the package `comfyui_dreambooth_lora`."""
    return paths.import_pack()


def pytest_report_header(config: pytest.Config) -> str:
    override = os.environ.get("COMFYUI_PATH")
    if override:
        return f"ComfyUI under test: {comfyui.comfyui_version(Path(override))} from COMFYUI_PATH={override}"
    return f"ComfyUI under test: {comfyui.COMFYUI_VERSION} (cached copy; set COMFYUI_PATH for another tree)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m comfy` selects the tests that run ComfyUI itself, which `scripts/dev.py` also runs against
    # a second ComfyUI version: every test that needs the server is marked here, so a new
    # real-server test cannot be left out; tests that run ComfyUI's loader code in a child process
    # (the LoRA compatibility probes) carry the mark themselves. Asking for `comfyui_root` alone
    # does not count: the tiny models are built with ComfyUI's classes once and cached.
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfy)


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    """Root of the ComfyUI tree under test: the cached v0.3.75, or `COMFYUI_PATH` (read-only)."""
    root = comfyui.provision_comfyui()
    comfyui.keep_writes_out_of(root)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(comfyui_root: Path) -> Path:
    """Cached tiny SD1.5 single-file checkpoint (LDM keys, fp16 storage)."""
    return tiny_models.tiny_sd15_checkpoint(comfyui_root)


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(comfyui_root: Path) -> Path:
    """Cached tiny SDXL single-file checkpoint (SDXL's blocks at 320 channels, full-size text encoders;
    ~2.4 GB, built in about a minute on first use)."""
    return tiny_models.tiny_sdxl_checkpoint(comfyui_root)


@pytest.fixture(scope="session")
def tiny_controlnet(comfyui_root: Path) -> Path:
    """Cached tiny ControlNet (cldm `control_model.*` keys) matching the tiny checkpoint."""
    return tiny_models.tiny_controlnet(comfyui_root)


@pytest.fixture(scope="session")
def comfy_server(
    comfyui_root: Path, tiny_checkpoint: Path, tiny_controlnet: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[comfyui.ComfyServer]:
    """One ComfyUI server for the whole test run, with this repo installed as a custom-node pack.

    Models: `checkpoints/tiny-sd15.safetensors`, `controlnet/tiny-controlnet.safetensors`.
    Tests share it, so they should write outputs under a unique filename_prefix.
    """
    base = tmp_path_factory.mktemp("comfy base")  # a space, so path quoting bugs show up
    server = comfyui.ComfyServer(comfyui_root, base)
    server.install_pack(paths.REPO_ROOT, PACK_DIR_NAME)
    server.add_model("checkpoints", tiny_checkpoint, TINY_CKPT_NAME)
    server.add_model("controlnet", tiny_controlnet, TINY_CONTROLNET_NAME)
    server.start()
    try:
        yield server
    finally:
        server.stop()
