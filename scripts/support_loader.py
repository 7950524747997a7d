"""Import ``tests/support`` (the real-ComfyUI harness and tiny-model builders) from a script.

It is loaded as the package ``dreambooth_test_support`` from its file path, as the test suite's
conftest does: the repo root must never go on sys.path, where its ``nodes/`` would shadow
ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "dreambooth_test_support"
SUPPORT = Path(__file__).resolve().parents[1] / "tests" / "support"


def load_test_support() -> ModuleType:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, SUPPORT / "__init__.py",
                                                  submodule_search_locations=[str(SUPPORT)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module
