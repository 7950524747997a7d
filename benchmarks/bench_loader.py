"""Loading this repository's modules from their files, for the benchmark scripts.

The scripts run as ``python benchmarks/<script>.py`` (so this folder is on sys.path) and must keep
the repo root off it, where the pack's ``nodes/`` would shadow ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_by_path(name: str, path: Path, package: bool = False) -> ModuleType:
    """Import the module (or, with ``package``, the package whose ``__init__.py`` is ``path``) as ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
