"""The launcher (spawn, hello check, pipes, exit messages) and the loss-curve picture, without ComfyUI.

The real engine is started as a child process here; an impostor `trainer` package in a temporary
folder stands in for the unrelated PyPI package of the same name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from comfyui_dreambooth_lora.trainer import ENGINE_NAME
from comfyui_dreambooth_lora.trainer.launcher import (
    PACK_ROOT,
    TrainerLaunchError,
    TrainerProcess,
    WarmTrainerPool,
    child_env,
    describe_exit,
    format_command,
    interpreter_flags,
    trainer_command,
    verify_hello,
)
from comfyui_dreambooth_lora.trainer.plots import render_loss_curve, smooth
from comfyui_dreambooth_lora.trainer.protocol import EXIT_CONFIG, EXIT_DATA, EXIT_INTERNAL, EXIT_OK
from dreambooth_test_support.portable_python import build_portable_python

REPO = Path(__file__).resolve().parents[1]


def events_until_exit(proc: TrainerProcess, timeout: float = 60.0) -> list[dict]:
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while not (proc.stdout_closed and proc.poll() is not None):
        assert time.monotonic() < deadline, f"no exit; log:\n{proc.stderr_tail()}"
        event = proc.next_event(0.2)
        if event is not None:
            events.append(event)
    return events


def test_the_real_engine_says_hello_and_reports_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "run config ü.json"
    config.write_text(json.dumps({"pretrained_model": "m.safetensors", "rank": 0}), encoding="utf-8")
    assert PACK_ROOT == REPO.resolve()
    with TrainerProcess(config, log_path=tmp_path / "logs" / "trainer.log") as proc:
        events = events_until_exit(proc)
        assert proc.wait() == EXIT_CONFIG
    hello, *rest = events
    verify_hello(hello)  # the pack's own engine passes
    assert hello["engine"] == ENGINE_NAME and hello["pid"] == proc.pid
    error = rest[-1]
    assert error["type"] == "error" and error["kind"] == "config"
    assert "trainer started" in (tmp_path / "logs" / "trainer.log").read_text(encoding="utf-8")
    message = describe_exit(EXIT_CONFIG, error, proc.stderr_tail())
    assert message.startswith("the trainer rejected its configuration: config '")


def fake_engine(root: Path, main_source: str) -> Path:
    """A package `trainer` under ``root`` whose ``__main__`` is ``main_source``: a stand-in engine."""
    package = root / "trainer"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "__main__.py").write_text(main_source, encoding="utf-8")
    return package / "__main__.py"


# Says hello and waits on stdin like a warm trainer, without importing torch.
WAITING_ENGINE = ("import json, os, sys\n"
                  "print(json.dumps({'type': 'hello', 'engine': 'x', 'package_dir': os.path.dirname(__file__)}), flush=True)\n"
                  "sys.stdin.read()\n")


def test_an_impostor_trainer_package_is_recognised(tmp_path: Path) -> None:
    fake_engine(tmp_path, "import json, os\n"
                "print('Trainer 3.0 - coqui TTS trainer')\n"
                "print(json.dumps({'type': 'hello', 'engine': 'tts-trainer', 'package_dir': os.path.dirname(__file__)}))\n")
    with TrainerProcess(tmp_path / "run.json", log_path=tmp_path / "t.log", pack_root=tmp_path) as proc:
        events = events_until_exit(proc, timeout=30)
        assert proc.wait() == 0
        assert "[stdout] Trainer 3.0" in proc.stderr_tail(), "non-protocol stdout is kept for the error message"
    assert [e["type"] for e in events] == ["hello"]
    with pytest.raises(TrainerLaunchError, match="Another package named 'trainer'"):
        verify_hello(events[0], tmp_path)
    with pytest.raises(TrainerLaunchError, match="not 'hello'"):
        verify_hello({"type": "status"}, tmp_path)


def wait_for_event(proc: TrainerProcess, kind: str, timeout: float = 120.0) -> list[dict]:
    """Events up to and including the first of type ``kind``."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while not events or events[-1]["type"] != kind:
        assert time.monotonic() < deadline and not proc.stdout_closed, f"no {kind!r}; log:\n{proc.stderr_tail()}"
        event = proc.next_event(0.2)
        if event is not None:
            events.append(event)
    return events


def test_a_warm_trainer_imports_first_then_takes_its_run_from_stdin(tmp_path: Path) -> None:
    proc = TrainerProcess(None, log_path=None)
    with proc:
        assert proc.warm
        hello, ready = wait_for_event(proc, "ready")
        verify_hello(hello)
        assert ready["import_s"] > 0.5, "torch, diffusers and transformers are imported before the run is known"
        assert proc.poll() is None, "and then it waits"
        config = tmp_path / "run.json"
        config.write_text(json.dumps({"pretrained_model": "m.safetensors", "instance_data_dir": "photos", "instance_prompt": "a photo of sks dog", "output_dir": str(tmp_path / "out"),
                                      "rank": 0}), encoding="utf-8")
        assert proc.begin(config, log_path=tmp_path / "logs" / "trainer.log")
        rest = events_until_exit(proc)
        assert proc.wait() == EXIT_CONFIG
    assert rest[-1]["type"] == "error" and rest[-1]["kind"] == "config" and rest[-1]["key"] == "rank", rest
    log = (tmp_path / "logs" / "trainer.log").read_text(encoding="utf-8")
    assert "warm trainer (started" in log
    assert log.index("waiting for the run's config") < log.index("config 'rank'"), \
        "the warm start's own log lines are kept, at the top of the run's log"


def test_a_warm_trainer_without_a_run_exits_quietly_and_a_bad_line_is_a_config_error() -> None:
    with TrainerProcess(None, log_path=None) as idle:
        wait_for_event(idle, "ready")
        idle.close_stdin()
        assert [e["type"] for e in events_until_exit(idle)] == []
        assert idle.wait() == EXIT_OK
    with TrainerProcess(None, log_path=None) as confused:
        wait_for_event(confused, "ready")
        assert confused._write_stdin("stop\n")
        error = events_until_exit(confused)[-1]
        assert confused.wait() == EXIT_CONFIG
    assert error["kind"] == "config" and error["key"] == "--config" and "'stop" in error["message"], error


def test_the_pool_keeps_one_warm_trainer_and_retires_idle_or_stale_ones(tmp_path: Path) -> None:
    main = fake_engine(tmp_path, WAITING_ENGINE)
    pool = WarmTrainerPool(30, pack_root=tmp_path)
    try:
        first = pool.prewarm()
        assert first is not None and first.warm and first.poll() is None
        assert pool.prewarm() is first, "one spare at a time"
        assert pool.take() is first and pool.take() is None, "taken means no longer the pool's"
        first.close()

        stale = pool.prewarm()
        assert stale is not None and stale is not first
        time.sleep(0.05)
        os.utime(main, ns=(time.time_ns(), stale.source_stamp + 1_000_000))
        assert pool.take() is None, "code edited after it started: it would run the old code"
        assert stale.poll() is not None, "and it is ended, not leaked"

        dead = pool.prewarm()
        assert dead is not None
        dead.kill()
        replacement = pool.prewarm()
        assert replacement is not None and replacement is not dead and replacement.poll() is None
    finally:
        pool.shutdown()
    assert replacement.poll() is not None

    short = WarmTrainerPool(0.5, pack_root=tmp_path)
    idle = short.prewarm()
    assert idle is not None
    deadline = time.monotonic() + 10
    while idle.poll() is None:
        assert time.monotonic() < deadline, "an unused warm trainer ends after idle_s"
        time.sleep(0.1)
    assert short.take() is None
    assert WarmTrainerPool(0, pack_root=tmp_path).prewarm() is None, "idle_s 0 turns warm starts off"


def bad_config(tmp_path: Path) -> Path:
    config = tmp_path / "run config.json"
    config.write_text(json.dumps({"pretrained_model": "m.safetensors", "rank": 0}), encoding="utf-8")
    return config


def test_the_engine_is_found_without_the_environment_or_the_working_directory(tmp_path: Path) -> None:
    """The Windows portable build's embedded Python: a ._pth file ignores PYTHONPATH and the cwd."""
    python = build_portable_python(tmp_path / "python_embeded")
    foreign = tmp_path / "site"
    fake_engine(foreign, "print('the unrelated trainer package')\n")
    env = child_env({**os.environ, "PYTHONPATH": str(foreign)})
    with TrainerProcess(bad_config(tmp_path), log_path=tmp_path / "t.log", python=str(python), env=env) as proc:
        events = events_until_exit(proc)
        assert proc.wait() == EXIT_CONFIG, proc.stderr_tail()
    verify_hello(events[0])
    assert events[-1]["kind"] == "config"
    log = (tmp_path / "t.log").read_text(encoding="utf-8")
    assert "No module named" not in log


def test_a_foreign_trainer_on_the_path_or_already_imported_does_not_shadow_the_engine(tmp_path: Path) -> None:
    foreign = tmp_path / "site"
    fake_engine(foreign, "print('the unrelated trainer package')\n")
    # A sitecustomize that imports the foreign package before the bootstrap runs, as a .pth file could.
    (foreign / "sitecustomize.py").write_text("import trainer\n", encoding="utf-8")
    env = child_env({**os.environ, "PYTHONPATH": str(foreign)})
    with TrainerProcess(bad_config(tmp_path), log_path=tmp_path / "t.log", env=env) as proc:
        events = events_until_exit(proc)
        assert proc.wait() == EXIT_CONFIG, proc.stderr_tail()
    verify_hello(events[0])

    # Where the pack holds no engine, the foreign package is what answers: refused by its hello.
    empty_pack = tmp_path / "not a pack"
    empty_pack.mkdir()
    with TrainerProcess(tmp_path / "run.json", log_path=tmp_path / "t2.log", pack_root=empty_pack,
                        env=child_env({**os.environ, "PYTHONPATH": str(foreign)})) as proc:
        events = events_until_exit(proc, timeout=30)
        proc.wait()
    assert events == [] and "the unrelated trainer package" in proc.stderr_tail()


def test_the_child_sees_the_packages_its_parent_sees() -> None:
    portable = SimpleNamespace(isolated=1, ignore_environment=1, no_user_site=1)
    assert interpreter_flags(portable) == ["-I", "-u", "-X", "utf8"]
    comfy_portable = SimpleNamespace(isolated=0, ignore_environment=0, no_user_site=1)  # python -s main.py
    assert interpreter_flags(comfy_portable) == ["-s", "-u", "-X", "utf8"]
    assert interpreter_flags(SimpleNamespace(isolated=0, ignore_environment=1, no_user_site=0))[0] == "-E"
    assert interpreter_flags(SimpleNamespace(isolated=0, ignore_environment=0, no_user_site=0)) == ["-u", "-X", "utf8"]
    env = child_env({"PYTHONPATH": "/elsewhere", "PATH": "/bin"})
    assert env["PYTHONPATH"] == "/elsewhere", "the engine is found by the command line, not PYTHONPATH"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONIOENCODING"] == "utf-8" and env["PATH"] == "/bin"


def test_the_logged_command_can_be_pasted_into_a_shell(tmp_path: Path) -> None:
    pack = tmp_path / "custom nodes" / "pack 'ü'"
    shutil.copytree(REPO / "trainer", pack / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    config = bad_config(tmp_path)
    line = format_command(trainer_command(str(config), pack_root=pack))
    if os.name == "nt":
        return
    proc = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, cwd="/", check=False,
                          env=child_env())
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-2000:]
    hello = json.loads(proc.stdout.splitlines()[0])
    verify_hello(hello, pack)


# Stands in for a training engine: on end of stdin (the launcher's stop) it "saves" and exits, or it
# ignores the stop altogether.
SAVING_ENGINE = ("import json, os, sys, pathlib\n"
                 "print(json.dumps({'type': 'hello', 'engine': 'x', 'package_dir': os.path.dirname(__file__)}), flush=True)\n"
                 "sys.stdin.read()\n"
                 "pathlib.Path(os.environ['SAVED_MARK']).write_text('checkpoint')\n")
DEAF_ENGINE = ("import json, os, time\n"
               "print(json.dumps({'type': 'hello', 'engine': 'x', 'package_dir': os.path.dirname(__file__)}), flush=True)\n"
               "time.sleep(600)\n")


def test_when_the_parent_exits_a_training_saves_before_it_ends(tmp_path: Path) -> None:
    saving, deaf = tmp_path / "saving", tmp_path / "deaf"
    fake_engine(saving, SAVING_ENGINE)
    fake_engine(deaf, DEAF_ENGINE)
    mark = tmp_path / "saved"
    env = child_env({**os.environ, "SAVED_MARK": str(mark)})
    with TrainerProcess(tmp_path / "run.json", log_path=tmp_path / "a.log", pack_root=saving, env=env) as proc:
        wait_for_event(proc, "hello", timeout=30)
        proc.stop_at_exit(grace_s=20)
        assert proc.poll() == 0 and mark.read_text() == "checkpoint", "stopped through stdin, not killed"
    with TrainerProcess(tmp_path / "run.json", log_path=tmp_path / "b.log", pack_root=deaf, env=env) as proc:
        wait_for_event(proc, "hello", timeout=30)
        started = time.monotonic()
        proc.stop_at_exit(grace_s=1)
        assert proc.poll() is not None and time.monotonic() - started < 30, "killed after the grace period"


def test_exit_messages_say_what_happened() -> None:
    tail = "line one\nline two"
    if hasattr(signal, "SIGKILL"):
        killed = describe_exit(-signal.SIGKILL, None, tail)
        assert killed.startswith("the trainer process was killed (signal 9, SIGKILL)") and killed.endswith(tail)
    data = describe_exit(EXIT_DATA, {"kind": "data", "message": "photo.jpg is not an image", "advice": ""}, tail)
    assert data == "the trainer could not use the training images: photo.jpg is not an image"
    internal = describe_exit(EXIT_INTERNAL, {"kind": "internal", "message": "KeyError: 'x'", "advice": "see log"}, tail)
    assert "KeyError: 'x'\nsee log\n" in internal and internal.endswith(tail)
    silent = describe_exit(1, None, tail)
    assert "without reporting why" in silent and silent.endswith(tail)


def test_loss_curve_image() -> None:
    points = [(i, 1.0 / i + (0.3 if i % 7 == 0 else 0.0)) for i in range(1, 60)] + [(60, float("nan"))]
    image = render_loss_curve(points, total_steps=100, width=400, height=200)
    assert image.size == (400, 200) and image.mode == "RGB"
    pixels = np.asarray(image)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80)
    assert blue.sum() > 100, "the smoothed line is drawn"
    empty = np.asarray(render_loss_curve([], width=200, height=100))
    assert (empty != empty[0, 0]).any(axis=-1).sum() > 20, "the empty plot says so in text"
    averaged = smooth([1.0, 1.0, 1.0])
    assert all(math.isclose(v, 1.0) for v in averaged), "bias-corrected: no ramp from zero"
