"""Start the engine as a child process and talk the protocol with it, from any front end.

ComfyUI-free: the node layer uses it, and so could a script or another UI. What it guarantees:

- the child finds the engine by an explicit path, never through the environment or the working
  directory (see ``trainer_command``): it starts the same way under a normal install, a venv, ``-s`` /
  ``-I`` and the Windows portable build's embedded Python, whose ``._pth`` file ignores ``PYTHONPATH``
  and puts neither the working directory nor a script's folder on ``sys.path``. Its hello event
  proves it is this pack's engine, not the unrelated PyPI package that is also called ``trainer``;
- stdout is read by a thread into a queue of events, stderr by another into a log file and a tail
  buffer, so neither pipe can fill up and stall the trainer;
- how the process ended is told in words (error event, exit code, signal, stderr tail);
- a trainer can be started *warm*, before its run is known (``WarmTrainerPool``): it imports torch,
  diffusers and transformers, most of its start-up time, while nobody is waiting for it.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from . import ENGINE_NAME
from .protocol import (
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_DISK_FULL,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_OOM,
    EXIT_STOPPED,
    config_command,
)

logger = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parent.parent
_TAIL_LINES = 200
EXIT_GRACE_S = 30.0  # how long a parent that exits waits for its trainer's last checkpoint
_EOF = object()

_EXIT_WORDS = {
    EXIT_OK: "finished",
    EXIT_INTERNAL: "failed with an internal error",
    EXIT_CONFIG: "rejected its configuration",
    EXIT_DATA: "could not use the training images",
    EXIT_OOM: "ran out of memory",
    EXIT_STOPPED: "stopped",
    EXIT_DISK_FULL: "ran out of disk space",
}


class TrainerLaunchError(RuntimeError):
    """The child process is not this pack's trainer, or it never said hello."""


# Run by the child's ``-c``: put the pack root first on sys.path, forget any module called ``trainer``
# that a .pth file or sitecustomize imported already (the unrelated PyPI package), then run the
# engine as ``python -m trainer`` would. The root is written as an ASCII JSON string, a valid
# Python literal for any path; double quotes only, so the logged command stays readable when quoted
# for a POSIX shell. sys.path (unlike a path-based import spec) is also what multiprocessing's spawn
# start method hands to worker processes, so they find the engine the same way.
_BOOTSTRAP = ('import runpy, sys; sys.path.insert(0, {root}); '
              '[sys.modules.pop(m) for m in list(sys.modules) if m == "trainer" or m.startswith("trainer.")]; '
              'runpy.run_module("trainer", run_name="__main__", alter_sys=True)')


def interpreter_flags(flags: Any = None) -> list[str]:
    """Start-up flags for a child Python that should see the packages this one sees.

    ComfyUI's portable build runs ``python -s main.py``: a child started without ``-s`` would add the
    user's site-packages (and maybe another torch). ``-I``/``-E`` are kept for the same reason. The
    child's output must be unbuffered and UTF-8 whatever the environment says, and ``-E``/``-I`` (and
    an embedded Python's ``._pth`` file) make it ignore ``PYTHONUNBUFFERED``/``PYTHONIOENCODING``, so
    those become ``-u`` and ``-X utf8``.
    """
    flags = sys.flags if flags is None else flags
    out: list[str] = []
    if getattr(flags, "isolated", 0):
        out.append("-I")  # implies -E, -s and -P
    else:
        if getattr(flags, "ignore_environment", 0):
            out.append("-E")
        if getattr(flags, "no_user_site", 0):
            out.append("-s")
    return [*out, "-u", "-X", "utf8"]


def trainer_command(config: str, *, pack_root: Path = PACK_ROOT, python: str | None = None,
                    extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The argument list that runs ``python -m trainer --config CONFIG`` with the engine in ``pack_root``.

    It needs nothing from the environment or the working directory: ``-m trainer`` would find the
    engine only through ``PYTHONPATH`` or the cwd, which an embedded Python with a ``._pth`` file (the
    Windows portable build) and ``-I`` both ignore.
    """
    interpreter = python or sys.executable
    if not interpreter:
        raise TrainerLaunchError("this Python does not know its own executable (sys.executable is empty), "
                                 "so the trainer cannot be started as a separate process")
    bootstrap = _BOOTSTRAP.format(root=json.dumps(str(Path(pack_root).resolve())))
    return [interpreter, *interpreter_flags(), "-c", bootstrap, "--config", config, *extra]


def format_command(cmd: list[str]) -> str:
    """``cmd`` as one line a user can paste into this platform's shell."""
    if os.name == "nt":
        return subprocess.list2cmdline(cmd)
    return shlex.join(cmd)


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the trainer: the caller's, unbuffered and UTF-8 where it is honoured.

    The engine is found through the command line (``trainer_command``), not PYTHONPATH; these two
    variables only matter to a Python that reads its environment, and ``-u -X utf8`` cover the rest.
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def verify_hello(event: dict[str, Any], pack_root: Path = PACK_ROOT) -> None:
    """Raise TrainerLaunchError unless ``event`` is the hello of the engine inside ``pack_root``."""
    if event.get("type") != "hello":
        raise TrainerLaunchError(
            f"the trainer's first message was {event.get('type')!r}, not 'hello': the program started as "
            "the trainer is not this pack's engine (another package named 'trainer' answered)."
        )
    engine = event.get("engine")
    package_dir = Path(str(event.get("package_dir", ""))).resolve()
    expected = (pack_root / "trainer").resolve()
    if engine != ENGINE_NAME or package_dir != expected:
        raise TrainerLaunchError(
            f"the trainer process started {engine!r} from {package_dir}, not {ENGINE_NAME!r} from {expected}. "
            "Another package named 'trainer' is installed in this Python environment and shadows the pack's "
            "engine; uninstall it (pip uninstall trainer) or report this as a bug."
        )


def describe_exit(returncode: int, error: dict[str, Any] | None, stderr_tail: str) -> str:
    """One message for a run that did not end well: what happened, the advice, then the log tail."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        head = f"the trainer process was killed (signal {-returncode}, {name})"
        if -returncode == getattr(signal, "SIGKILL", 9):
            head += (": by the system's out-of-memory killer if RAM ran out (lower the resolution or "
                     "batch_size, or close other programs), or by someone ending the process")
        return f"{head}. Last lines of the trainer log:\n{stderr_tail}".rstrip()
    what = _EXIT_WORDS.get(returncode, f"exited with code {returncode}")
    if error and error.get("message"):
        message = f"the trainer {what}: {error['message']}"
        if error.get("advice"):
            message += f"\n{error['advice']}"
        if error.get("kind") == "internal" and stderr_tail:
            message += f"\nLast lines of the trainer log:\n{stderr_tail}"
        return message
    return f"the trainer {what} without reporting why. Last lines of the trainer log:\n{stderr_tail}".rstrip()


def source_stamp(pack_root: Path = PACK_ROOT) -> int:
    """Newest modification time of the engine's code: a warm trainer older than it runs stale code."""
    return max((p.stat().st_mtime_ns for p in (pack_root / "trainer").rglob("*.py")), default=0)


class TrainerProcess:
    """One running trainer. Use as a context manager: leaving the block kills a process still running.

    With a ``config_path`` it is started on that run. Without one it starts warm (``--config -``) and
    waits, libraries imported, until ``begin`` hands it a run; its start-up log lines are kept until
    then and written at the top of that run's log.
    """

    def __init__(self, config_path: Path | None, *, log_path: Path | None, pack_root: Path = PACK_ROOT,
                 python: str | None = None, env: dict[str, str] | None = None) -> None:
        if (config_path is None) != (log_path is None):
            raise ValueError("a trainer gets its config and its log together (both, or neither for a warm start)")
        self.config_path = Path(config_path) if config_path is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.pack_root = Path(pack_root)
        self.python = python or sys.executable
        self.env = env if env is not None else child_env()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None  # time.time() at spawn
        self.source_stamp = 0
        self._events: queue.Queue[Any] = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._log: IO[bytes] | None = None
        self._log_lock = threading.Lock()
        self._early_log: list[bytes] | None = [] if config_path is None else None  # a warm trainer's
        # stderr before it has a run folder; None once that log is open (or for a cold trainer)
        self._threads: list[threading.Thread] = []
        self._eof = False
        self.warm = config_path is None  # started before its run was known

    # --- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self.log_path is not None:
            self._open_log(self.log_path)
        config = "-" if self.config_path is None else str(self.config_path)
        cmd = trainer_command(config, pack_root=self.pack_root, python=self.python,
                              extra=["--stop-when-stdin-closes"])
        logger.info("starting trainer: %s", format_command(cmd))
        self.source_stamp = source_stamp(self.pack_root)
        self.started_at = time.time()
        self.proc = subprocess.Popen(cmd, cwd=self.pack_root, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The server exiting (Ctrl-C in its console included) must not leave an orphan training on the GPU,
        # nor throw away the steps since the last checkpoint.
        atexit.register(self.stop_at_exit)
        self._spawn(self._read_stdout, "trainer-events")
        self._spawn(self._read_stderr, "trainer-log")

    def begin(self, config_path: Path, *, log_path: Path) -> bool:
        """Hand a warm trainer its run. False when it can no longer take one (it exited)."""
        if self.config_path is not None or self.proc is None:
            raise RuntimeError("begin() is for a started warm trainer that has no run yet")
        if self.proc.poll() is not None:
            return False
        self.config_path, self.log_path = Path(config_path), Path(log_path)
        self._open_log(self.log_path)
        return self._write_stdin(config_command(self.config_path))

    def _open_log(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_lock:
            self._log = open(path, "ab")  # closed in close(), after the reader threads end
            # One log per run folder, appended: a resumed run's log keeps the story of the runs before it.
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            header = f"\n===== trainer started {now} =====\n"
            if self.warm and self.started_at is not None:
                started = time.strftime("%H:%M:%S", time.localtime(self.started_at))
                header = f"\n===== warm trainer (started {started}) given this run {now} =====\n"
            self._log.write(header.encode() + b"".join(self._early_log or []))
            self._log.flush()
            self._early_log = None

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def wait(self, timeout: float | None = None) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Ending a warm trainer that never got a run is routine; killing one that trains is not.
            log = logger.info if self.warm and self.config_path is None else logger.warning
            log("killing trainer process %s", self.proc.pid)
            self.proc.kill()
            self.wait(30)

    def stop_at_exit(self, grace_s: float = EXIT_GRACE_S) -> None:
        """Stop gracefully when the parent exits: a training run saves a checkpoint first.

        Closing stdin is the stop that works on every platform (no POSIX signal): the trainer runs with
        ``--stop-when-stdin-closes``, saves and exits; a warm one without a run exits at once. Whatever
        has not ended after ``grace_s`` is killed.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        training = self.config_path is not None
        if training:
            logger.warning("exiting: asking trainer %s to save a checkpoint and stop (up to %.0f s)",
                           self.proc.pid, grace_s)
        self.close_stdin()
        if self.wait(grace_s if training else min(grace_s, 5.0)) is None:
            self.kill()

    def close(self) -> None:
        self.kill()
        for thread in self._threads:
            thread.join(timeout=5)
        self.close_stdin()
        with self._log_lock:
            if self._log is not None:
                self._log.close()
                self._log = None
        atexit.unregister(self.stop_at_exit)

    def __enter__(self) -> TrainerProcess:
        if self.proc is None:  # a warm trainer is already running
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- protocol ----------------------------------------------------------------------------------
    def send(self, command: str) -> bool:
        """Send a command line; False when the trainer no longer listens."""
        return self._write_stdin(json.dumps({"command": command}) + "\n")

    def _write_stdin(self, line: str) -> bool:
        if self.proc is None or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write(line.encode("utf-8"))
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def close_stdin(self) -> None:
        """End of stdin: a warm trainer waiting for its run exits, a running one stops and saves."""
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` s or once stdout is closed (see ``finished``)."""
        if self._eof:
            return None
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _EOF:
            self._eof = True
            return None
        return item

    @property
    def stdout_closed(self) -> bool:
        """Every event has been read: nothing more will come (the process may still be exiting)."""
        return self._eof

    def stderr_tail(self, lines: int = 40) -> str:
        with self._tail_lock:
            return "\n".join(list(self._tail)[-lines:])

    # --- reader threads ------------------------------------------------------------------------------
    def _note(self, line: str) -> None:
        with self._tail_lock:
            self._tail.append(line)

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = None
                if isinstance(event, dict) and "type" in event:
                    self._events.put(event)
                else:
                    # Not the protocol: another program answered to 'python -m trainer'. Keep it for the
                    # error message; the missing hello is what fails the run.
                    self._note(f"[stdout] {line}")
                    self._write_log(f"[stdout] {line}\n".encode())
        except (OSError, ValueError):
            pass
        finally:
            self._events.put(_EOF)

    def _write_log(self, data: bytes) -> None:
        with self._log_lock:
            log = self._log
            if log is None:
                if self._early_log is not None and len(self._early_log) < _TAIL_LINES * 5:
                    self._early_log.append(data)
                return
            try:
                log.write(data)
                log.flush()
            except (OSError, ValueError):
                pass

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                self._write_log(raw)
                self._note(raw.decode("utf-8", errors="replace").rstrip())
        except (OSError, ValueError):
            pass


class WarmTrainerPool:
    """Keeps at most one trainer started ahead of its run, so that run skips the imports.

    Users iterate (train, look at the samples, change a setting, train again), and a trainer spends
    most of its start-up importing torch, diffusers and transformers. A waiting trainer holds about
    0.5 GB of RAM of its own (plus the shared torch libraries) and no GPU memory: nothing touches
    CUDA before the config names the device. It is
    ended after ``idle_s`` without a run, and never handed a run if the engine's code changed after
    it started. ``idle_s <= 0`` turns warm starts off.
    """

    def __init__(self, idle_s: float, *, pack_root: Path = PACK_ROOT, python: str | None = None) -> None:
        self.idle_s = idle_s
        self.pack_root = Path(pack_root)
        self.python = python
        self._lock = threading.Lock()
        self._spare: TrainerProcess | None = None
        self._timer: threading.Timer | None = None

    @property
    def enabled(self) -> bool:
        return self.idle_s > 0

    def prewarm(self) -> TrainerProcess | None:
        """Make sure one trainer is warming or waiting, and restart its idle clock."""
        if not self.enabled:
            return None
        with self._lock:
            spare = self._spare
            if spare is None or not self._usable(spare):
                if spare is not None:
                    spare.close()
                spare = TrainerProcess(None, log_path=None, pack_root=self.pack_root, python=self.python)
                try:
                    spare.start()
                except OSError:
                    logger.warning("could not start a warm trainer", exc_info=True)
                    self._spare = None
                    return None
                logger.info("warm trainer started (pid %s)", spare.pid)
                self._spare = spare
            self._arm_timer(spare)
            return spare

    def take(self) -> TrainerProcess | None:
        """The waiting trainer, now the caller's (hand it a run with ``begin``), or None."""
        with self._lock:
            spare, self._spare = self._spare, None
            self._disarm_timer()
        if spare is None:
            return None
        if self._usable(spare):
            return spare
        logger.info("warm trainer (pid %s) not used: %s", spare.pid,
                    "it exited" if spare.poll() is not None else "the engine's code changed since it started")
        spare.close()
        return None

    def shutdown(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
            self._disarm_timer()
        if spare is not None:
            spare.close()

    def _usable(self, spare: TrainerProcess) -> bool:
        return spare.poll() is None and spare.source_stamp == source_stamp(self.pack_root)

    def _arm_timer(self, spare: TrainerProcess) -> None:
        self._disarm_timer()
        self._timer = threading.Timer(self.idle_s, self._expire, args=(spare,))
        self._timer.daemon = True
        self._timer.start()

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, spare: TrainerProcess) -> None:
        with self._lock:
            if self._spare is not spare:
                return  # taken, or replaced, meanwhile
            self._spare = None
            self._timer = None
        logger.info("warm trainer (pid %s) idle for %.0f s: ended", spare.pid, self.idle_s)
        spare.close()
