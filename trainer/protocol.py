"""The one subprocess protocol between the engine and whoever launched it.

Out: JSON-lines events on the process's original stdout. At start-up that file descriptor is
duplicated for the protocol and fd 1 is pointed at stderr, so a stray ``print`` in diffusers, tqdm or
a user's patch can never corrupt the event stream.

In: JSON-lines commands on stdin (``{"command": "stop" | "sample" | "save"}``), read by a daemon
thread and exposed as flags the training loop polls between steps.

A warm trainer (``--config -``) is started before its run is known: it says ``hello``, imports the
model libraries (most of its start-up time), says ``ready``, and waits for one
``{"command": "config", "path": "run.json"}`` line on stdin; from then on it is an ordinary run.

Every event carries the protocol version ``v``, a ``type`` and a ``time`` (Unix seconds).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

PROTOCOL_VERSION = 1

EVENT_TYPES = frozenset({"hello", "ready", "status", "progress", "metrics", "sample", "checkpoint", "done",
                         "error"})
COMMANDS = frozenset({"stop", "sample", "save"})
CONFIG_COMMAND = "config"  # the first and only line a warm trainer waits for

# Exit codes: the launcher tells outcomes apart without parsing anything.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2  # argparse also uses 2 for bad command lines
EXIT_DATA = 3
EXIT_OOM = 4
EXIT_STOPPED = 5
EXIT_DISK_FULL = 6

ERROR_KINDS = {"config": EXIT_CONFIG, "data": EXIT_DATA, "oom": EXIT_OOM, "disk": EXIT_DISK_FULL,
               "internal": EXIT_INTERNAL}

logger = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; a diverged loss must still be reported
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class EventWriter:
    """Writes protocol events. Thread-safe; a closed pipe (launcher gone) never raises."""

    def __init__(self, stream: IO[str] | None, *, enabled: bool = True) -> None:
        self._stream = stream
        self._enabled = enabled and stream is not None
        self._lock = threading.Lock()

    def emit(self, type_: str, **payload: Any) -> None:
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        if not self._enabled:
            return
        message = {"v": PROTOCOL_VERSION, "type": type_, "time": round(time.time(), 3), **_json_safe(payload)}
        line = json.dumps(message, ensure_ascii=False)
        with self._lock:
            try:
                assert self._stream is not None
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                self._enabled = False

    def status(self, message: str, *, level: str = "info", **extra: Any) -> None:
        log = logger.warning if level == "warning" else logger.info
        log("%s", message)
        self.emit("status", message=message, level=level, **extra)


def claim_stdout_for_protocol() -> IO[str]:
    """Keep the real stdout for events and send everything else that writes to fd 1 to stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(os.dup(2), "w", encoding="utf-8", buffering=1)
    return os.fdopen(protocol_fd, "w", encoding="utf-8", buffering=1)


def config_command(path: str | os.PathLike[str]) -> str:
    """The line that hands a warm trainer its run."""
    return json.dumps({"command": CONFIG_COMMAND, "path": os.fspath(path)}) + "\n"


def read_config_command(stream: IO[str]) -> str | None:
    """Wait for a warm trainer's config line; the config path, or None when stdin closes first.

    Raises ValueError naming what was wrong with a line that is not a config command.
    """
    while True:
        line = stream.readline()
        if not line:
            return None
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expected a JSON config command on stdin, got {line.strip()[:80]!r}") from exc
        if not isinstance(message, dict) or message.get("command") != CONFIG_COMMAND \
                or not isinstance(message.get("path"), str) or not message["path"]:
            raise ValueError(f'expected {{"command": "{CONFIG_COMMAND}", "path": "run.json"}} on stdin, '
                             f"got {line.strip()[:80]!r}")
        return str(message["path"])


class StopRequested(Exception):
    """A stop arrived during work that has no checkpoint to save (loading, class images, sampling):
    raised to leave that work at once."""


@dataclass
class Commands:
    """Flags set by the launcher's commands; the loop reads and clears them between steps."""

    stop: threading.Event = field(default_factory=threading.Event)
    sample: threading.Event = field(default_factory=threading.Event)
    save: threading.Event = field(default_factory=threading.Event)

    def check_stop(self) -> None:
        """Raise StopRequested if a stop is pending (leaving the flag set for the loop to see)."""
        if self.stop.is_set():
            raise StopRequested

    def take(self, name: str) -> bool:
        flag: threading.Event = getattr(self, name)
        if flag.is_set():
            flag.clear()
            return True
        return False

    def handle_line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        try:
            message = json.loads(line)
            command = message["command"] if isinstance(message, dict) else message
        except (json.JSONDecodeError, KeyError):
            command = line  # a bare word on a terminal is friendlier than a JSON error
        if not isinstance(command, str) or command not in COMMANDS:
            logger.warning("ignoring unknown command %r (known: %s)", command, ", ".join(sorted(COMMANDS)))
            return
        getattr(self, command).set()

    def listen(self, stream: IO[str], *, stop_at_eof: bool = False) -> threading.Thread:
        def _read() -> None:
            try:
                for line in stream:
                    self.handle_line(line)
            except (OSError, ValueError):
                pass
            if stop_at_eof:
                logger.warning("stdin closed: the launcher is gone, stopping")
                self.stop.set()

        thread = threading.Thread(target=_read, name="trainer-commands", daemon=True)
        thread.start()
        return thread


def install_interrupt_handler(commands: Commands) -> bool:
    """Ctrl-C (SIGINT) and, on Windows, Ctrl-Break (SIGBREAK): the first one stops gracefully, like a
    stop command (the loop saves a checkpoint); the second aborts at once (KeyboardInterrupt).

    A Ctrl-C in ComfyUI's console reaches this child process too, on POSIX and Windows consoles.
    Installed only where the signal exists and only from the main thread (Python's rule); returns
    whether a handler was installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    names = [name for name in ("SIGINT", "SIGBREAK") if hasattr(signal, name)]
    if not names:
        return False
    pressed = 0

    def _handler(signum: int, frame: object) -> None:
        nonlocal pressed
        pressed += 1
        if pressed > 1:
            logger.warning("second interrupt: aborting without saving")
            raise KeyboardInterrupt
        logger.warning("interrupt received: stopping after the current step and saving a checkpoint "
                       "(press Ctrl-C again to abort without saving)")
        commands.stop.set()

    for name in names:
        signal.signal(getattr(signal, name), _handler)
    return True
