"""What the real-browser tests need besides the test venv: Chromium, playwright-core and a newer frontend.

- Chromium: the one on PATH (``DREAMBOOTH_CHROMIUM`` names another); ``install_chromium()`` installs
  the distribution's package where that is possible (root and apt-get, as on a fresh CI runner).
- playwright-core (Node), pinned, installed with npm into ``<cache>/browser/node_modules``; it drives
  the browser from the scripts in ``tests/browser/``. Only the library: it brings no browser of its own.
- The newest ComfyUI frontend, pinned, installed with pip ``--target`` into ``<cache>/frontend-<version>``
  and served with ComfyUI's ``--front-end-root``; the venv keeps the frontend ComfyUI itself pins.

Standard library only: ``scripts/dev.py`` loads this before any venv exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .paths import CACHE_DIR

PLAYWRIGHT_CORE_VERSION = "1.65.2"
# The newest frontend published; ComfyUI 0.3.75 itself pins 1.32.9 (installed in the venv).
NEW_FRONTEND_VERSION = "1.58.1"
NODE_DIR = CACHE_DIR / "browser"
CHROMIUM_ENV = "DREAMBOOTH_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserSetupError(RuntimeError):
    """Chromium, Node, playwright-core or the frontend package could not be found or installed."""


def find_chromium() -> str | None:
    """The Chromium to drive: ``$DREAMBOOTH_CHROMIUM``, else the first of CHROMIUM_NAMES on PATH."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        if not Path(named).is_file():
            raise BrowserSetupError(f"{CHROMIUM_ENV}={named!r} is not a file: point it at a Chromium "
                                    "executable or unset it to use chromium from PATH")
        return named
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def can_install_chromium() -> bool:
    return os.name == "posix" and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def install_chromium() -> str:
    """Install Debian/Ubuntu's chromium package (needs root and apt-get); return the executable."""
    if not can_install_chromium():
        raise BrowserSetupError("installing Chromium needs root and apt-get; install it yourself "
                                f"(e.g. `apt-get install chromium`) or set {CHROMIUM_ENV}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    # A fresh runner's package lists may be stale or empty: refresh them only when the install fails.
    if subprocess.run(install, env=env, check=False).returncode != 0:
        for cmd in (["apt-get", "update"], install):
            code = subprocess.run(cmd, env=env, check=False).returncode
            if code != 0:
                raise BrowserSetupError(f"`{' '.join(cmd)}` exited with code {code}")
    found = find_chromium()
    if found is None:
        raise BrowserSetupError("apt-get installed chromium but no chromium executable is on PATH")
    return found


def node_executable() -> str | None:
    return shutil.which("node")


def node_modules() -> Path | None:
    """``node_modules`` holding playwright-core at the pinned version, if it is installed."""
    package = NODE_DIR / "node_modules" / "playwright-core" / "package.json"
    try:
        version = json.loads(package.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None
    return package.parents[1] if version == PLAYWRIGHT_CORE_VERSION else None


def ensure_playwright_core() -> Path:
    """Install playwright-core (pinned) with npm unless it is there already; return its node_modules."""
    found = node_modules()
    if found is not None:
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise BrowserSetupError("npm is not on PATH: install Node.js 18 or later (it brings npm)")
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR),
           f"playwright-core@{PLAYWRIGHT_CORE_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = node_modules()
    if proc.returncode != 0 or found is None:
        raise BrowserSetupError(f"`npm install playwright-core@{PLAYWRIGHT_CORE_VERSION}` exited with code "
                                f"{proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return found


def tools_or_skip() -> dict[str, object]:
    """Chromium, Node and playwright-core for a browser test, or a pytest skip saying how to get them
    (the browser leg makes a missing one a failure in CI)."""
    import pytest

    chromium = find_chromium()
    node = node_executable()
    if chromium is None or node is None:
        pytest.skip("needs Chromium and Node on PATH: `python3 scripts/dev.py test --legs browser` installs "
                    f"Chromium where it can, or set {CHROMIUM_ENV}")
    return {"chromium": chromium, "node": node, "node_modules": ensure_playwright_core()}


def frontend_root(version: str = NEW_FRONTEND_VERSION) -> Path:
    """The folder to pass to ComfyUI's ``--front-end-root`` for ``version`` (may not exist yet)."""
    return CACHE_DIR / f"frontend-{version}" / "comfyui_frontend_package" / "static"


def ensure_frontend(version: str = NEW_FRONTEND_VERSION, python: str | Path | None = None) -> Path:
    """Install comfyui-frontend-package==version (no dependencies) into the cache unless it is there."""
    root = frontend_root(version)
    if (root / "index.html").is_file():
        return root
    target = root.parents[1]
    if target.exists():
        shutil.rmtree(target)  # a half-finished install
    cmd = [str(python or sys.executable), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), f"comfyui-frontend-package=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (root / "index.html").is_file():
        raise BrowserSetupError(f"`pip install comfyui-frontend-package=={version}` exited with code "
                                f"{proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return root


# Headless Chromium as the browser tests start it: no GPU, sandbox, or background traffic of its own.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def run_node_script(node: str, script: Path, node_modules: Path, config: dict[str, object], work: Path,
                    timeout: float) -> dict[str, object]:
    """Run a ``tests/browser/*.cjs`` driver on ``config`` (it writes its JSON report to ``config["result"]``).

    The driver runs in its own process group, killed with its browser if it overruns. Returns the
    report with the driver's output added as ``driver_log``; raises AssertionError when it wrote none.
    """
    import signal  # noqa: PLC0415 - only the drivers need it

    result_path = work / "result.json"
    cfg_path = work / "driver.json"
    cfg_path.write_text(json.dumps({**config, "result": str(result_path)}), encoding="utf-8")
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    log_path = work / "driver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([node, str(script), str(cfg_path)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # killed below; the report it wrote so far (if any) says how far it came
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    if not result_path.is_file():
        raise AssertionError(f"{script.name} exited {proc.returncode} without a report:\n{log_text[-4000:]}")
    report: dict[str, object] = json.loads(result_path.read_text(encoding="utf-8"))
    report["driver_log"] = log_text
    return report
