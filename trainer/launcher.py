"""Start the engine as a child process and talk the protocol with it, from any front end.

ComfyUI-free: the node layer uses it, and so could a script or another UI. What it guarantees:

- the child is ``[python, "-m", "trainer", "--config", run.json]`` (an argument list, no shell) with
  the pack root first on ``PYTHONPATH``, and its hello event proves it is this pack's engine, not the
  unrelated PyPI package that is also called ``trainer``;
- stdout is read by a thread into a queue of events, stderr by another into a log file and a tail
  buffer, so neither pipe can fill up and stall the trainer;
- how the process ended is told in words (error event, exit code, signal, stderr tail).
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from . import ENGINE_NAME
from .protocol import EXIT_CONFIG, EXIT_DATA, EXIT_INTERNAL, EXIT_OK, EXIT_OOM, EXIT_STOPPED

logger = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parent.parent
_TAIL_LINES = 200
_EOF = object()

_EXIT_WORDS = {
    EXIT_OK: "finished",
    EXIT_INTERNAL: "failed with an internal error",
    EXIT_CONFIG: "rejected its configuration",
    EXIT_DATA: "could not use the training images",
    EXIT_OOM: "ran out of memory",
    EXIT_STOPPED: "stopped",
}


class TrainerLaunchError(RuntimeError):
    """The child process is not this pack's trainer, or it never said hello."""


def child_env(pack_root: Path = PACK_ROOT, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the trainer: the caller's, with the pack root first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(pack_root) + (os.pathsep + old if old else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def verify_hello(event: dict[str, Any], pack_root: Path = PACK_ROOT) -> None:
    """Raise TrainerLaunchError unless ``event`` is the hello of the engine inside ``pack_root``."""
    if event.get("type") != "hello":
        raise TrainerLaunchError(
            f"the trainer's first message was {event.get('type')!r}, not 'hello': the program started as "
            "'python -m trainer' is not this pack's trainer."
        )
    engine = event.get("engine")
    package_dir = Path(str(event.get("package_dir", ""))).resolve()
    expected = (pack_root / "trainer").resolve()
    if engine != ENGINE_NAME or package_dir != expected:
        raise TrainerLaunchError(
            f"'python -m trainer' started {engine!r} from {package_dir}, not {ENGINE_NAME!r} from {expected}. "
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


class TrainerProcess:
    """One running trainer. Use as a context manager: leaving the block kills a process still running."""

    def __init__(self, config_path: Path, *, log_path: Path, pack_root: Path = PACK_ROOT,
                 python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.config_path = Path(config_path)
        self.log_path = Path(log_path)
        self.pack_root = Path(pack_root)
        self.python = python or sys.executable
        self.env = env if env is not None else child_env(self.pack_root)
        self.proc: subprocess.Popen[bytes] | None = None
        self._events: queue.Queue[Any] = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._log: IO[bytes] | None = None
        self._threads: list[threading.Thread] = []
        self._eof = False

    # --- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in close(), after the reader threads end
        # One log per run folder, appended: a resumed run's log keeps the story of the runs before it.
        self._write_log(f"\n===== trainer started {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        cmd = [self.python, "-m", "trainer", "--config", str(self.config_path), "--stop-when-stdin-closes"]
        logger.info("starting trainer: %s (cwd %s)", cmd, self.pack_root)
        self.proc = subprocess.Popen(cmd, cwd=self.pack_root, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        atexit.register(self.kill)  # the server exiting must not leave an orphan training on the GPU
        self._spawn(self._read_stdout, "trainer-events")
        self._spawn(self._read_stderr, "trainer-log")

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
            logger.warning("killing trainer process %s", self.proc.pid)
            self.proc.kill()
            self.wait(30)

    def close(self) -> None:
        self.kill()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        atexit.unregister(self.kill)

    def __enter__(self) -> TrainerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- protocol ----------------------------------------------------------------------------------
    def send(self, command: str) -> bool:
        """Send a command line; False when the trainer no longer listens."""
        if self.proc is None or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write((json.dumps({"command": command}) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

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
        log = self._log
        if log is None:
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
