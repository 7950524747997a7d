"""scripts/dev.py: leg selection, the venv stamp mechanism, when the ComfyUI 0.33.0 and browser legs may
skip, and which tests each leg selects.

The environments here are stand-ins (a venv with an empty requirements file): the real ones hold
torch and take minutes to build.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

DEV = Path(__file__).resolve().parents[1] / "scripts" / "dev.py"


@pytest.fixture(scope="module")
def dev() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dreambooth_scripts_dev", DEV)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_all_legs_by_default_in_order_and_the_rest_goes_to_pytest(dev: ModuleType) -> None:
    assert dev.parse_test_args([]) == (["lint", "main", "browser", "comfyui-0.33", "transformers4"], [])
    assert dev.parse_test_args(["-k", "lora", "-x"]) == (list(dev.LEGS), ["-k", "lora", "-x"])
    assert dev.parse_test_args(["--legs", "main,lint", "tests/test_data.py"]) == (
        ["lint", "main"], ["tests/test_data.py"])
    assert dev.parse_test_args(["-q", "--legs=comfyui-0.33"]) == (["comfyui-0.33"], ["-q"])
    assert dev.parse_test_args(["--legs", "lint,"]) == (["lint"], [])


@pytest.mark.parametrize("value", ["mian", "", ",", "lint,tf4"])
def test_unknown_or_empty_leg_is_refused(dev: ModuleType, value: str) -> None:
    with pytest.raises(SystemExit, match="--legs takes"):
        dev.parse_test_args(["--legs", value])


def test_venv_is_created_stamped_reused_and_refreshed_when_an_included_file_changes(
    dev: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = tmp_path / "inner.txt"
    inner.write_text("# nothing to install yet\n", encoding="utf-8")
    outer = tmp_path / "test-standin.txt"
    outer.write_text("-r inner.txt\n", encoding="utf-8")
    spec = dev.VenvSpec("standin", tmp_path / "venv dir", outer)
    installs: list[list[str]] = []
    real_run = dev.run

    def counting_run(cmd: list[str | Path], env: dict[str, str] | None = None, to_stderr: bool = False) -> int:
        if "install" in map(str, cmd):
            installs.append([str(c) for c in cmd])
        return real_run(cmd, env, to_stderr)

    monkeypatch.setattr(dev, "run", counting_run)

    python = dev.ensure_env(spec)
    assert python == spec.python and python.is_file()
    assert spec.stamp.name == ".requirements-test-standin.sha256"
    assert spec.stamp.read_text(encoding="utf-8").strip() == dev.requirements_hash(outer)
    assert len(installs) == 1

    dev.ensure_env(spec)
    assert len(installs) == 1, "an unchanged requirements set must not run pip again"

    inner.write_text("# still nothing, but a different file\n", encoding="utf-8")
    dev.ensure_env(spec)
    assert len(installs) == 2, "a change in a -r included file must reinstall"
    assert spec.stamp.read_text(encoding="utf-8").strip() == dev.requirements_hash(outer)


def test_a_missing_requirements_file_fails_the_leg_not_the_run(dev: ModuleType, tmp_path: Path) -> None:
    spec = dev.VenvSpec("standin", tmp_path / "venv", tmp_path / "test-transformers4.txt")
    with pytest.raises(dev.EnvError, match="missing .*test-transformers4.txt"):
        dev.ensure_env(spec)
    assert not spec.venv_dir.exists()


def test_the_comfyui_033_leg_skips_only_without_shared(dev: ModuleType, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    monkeypatch.setattr(dev, "SHARED_DIR", shared)
    monkeypatch.setattr(dev, "COMFYUI_033_DIR", shared / "comfyui-0.33.0")

    for ci in ("", "true"):
        monkeypatch.setenv("CI", ci)
        result = dev.leg_comfyui_033([])
        assert result.status == "skipped" and "not found" in result.detail

    shared.mkdir()
    monkeypatch.setenv("CI", "true")
    result = dev.leg_comfyui_033([])
    assert result.status == "failed" and "must run in CI" in result.detail
    monkeypatch.delenv("CI")
    assert dev.leg_comfyui_033([]).status == "skipped"


def test_the_browser_leg_skips_only_without_chromium_or_node_and_fails_in_ci(
        dev: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "ensure_env", lambda env: Path(sys.executable))  # the real one takes minutes
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium, no apt-get to install it, no node
    monkeypatch.delenv("DREAMBOOTH_CHROMIUM", raising=False)
    monkeypatch.setenv("CI", "")
    result = dev.leg_browser([])
    assert result.status == "skipped" and "no Chromium" in result.detail
    monkeypatch.setenv("CI", "true")
    result = dev.leg_browser([])
    assert result.status == "failed" and "must run in CI" in result.detail

    # Chromium named, but no Node.
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n", encoding="utf-8")
    chromium.chmod(0o755)
    monkeypatch.setenv("DREAMBOOTH_CHROMIUM", str(chromium))
    result = dev.leg_browser([])
    assert result.status == "failed" and "Node.js" in result.detail
    monkeypatch.setenv("CI", "")
    assert dev.leg_browser([]).status == "skipped"


def test_only_the_browser_leg_runs_the_browser_tests(dev: ModuleType, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_pytest(python: Path, args: list[str], env: dict[str, str]) -> object:
        seen.append(args)
        return dev.LegResult("passed")

    monkeypatch.setattr(dev, "ensure_env", lambda env: Path(sys.executable))
    monkeypatch.setattr(dev, "_pytest", fake_pytest)
    comfyui = tmp_path / "comfyui-0.33.0"
    comfyui.mkdir()
    (comfyui / "main.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(dev, "COMFYUI_033_DIR", comfyui)
    for name in ("main", "comfyui-0.33", "transformers4"):
        dev.LEGS[name](["-k", "lora"])
    assert [args[args.index("-m") + 1] for args in seen] == ["not browser", "comfy and not browser and not slow",
                                                             "not browser and not slow"]
    assert all(args[-2:] == ["-k", "lora"] for args in seen), "the user's arguments come last, so their -m wins"

    # The expressions against the real markers: the browser tests carry `browser` and nothing else selects them.
    browser_tests = str(DEV.parents[1] / "tests" / "test_browser_live_view.py")
    for expression, collected in (("browser", True), ("not browser", False),
                                  ("comfy and not browser and not slow", False)):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", expression, browser_tests],
                              capture_output=True, text=True, timeout=120, check=False, cwd=DEV.parents[1])
        assert proc.returncode == (0 if collected else 5), (expression, proc.stdout[-2000:], proc.stderr[-2000:])


def test_pytest_collecting_nothing_fails_the_leg(dev: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    env = dict(os.environ)
    result = dev._pytest(Path(sys.executable), [str(tmp_path / "empty"), "-q", "-p", "no:cacheprovider"], env)
    assert result.status == "failed" and "exit 5" in result.detail


def test_a_failing_leg_makes_the_run_fail_and_the_other_legs_still_run(dev: ModuleType) -> None:
    # `dev.py test --legs ...` end to end in a child, with stand-in legs: the real ones take minutes.
    code = (
        "import sys, runpy, pathlib;"
        f"mod = runpy.run_path({str(DEV)!r}, run_name='dev_child');"
        "mod['LEGS']['main'] = lambda args: mod['LegResult']('failed', 'stand-in failure');"
        "mod['LEGS']['comfyui-0.33'] = lambda args: mod['LegResult']('skipped', 'stand-in skip');"
        "sys.exit(mod['main'](['test', '--legs', 'main,comfyui-0.33']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "leg main" in proc.stderr and "leg comfyui-0.33" in proc.stderr
    summary = proc.stderr.split("summary", 1)[1]
    assert "main" in summary and "FAILED" in summary and "SKIPPED" in summary
    assert "failed legs: main" in summary


def test_identical_large_files_of_two_venvs_become_one_file(dev: ModuleType, tmp_path: Path) -> None:
    """What the leg venvs share with .venv: large files with the same place and bytes, nothing else."""
    big = dev.SHARE_MIN_BYTES
    files = {
        "lib/torch/lib/libtorch.so": (b"t" * big, b"t" * big),  # the same: shared
        "lib/torch/lib/other.so": (b"a" * big, b"a" * (big - 1) + b"b"),  # same size, other bytes
        "lib/torch/small.py": (b"x", b"x"),  # too small to bother
        "lib/only_here.so": (b"o" * big, None),
    }
    venv, reference = tmp_path / "leg venv", tmp_path / "main venv"
    for rel, (mine, theirs) in files.items():
        (venv / rel).parent.mkdir(parents=True, exist_ok=True)
        (venv / rel).write_bytes(mine)
        if theirs is not None:
            (reference / rel).parent.mkdir(parents=True, exist_ok=True)
            (reference / rel).write_bytes(theirs)
    assert dev.share_identical_files(venv, reference) == big
    assert (venv / "lib/torch/lib/libtorch.so").samefile(reference / "lib/torch/lib/libtorch.so")
    for rel in ("lib/torch/lib/other.so", "lib/torch/small.py"):
        assert not (venv / rel).samefile(reference / rel), rel
    for rel, (mine, _theirs) in files.items():
        assert (venv / rel).read_bytes() == mine, rel  # no file changed its contents
    assert not list(venv.rglob("*.dev-link"))
    assert dev.share_identical_files(venv, reference) == 0  # already shared: nothing more to do
