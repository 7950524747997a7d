"""An interpreter laid out like the Windows portable build's ``python_embeded``, built from this venv.

The portable build ships ``python.exe`` with a ``python3XX._pth`` file beside it. A ``._pth`` file
puts CPython in isolated mode: ``PYTHONPATH`` (and every other ``PYTHON*`` variable) is ignored,
and neither the working directory (``-m``, ``-c``) nor a script's folder goes on ``sys.path``;
only the lines of the file do. CPython 3.11+ honours ``._pth`` files on Linux and macOS too, so
the layout is reproduced here: the base interpreter copied into a folder as ``python``, and
``python._pth`` (the executable's name + ``._pth``) listing the standard library, the test venv's
site-packages, any extra folders (ComfyUI's, as users add ``../ComfyUI``) and ``import site``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


class PortablePythonError(RuntimeError):
    """The portable-style interpreter could not be built or does not behave like one."""


def _base_executable() -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.base_prefix) / "bin" / f"python{version}", Path(sys.base_prefix) / "bin" / "python3"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise PortablePythonError(f"no base interpreter found at {', '.join(map(str, candidates))}")


def _stdlib_lines() -> list[str]:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    nodot = f"{sys.version_info.major}{sys.version_info.minor}"
    lib = Path(sys.base_prefix) / "lib"
    stdlib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "installed_base": sys.base_prefix})["stdlib"])
    dynload = stdlib / "lib-dynload"
    return [str(lib / f"python{nodot}.zip"), str(stdlib if stdlib.is_dir() else lib / f"python{version}"),
            str(dynload)]


def build_portable_python(folder: Path, extra_paths: list[Path] | tuple[Path, ...] = ()) -> Path:
    """Write ``folder/python`` + ``folder/python._pth``; return the interpreter's path.

    ``sys.path`` of that interpreter is exactly: the standard library, this venv's site-packages,
    ``extra_paths``, and what ``import site`` adds for them (``.pth`` files in site-packages).
    """
    if os.name == "nt":
        raise PortablePythonError("on Windows use a real embeddable Python; this builder lays out POSIX paths")
    if sys.version_info < (3, 11):
        raise PortablePythonError("CPython honours ._pth files outside Windows from 3.11 on")
    folder.mkdir(parents=True, exist_ok=True)
    python = folder / "python"
    shutil.copy2(_base_executable(), python)
    site_packages = Path(sysconfig.get_paths()["purelib"])
    lines = [*_stdlib_lines(), str(site_packages), *(str(Path(p).resolve()) for p in extra_paths), "import site"]
    (folder / "python._pth").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _check_isolated(python)
    return python


def _check_isolated(python: Path) -> None:
    """The copy must really be in ._pth mode, or the tests built on it prove nothing."""
    probe = ("import json, sys; print(json.dumps({'isolated': sys.flags.isolated, 'path': sys.path}))")
    env = dict(os.environ, PYTHONPATH=str(Path.cwd()))
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise PortablePythonError(f"{python} does not start:\n{proc.stderr[-2000:]}")
    info = json.loads(proc.stdout)
    if info["isolated"] != 1 or str(Path.cwd()) in info["path"] or "" in info["path"]:
        raise PortablePythonError(f"{python} is not isolated by its ._pth file: {info}")
