#!/usr/bin/env python3
"""Developer entry point; needs only a bare `python3` (standard library) on a fresh clone.

    python3 scripts/dev.py test [--legs LEG,...] [pytest args...]   run the test legs (default: all)
    python3 scripts/dev.py demo [demo args...]     run scripts/demo.py inside the test environment
    python3 scripts/dev.py env [ENV]               set up an environment (default: main), print its python

Test legs, in the order they run (`.ci/run` runs them all):
    lint            ruff, and vermin: the pack's code must run on Python 3.10
    main            the whole suite but the browser tests, newest dependency set (.venv), ComfyUI 0.3.75
    browser         the browser tests (pytest -m browser): the live view driven in headless Chromium
                    with frontend 1.32.9 and the newest (classic canvas and Vue nodes); installs
                    Chromium where it can (root and apt-get), playwright-core with npm into
                    .cache/browser and the newest frontend into .cache/frontend-VERSION; skipped with
                    a notice where Chromium or Node is missing and cannot be installed
    comfyui-0.33    the tests that run ComfyUI itself (pytest -m comfy), but the slow end-to-end
                    workflows the main leg runs, against ComfyUI 0.33.0 read
                    in place from ../shared/comfyui-0.33.0 (.venv-comfyui-0.33); skipped with a
                    notice where ../shared is absent
    transformers4   the suite but the browser and slow end-to-end tests, oldest supported dependency
                    set (.venv-tf4): transformers 4.x (the slow tests run whole workflows whose
                    dependency-sensitive steps the fast tests already cover; the main leg runs them)
Arguments other than --legs go to every pytest leg. Each leg prints a header and a result line, and
a summary closes the run; the exit code is non-zero if any leg failed (pytest collecting no tests
counts as a failure). Where CI is set, a leg that would skip for a missing tool fails instead.

Every environment is a venv beside the repo built from its requirements file; the requirements
are re-installed only when that file (or a file it includes with -r/-c) changes: a hash of them
is kept in `<venv>/.requirements-<file name>.sha256` (for .venv: `.requirements-test.sha256`).
.venv-tf4 and .venv-comfyui-0.33 hard-link their large files that are identical to .venv's (torch).
"""

from __future__ import annotations

import filecmp
import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import venv
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS_DIR = REPO_ROOT / "requirements"
DEMO = REPO_ROOT / "scripts" / "demo.py"
SUPPORT_LOADER = REPO_ROOT / "scripts" / "support_loader.py"

# Read in place, never copied into the project; the leg keeps every write out of it (see
# tests/support/comfyui.py). CI provides ../shared; a clone without it skips that leg.
SHARED_DIR = REPO_ROOT.parent / "shared"
COMFYUI_033_DIR = SHARED_DIR / "comfyui-0.33.0"

# What vermin checks: every Python file of the pack and its tooling, not the venvs or caches.
VERMIN_PATHS = ("__init__.py", "nodes", "trainer", "scripts", "benchmarks", "tests")

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

USAGE = __doc__.split("\n\n", 1)[1] if __doc__ else ""


@dataclass(frozen=True)
class VenvSpec:
    """A virtual environment beside the repo and the requirements it is built from."""

    name: str
    venv_dir: Path
    requirements: Path
    # Installed with --no-deps after `requirements`: packages whose own pins would pull in a
    # different torch (torchaudio).
    no_deps: Path | None = None
    # A venv whose identical files this one hard-links to instead of keeping copies (the same torch).
    shares_files_with: Path | None = None

    @property
    def stamp(self) -> Path:
        return self.venv_dir / f".requirements-{self.requirements.stem}.sha256"

    @property
    def python(self) -> Path:
        return _venv_bin(self.venv_dir, "python")

    def tool(self, name: str) -> Path:
        return _venv_bin(self.venv_dir, name)


MAIN_VENV = REPO_ROOT / ".venv"
ENVS = {
    "main": VenvSpec("main", MAIN_VENV, REQUIREMENTS_DIR / "test.txt"),
    "transformers4": VenvSpec("transformers4", REPO_ROOT / ".venv-tf4",
                             REQUIREMENTS_DIR / "test-transformers4.txt", shares_files_with=MAIN_VENV),
    "comfyui-0.33": VenvSpec("comfyui-0.33", REPO_ROOT / ".venv-comfyui-0.33",
                            REQUIREMENTS_DIR / "test-comfyui-0.33.txt",
                            REQUIREMENTS_DIR / "test-comfyui-0.33-nodeps.txt", shares_files_with=MAIN_VENV),
}


class EnvError(RuntimeError):
    """An environment could not be created or its requirements not installed."""


def step(message: str) -> None:
    # stderr, so that `python3 scripts/dev.py env` prints nothing but the interpreter path on stdout.
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def _venv_bin(venv_dir: Path, name: str) -> Path:
    if os.name == "nt":
        return venv_dir / "Scripts" / (name + ".exe")
    return venv_dir / "bin" / name


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


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


def env_hash(env: VenvSpec) -> str:
    if env.no_deps is None:
        return requirements_hash(env.requirements)  # unchanged for .venv: no needless reinstall
    digest = hashlib.sha256(requirements_hash(env.requirements).encode())
    digest.update(b"\0--no-deps\0" + requirements_hash(env.no_deps).encode())
    return digest.hexdigest()


def run(cmd: list[str | Path], env: dict[str, str] | None = None, to_stderr: bool = False) -> int:
    try:
        stdout = sys.stderr if to_stderr else None
        return subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, env=env, stdout=stdout,
                              check=False).returncode
    except KeyboardInterrupt:
        return 130


def ensure_env(env: VenvSpec) -> Path:
    """Create `env`'s venv if needed and install its requirements if they changed; return its python."""
    for path in (env.requirements, env.no_deps):
        if path is not None and not path.is_file():
            raise EnvError(f"missing {_rel(path)} (needed for the {env.name} environment)")
    if not env.python.exists():
        step(f"creating virtual environment {_rel(env.venv_dir)}")
        try:
            venv.EnvBuilder(with_pip=True, clear=env.venv_dir.exists()).create(env.venv_dir)
        except (OSError, subprocess.CalledProcessError) as err:
            raise EnvError(
                f"could not create {env.venv_dir}: {err}\n"
                "[dev] the venv module needs ensurepip; on Debian/Ubuntu: apt-get install python3-venv"
            ) from err
    wanted = env_hash(env)
    have = env.stamp.read_text(encoding="utf-8").strip() if env.stamp.is_file() else ""
    if have == wanted:
        step(f"requirements up to date ({_rel(env.requirements)} in {_rel(env.venv_dir)})")
        return env.python
    pip = [env.python, "-m", "pip", "install", "--disable-pip-version-check"]
    t0 = time.monotonic()
    step(f"installing {_rel(env.requirements)} into {_rel(env.venv_dir)}")
    code = run([*pip, "-r", env.requirements], to_stderr=True)
    if code == 0 and env.no_deps is not None:
        step(f"installing {_rel(env.no_deps)} into {_rel(env.venv_dir)} without dependencies")
        code = run([*pip, "--no-deps", "-r", env.no_deps], to_stderr=True)
    if code != 0:
        raise EnvError(f"pip install into {_rel(env.venv_dir)} failed with exit code {code}")
    if env.shares_files_with is not None:
        share_identical_files(env.venv_dir, env.shares_files_with)
    env.stamp.write_text(wanted + "\n", encoding="utf-8")
    step(f"{_rel(env.venv_dir)} ready in {time.monotonic() - t0:.0f} s")
    return env.python


# Files below this size are left alone: the bytes are in torch, its CUDA libraries and triton.
SHARE_MIN_BYTES = 1 << 20


def share_identical_files(venv_dir: Path, reference_dir: Path) -> int:
    """Hard-link every large file of `venv_dir` that is byte-for-byte the file at the same place in
    `reference_dir`; return the bytes saved.

    Every environment pins the same torch, and a CUDA build of torch with its libraries is ~5.5 GB:
    three copies of it filled a CI runner's disk. pip never writes into an installed file (it unlinks
    before writing, and uninstalls by unlinking), so a later install into either venv breaks the
    sharing for that file instead of changing the other venv.
    """
    if not reference_dir.is_dir() or venv_dir.resolve() == reference_dir.resolve():
        return 0
    saved = 0
    try:
        for root, _dirs, files in os.walk(venv_dir):
            for name in files:
                path = Path(root, name)
                twin = reference_dir / path.relative_to(venv_dir)
                if path.is_symlink() or twin.is_symlink() or not twin.is_file():
                    continue
                size = path.stat().st_size
                if (size < SHARE_MIN_BYTES or size != twin.stat().st_size or path.samefile(twin)
                        or not filecmp.cmp(path, twin, shallow=False)):
                    continue
                temporary = path.with_name(name + ".dev-link")
                os.link(twin, temporary)
                os.replace(temporary, path)
                saved += size
    except OSError as err:  # no hard links on this file system: each venv keeps its own copy
        step(f"could not share files of {_rel(venv_dir)} with {_rel(reference_dir)} ({err}); "
             "each keeps its own copy")
    if saved:
        step(f"{_rel(venv_dir)} shares {saved / 2**30:.1f} GB of identical files with {_rel(reference_dir)}")
    return saved


def child_env(force: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in TEST_ENV.items():
        if force:
            env[key] = value
        else:
            env.setdefault(key, value)
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- test legs


@dataclass
class LegResult:
    status: str  # "passed" | "failed" | "skipped"
    detail: str = ""
    seconds: float = 0.0


def _pytest(python: Path, args: list[str], env: dict[str, str]) -> LegResult:
    step("pytest " + " ".join(args))
    # The slowest tests in every log: what to look at first when CI time grows.
    code = run([python, "-m", "pytest", "--durations=15", *args], env)
    if code == 0:
        return LegResult("passed")
    if code == 5:
        return LegResult("failed", "pytest collected no tests (exit 5), treated as a failure; --legs picks the legs to run")
    return LegResult("failed", f"pytest exit code {code}")


def leg_lint(pytest_args: list[str]) -> LegResult:
    python = ensure_env(ENVS["main"])
    env = child_env(force=True)
    step("ruff check .")
    ruff = run([python, "-m", "ruff", "check", "."], env)
    vermin_cmd = [ENVS["main"].tool("vermin"), "--target=3.10-", "--violations", "--eval-annotations",
                  "--no-tips", *VERMIN_PATHS]
    step(" ".join(["vermin", *map(str, vermin_cmd[1:])]))
    vermin_code = run(vermin_cmd, env)
    failed = [f"{tool} exit code {code}" for tool, code in (("ruff", ruff), ("vermin", vermin_code)) if code]
    return LegResult("failed", ", ".join(failed)) if failed else LegResult("passed", "ruff and vermin clean")


# The browser tests have a leg of their own (they need Chromium and Node); a later `-m` in the
# user's arguments overrides these.
NOT_BROWSER = ["-m", "not browser"]


def leg_main(pytest_args: list[str]) -> LegResult:
    return _pytest(ensure_env(ENVS["main"]), [*NOT_BROWSER, *pytest_args], child_env(force=True))


def leg_transformers4(pytest_args: list[str]) -> LegResult:
    # CI time: the slow end-to-end tests (whole workflows, the portable-Python launch) run once, in
    # the main leg; the fast tests already cover every step that depends on the transformers version.
    return _pytest(ensure_env(ENVS["transformers4"]), ["-m", "not browser and not slow", *pytest_args],
                   child_env(force=True))


def _is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def leg_comfyui_033(pytest_args: list[str]) -> LegResult:
    if not (COMFYUI_033_DIR / "main.py").is_file():
        if SHARED_DIR.is_dir() and _is_ci():
            return LegResult("failed", f"CI is set and {SHARED_DIR} exists, but {COMFYUI_033_DIR} holds no "
                                       "main.py: the ComfyUI 0.33.0 leg must run in CI")
        return LegResult("skipped", f"{COMFYUI_033_DIR} not found (it comes with ../shared); "
                                    "the real-server tests run against ComfyUI 0.3.75 only, in the main leg")
    python = ensure_env(ENVS["comfyui-0.33"])
    env = child_env(force=True, extra={"COMFYUI_PATH": str(COMFYUI_033_DIR)})
    # `-m comfy`: the tests that start a server or load files with ComfyUI's own code (nodes,
    # example workflows, LoRA compatibility); the rest never touch ComfyUI, the main leg covers
    # them. The slow ones (the longest workflows: sweeps of several trainings, SDXL end to end) run
    # in the main leg only: the faster workflow tests already drive every node on this version.
    # A later `-m` in the user's arguments overrides this one.
    return _pytest(python, ["-m", "comfy and not browser and not slow", *pytest_args], env)


def browser_support() -> ModuleType:
    """tests/support/browser.py (standard library only), loaded the way the test suite loads it."""
    spec = importlib.util.spec_from_file_location("dreambooth_scripts_support_loader", SUPPORT_LOADER)
    assert spec is not None and spec.loader is not None
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    loader.load_test_support()
    return importlib.import_module(f"{loader.PACKAGE}.browser")


def _missing_tool(what: str, fix: str) -> LegResult:
    if _is_ci():
        return LegResult("failed", f"CI is set and {what}: the browser leg must run in CI; {fix}")
    for line in ("!" * 78, f"browser leg SKIPPED: {what}", f"to run it: {fix}", "!" * 78):
        step(line)
    return LegResult("skipped", f"{what}; {fix}")


def leg_browser(pytest_args: list[str]) -> LegResult:
    python = ensure_env(ENVS["main"])
    browser = browser_support()
    t0 = time.monotonic()
    try:
        chromium = browser.find_chromium()
        if chromium is None:
            if not browser.can_install_chromium():
                return _missing_tool("no Chromium on PATH and no way to install it (needs root and apt-get)",
                                     f"install chromium, or set {browser.CHROMIUM_ENV} to a Chromium executable")
            step("no Chromium on PATH: apt-get install -y --no-install-recommends chromium")
            chromium = browser.install_chromium()
        if browser.node_executable() is None:
            return _missing_tool("Node.js is not on PATH", "install Node.js 18 or later (with npm)")
        step(f"Chromium: {chromium}")
        step(f"playwright-core {browser.PLAYWRIGHT_CORE_VERSION}: {_rel(browser.ensure_playwright_core())}")
        frontend = browser.ensure_frontend(browser.NEW_FRONTEND_VERSION, python)
        step(f"comfyui-frontend-package {browser.NEW_FRONTEND_VERSION}: {_rel(frontend)}")
    except browser.BrowserSetupError as err:
        return LegResult("failed", str(err))
    step(f"browser tools ready in {time.monotonic() - t0:.0f} s")
    env = child_env(force=True, extra={browser.CHROMIUM_ENV: chromium})
    # -raP: the passed tests' output too, for each frontend's timings and screenshot paths; the
    # screenshots are kept (the other legs delete a passed test's files, see pyproject.toml).
    return _pytest(python, ["-m", "browser", "-raP", "-o", "tmp_path_retention_policy=all", *pytest_args], env)


LEGS = {
    "lint": leg_lint,
    "main": leg_main,
    "browser": leg_browser,
    "comfyui-0.33": leg_comfyui_033,
    "transformers4": leg_transformers4,
}


def parse_test_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Split `dev.py test` arguments into the legs to run and the arguments for pytest."""
    legs: list[str] | None = None
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--legs" or arg.startswith("--legs="):
            value = arg.partition("=")[2] if "=" in arg else next(it, "")
            names = [name.strip() for name in value.split(",") if name.strip()]
            unknown = [name for name in names if name not in LEGS]
            if not names or unknown:
                sys.exit(f"[dev] --legs takes a comma-separated list of {', '.join(LEGS)}; "
                         f"got {value!r}")
            legs = (legs or []) + [name for name in names if name not in (legs or [])]
        else:
            rest.append(arg)
    # Keep the documented order whatever order they were asked in: lint first fails fastest.
    chosen = [name for name in LEGS if legs is None or name in legs]
    return chosen, rest


def cmd_test(args: list[str]) -> int:
    if args in (["-h"], ["--help"]):
        print(USAGE)  # pytest's own help: `dev.py test --legs main --help`
        return 0
    legs, pytest_args = parse_test_args(args)
    results: dict[str, LegResult] = {}
    for name in legs:
        print(f"\n{'=' * 30} leg {name} {'=' * 30}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            result = LEGS[name](pytest_args)
        except EnvError as err:
            result = LegResult("failed", str(err))
        except KeyboardInterrupt:
            result = LegResult("failed", "interrupted")
        result.seconds = time.monotonic() - t0
        results[name] = result
        step(f"leg {name}: {result.status} in {result.seconds:.0f} s" + (f" ({result.detail})" if result.detail else ""))
        # A full disk fails a test far from its cause: each leg's log says how much is left.
        step(f"disk: {shutil.disk_usage(REPO_ROOT).free / 2**30:.1f} GB free")
        if result.detail == "interrupted":
            break
    print(f"\n{'=' * 30} summary {'=' * 30}", file=sys.stderr, flush=True)
    for name, result in results.items():
        line = f"{name:<14} {result.status.upper():<8} {result.seconds:7.0f} s"
        step(line + (f"  {result.detail}" if result.detail else ""))
    failed = [name for name, result in results.items() if result.status == "failed"]
    step(f"failed legs: {', '.join(failed)}" if failed else "all legs passed or were skipped")
    return 1 if failed else 0


def cmd_demo(args: list[str]) -> int:
    if not DEMO.is_file():
        step(f"{_rel(DEMO)} does not exist yet; nothing to run")
        return 2
    python = ensure_env(ENVS["main"])
    step(f"{_rel(DEMO)} " + " ".join(args))
    return run([python, DEMO, *args], child_env(force=False))


def cmd_env(args: list[str]) -> int:
    if len(args) > 1 or (args and args[0] not in ENVS):
        sys.exit(f"[dev] env takes at most one of {', '.join(ENVS)}, got: {' '.join(args)}")
    print(ensure_env(ENVS[args[0] if args else "main"]))
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
    try:
        return command(argv[1:])
    except EnvError as err:
        sys.exit(f"[dev] {err}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
