"""Where the test suite keeps things: the repository root and the git-ignored cache."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

REPO_ROOT: Path = Path(__file__).resolve().parents[2]

# Generated fixtures and downloads are large and rebuilt on demand, so they live outside git;
# CI can point this at a persistent volume to keep them between runs.
CACHE_DIR: Path = Path(os.environ.get("DREAMBOOTH_TEST_CACHE") or (REPO_ROOT / ".cache")).resolve()

# Real subject photos from the DreamBooth paper's dataset, downscaled copies kept in the repository
# (with their attribution and licence) so the suite runs from a clone alone.
DREAMBENCH_DIR: Path = REPO_ROOT / "tests" / "assets" / "dreambench"

# Environment that keeps every child process (ComfyUI, builders, the trainer) off the network and
# single-threaded: with two cores, oversubscribed BLAS threads made small ops 10-20x slower.
OFFLINE_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return a copy of os.environ with the offline settings (and `extra`) applied."""
    env = dict(os.environ)
    # ComfyUI's main.py imports `comfy` from its own folder, which PYTHONSAFEPATH would hide.
    env.pop("PYTHONSAFEPATH", None)
    env.update(OFFLINE_ENV)
    if extra:
        env.update(extra)
    return env


def cache_path(*parts: str) -> Path:
    """A path under CACHE_DIR, creating its parent folder."""
    path = CACHE_DIR.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final` and move it into place only if the block succeeds.

    A build killed half-way (timeout, Ctrl-C) then leaves no folder that looks complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `final`; rename it onto `final` if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp creates 0600
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


PACK_NAME = "comfyui_dreambooth_lora"


def import_pack(name: str = PACK_NAME) -> ModuleType:
    """Import the repository as the package `name` (default `comfyui_dreambooth_lora`).

    The repo root is never put on sys.path: its `nodes/` would shadow ComfyUI's `nodes.py`.
    Instead the root `__init__.py` is loaded under a fixed package name, so
    `import comfyui_dreambooth_lora.trainer.config` works and relative imports inside the pack
    resolve as they do when ComfyUI loads it from `custom_nodes/`.
    """
    if name in sys.modules:
        return sys.modules[name]
    init = REPO_ROOT / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(REPO_ROOT)]
        )
    else:
        # No root module yet: a bare package still lets `trainer/` and friends be imported.
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(REPO_ROOT)]
    if spec is None:
        raise ImportError(f"cannot build an import spec for {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def sibling_test_module(name: str) -> ModuleType:
    """A test module of tests/ by file stem, for its helpers (test modules are not on sys.path), loaded once."""
    alias = f"dreambooth_tests_{name}"
    if alias not in sys.modules:
        spec = importlib.util.spec_from_file_location(alias, REPO_ROOT / "tests" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module
        spec.loader.exec_module(module)
    return sys.modules[alias]
