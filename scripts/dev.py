#!/usr/bin/env python3
"""Developer entry point; needs only a bare `python3` (standard library) on a fresh clone.

    python3 scripts/dev.py test [pytest args...]   lint with ruff, then run the test suite
    python3 scripts/dev.py demo [demo args...]     run scripts/demo.py inside the test environment
    python3 scripts/dev.py env                     set up the environment, print its python

All commands first make sure `<repo>/.venv` exists and holds `requirements/test.txt`. The
requirements are re-installed only when that file (or a file it includes with -r/-c) changes:
a hash of them is kept in `.venv/.requirements-test.sha256`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_DIR = REPO_ROOT / ".venv"
REQUIREMENTS = REPO_ROOT / "requirements" / "test.txt"
STAMP = VENV_DIR / ".requirements-test.sha256"
DEMO = REPO_ROOT / "scripts" / "demo.py"

# Tests never reach the network (the hub is unreachable in CI, and a silent download would
# hide a missing local file), and one BLAS thread per process: on a two-core runner the
# server, the trainer and pytest otherwise oversubscribe the cores and slow down 10-20x.
# diffusers has no offline switch of its own; it obeys huggingface_hub's HF_HUB_OFFLINE.
TEST_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONUNBUFFERED": "1",
}
# Not PYTHONSAFEPATH: children inherit it, and ComfyUI's main.py and `python -m trainer` rely
# on their own folder being on sys.path. tests/conftest.py drops the repo root instead.

USAGE = __doc__.split("\n\n")[1] if __doc__ else ""


def step(message: str) -> None:
    # stderr, so that `python3 scripts/dev.py env` prints nothing but the interpreter path on stdout.
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def venv_python() -> Path:
    if os.name == "nt":
        return VENV_DIR / "Scripts" / "python.exe"
    return VENV_DIR / "bin" / "python"


def requirements_hash(path: Path, seen: set[Path] | None = None) -> str:
    """sha256 over the requirements file and every file it pulls in with -r / -c."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return ""
    seen.add(path)
    digest = hashlib.sha256(path.read_bytes())
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and parts[0] in ("-r", "--requirement", "-c", "--constraint"):
            digest.update(requirements_hash(path.parent / parts[1], seen).encode())
    return digest.hexdigest()


def run(cmd: list[str], env: dict[str, str] | None = None, to_stderr: bool = False) -> int:
    try:
        stdout = sys.stderr if to_stderr else None
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=stdout, check=False).returncode
    except KeyboardInterrupt:
        return 130


def ensure_venv() -> Path:
    python = venv_python()
    if not python.exists():
        step(f"creating virtual environment {VENV_DIR}")
        try:
            venv.EnvBuilder(with_pip=True, clear=VENV_DIR.exists()).create(VENV_DIR)
        except (OSError, subprocess.CalledProcessError) as err:
            sys.exit(
                f"[dev] could not create {VENV_DIR}: {err}\n"
                "[dev] the venv module needs ensurepip; on Debian/Ubuntu: apt-get install python3-venv"
            )
    if not REQUIREMENTS.is_file():
        sys.exit(f"[dev] missing {REQUIREMENTS.relative_to(REPO_ROOT)}")
    wanted = requirements_hash(REQUIREMENTS)
    have = STAMP.read_text(encoding="utf-8").strip() if STAMP.is_file() else ""
    if have == wanted:
        step(f"requirements up to date ({REQUIREMENTS.relative_to(REPO_ROOT)})")
        return python
    step(f"installing {REQUIREMENTS.relative_to(REPO_ROOT)} into {VENV_DIR.name}")
    code = run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
               to_stderr=True)
    if code != 0:
        sys.exit(f"[dev] pip install failed with exit code {code}")
    STAMP.write_text(wanted + "\n", encoding="utf-8")
    return python


def child_env(force: bool) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in TEST_ENV.items():
        if force:
            env[key] = value
        else:
            env.setdefault(key, value)
    return env


def cmd_test(args: list[str]) -> int:
    python = ensure_venv()
    env = child_env(force=True)
    step("ruff check .")
    lint = run([str(python), "-m", "ruff", "check", "."], env)
    step("pytest " + " ".join(args))
    code = run([str(python), "-m", "pytest", *args], env)
    if code == 5:
        step("pytest collected no tests: treating that as a failure")
        return 5
    if code == 0 and lint != 0:
        step(f"tests passed but ruff reported problems (exit {lint})")
        return 1
    step(f"pytest exit code {code}" + ("" if lint == 0 else f", ruff exit code {lint}"))
    return code


def cmd_demo(args: list[str]) -> int:
    if not DEMO.is_file():
        step(f"{DEMO.relative_to(REPO_ROOT)} does not exist yet; nothing to run")
        return 2
    python = ensure_venv()
    step(f"{DEMO.relative_to(REPO_ROOT)} " + " ".join(args))
    return run([str(python), str(DEMO), *args], child_env(force=False))


def cmd_env(args: list[str]) -> int:
    if args:
        sys.exit(f"[dev] env takes no arguments, got: {' '.join(args)}")
    print(ensure_venv())
    return 0


COMMANDS = {"test": cmd_test, "demo": cmd_demo, "env": cmd_env}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"[dev] unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
