"""Drive one trainer process from inside a ComfyUI node: progress bar, interruption, UI events.

The process itself (spawning, the hello check, reading its pipes) is ``trainer.launcher``; this module
adds what only ComfyUI has: its interrupt flag, its progress bar and its websocket. Like core's API
nodes waiting on a remote job, it checks the interrupt flag several times a second, asks the job to
stop (the trainer saves a checkpoint), and then raises core's InterruptProcessingException so the UI
shows "interrupted" rather than an error.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..trainer.launcher import TrainerLaunchError, TrainerProcess, WarmTrainerPool, verify_hello
from ..trainer.run_folder import saved_samples
from .live_view import STORE, RunKey

logger = logging.getLogger(__name__)

UI_EVENT = "dreambooth.train"
POLL_S = 0.25  # how often the interrupt flag is read while waiting for events
HELLO_TIMEOUT_S = 120.0  # Python start-up plus the engine's light imports; slow disks need a margin
STOP_TIMEOUT_S = 60.0  # a stop saves a checkpoint first; a real model's set-up may still be running
_PROGRESS_EVERY_S = 0.25  # UI progress relays per second, at most (fast GPUs do many steps a second)
METRICS_FILE = "metrics.jsonl"
MAX_REPLAYED_SAMPLES = 200  # of the run a resumed run continues (the gallery shows the newest ones)
WARM_IDLE_ENV = "DREAMBOOTH_WARM_TRAINER_IDLE_S"
WARM_IDLE_DEFAULT_S = 600.0


def _warm_idle_s() -> float:
    raw = os.environ.get(WARM_IDLE_ENV, "")
    try:
        return float(raw) if raw.strip() else WARM_IDLE_DEFAULT_S
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %.0f", WARM_IDLE_ENV, raw, WARM_IDLE_DEFAULT_S)
        return WARM_IDLE_DEFAULT_S


class SwitchablePool(WarmTrainerPool):
    """The warm-trainer pool with an on/off switch the web UI's setting flips while the server runs.

    The environment variable gives the idle time and the initial state (0: off); switching on a pool
    that started off uses the default idle time.
    """

    def __init__(self, idle_s: float) -> None:
        super().__init__(idle_s if idle_s > 0 else WARM_IDLE_DEFAULT_S)
        self.switched_on = idle_s > 0

    @property
    def enabled(self) -> bool:
        return self.switched_on and self.idle_s > 0

    def prewarm(self) -> TrainerProcess | None:
        spare = super().prewarm()
        if spare is not None and not self.enabled:  # switched off while it was starting
            self.shutdown()
            return None
        return spare

    def switch(self, on: bool) -> None:
        self.switched_on = on
        if not on:
            self.shutdown()


# One trainer kept started ahead of the next run (queued, or likely: users train again after looking at
# the samples). 0 in the environment variable turns it off; the web UI's setting turns it on and off.
WARM_TRAINERS = SwitchablePool(_warm_idle_s())


def set_prestart_trainer(on: bool) -> None:
    """The web UI's "start a trainer process in advance" setting; off also ends the waiting one now."""
    logger.info("starting trainers in advance: %s", "on" if on else "off")
    WARM_TRAINERS.switch(on)


def live_settings() -> dict[str, Any]:
    return {"prestart_trainer": WARM_TRAINERS.enabled, "idle_s": WARM_TRAINERS.idle_s}


class UiRelay:
    """Sends ``{"node", "prompt_id", "run_name", "event"}`` messages to every browser and keeps them in the
    live view's run history, so a second tab or a reloaded page sees the run too."""

    def __init__(self, node_id: str | None, run_name: str | None = None) -> None:
        self.node_id = node_id
        self.run_name = run_name  # the LoRA name: tells this node's runs from another workflow's node of the same id
        self.prompt_id: str | None = None

    @property
    def key(self) -> RunKey:
        if self.prompt_id is None:
            try:
                from server import PromptServer

                self.prompt_id = PromptServer.instance.last_prompt_id
            except Exception:  # noqa: BLE001 - outside a server (scripts): one run per relay anyway
                self.prompt_id = None
        return (self.node_id, self.prompt_id, self.run_name)

    def send(self, event: dict[str, Any]) -> None:
        try:
            key = self.key
            STORE.record(key, event)
            from server import PromptServer

            payload = {"node": self.node_id, "prompt_id": key[1], "run_name": self.run_name, "event": event}
            PromptServer.instance.send_sync(UI_EVENT, payload, None)  # None: every connected browser
        except Exception:  # noqa: BLE001 - the UI is a nicety; training must not fail for it
            logger.debug("could not relay a UI event", exc_info=True)

    def status(self, message: str, *, level: str = "info", **extra: Any) -> None:
        log = logger.warning if level == "warning" else logger.info
        log("%s", message)
        self.send({"type": "status", "message": message, "level": level, "source": "node",
                   "time": round(time.time(), 3), **extra})

    def error(self, message: str) -> None:
        self.send({"type": "error", "kind": "node", "message": message, "source": "node",
                   "time": round(time.time(), 3)})


class MetricsLog:
    """Loss per step, kept in the run folder so a resumed or reused run still has its whole curve."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.points: dict[int, float] = {}
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                item = json.loads(line)
                self.points[int(item["step"])] = float(item["loss"])
        except (OSError, ValueError, KeyError, TypeError):
            pass

    def restart_at(self, step: int) -> None:
        """The trainer starts at ``step``: values beyond it belong to a run it did not continue."""
        self.points = {s: v for s, v in self.points.items() if s <= step}
        self._rewrite()

    def add(self, step: int, loss: Any) -> None:
        try:
            value = float(loss)  # a diverged loss arrives as the string "nan"
        except (TypeError, ValueError):
            return
        self.points[step] = value
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "loss": value}) + "\n")
        except OSError:
            pass

    def _rewrite(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                                         for s, v in sorted(self.points.items())), encoding="utf-8")
        except OSError:
            pass

    def curve(self, up_to: int | None = None) -> list[tuple[int, float]]:
        return [(s, v) for s, v in sorted(self.points.items()) if up_to is None or s <= up_to]


@dataclass
class RunOutcome:
    returncode: int
    stop_requested: bool
    stderr_tail: str
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None


def thin_curve(points: list[tuple[int, float]], limit: int = 2000) -> list[list[float]]:
    """At most about ``limit`` evenly spaced points of a loss curve, the last one always included."""
    stride = max(1, -(-len(points) // limit))
    kept = points[::stride]
    if points and kept[-1] != points[-1]:
        kept.append(points[-1])
    return [[s, v] for s, v in kept]


def view_url(path: Path) -> str | None:
    """The /view URL of a file under ComfyUI's output folder, or None outside it."""
    root = Path(folder_paths.get_output_directory()).resolve()
    try:
        rel = Path(path).resolve().relative_to(root)
    except ValueError:
        return None
    query = {"filename": rel.name, "type": "output", "subfolder": rel.parent.as_posix().strip(".")}
    return "/view?" + urllib.parse.urlencode(query)


class _Driver:
    def __init__(self, proc: TrainerProcess, relay: UiRelay, metrics: MetricsLog, total: int,
                 node_id: str | None, stop_flag: threading.Event | None = None,
                 run_dir: Path | None = None, prompts: list[str] | None = None) -> None:
        self.proc = proc
        self.run_dir = run_dir  # where the samples of the run this one resumes lie
        self.prompts = prompts or []  # validation prompts by index, to caption those samples
        self.stop_flag = stop_flag  # the web UI's Stop button (POST /dreambooth/stop)
        self.relay = relay
        self.metrics = metrics
        self.total = total
        self.pbar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.interrupted = False
        self.stop_sent_at: float | None = None
        self.hello_seen = False
        self.train_started = False
        self.last_progress_relay = 0.0
        self.outcome = RunOutcome(returncode=0, stop_requested=False, stderr_tail="")

    def interrupt_requested(self) -> bool:
        return (self.interrupted or mm.processing_interrupted()
                or (self.stop_flag is not None and self.stop_flag.is_set()))

    def _progress(self, step: int, total: int) -> None:
        try:
            self.pbar.update_absolute(step, total)
        except mm.InterruptProcessingException:
            # Core's progress hook raises (and clears the flag) when the user cancels; remember it so the
            # trainer is still stopped cleanly instead of being left running.
            self.interrupted = True

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        out = self.outcome
        relayed = dict(event)
        if kind == "hello":
            verify_hello(event, self.proc.pack_root)
            self.hello_seen = True
        elif kind == "progress":
            step, total = int(event.get("step", 0)), int(event.get("total", self.total) or self.total)
            if event.get("phase") == "train" and not self.train_started:
                self.train_started = True
                self.metrics.restart_at(step)
                if step > 0 and self.metrics.points:
                    # A resumed run: the chart starts with the curve up to the checkpoint.
                    self.relay.send({"type": "loss_history", "points": thin_curve(self.metrics.curve()),
                                     "time": round(time.time(), 3)})
                    self._replay_samples(up_to=step)
            self._progress(step, total)
            now = time.monotonic()
            if now - self.last_progress_relay < _PROGRESS_EVERY_S and step < total:
                return
            self.last_progress_relay = now
        elif kind == "metrics":
            self.metrics.add(int(event.get("step", 0)), event.get("loss"))
            relayed["total"] = self.total
        elif kind == "status":
            message = str(event.get("message", ""))
            if message.startswith("resumed from"):
                out.resumed_from = message
        elif kind == "sample":
            url = view_url(Path(str(event.get("path", ""))))
            if url:
                relayed["url"] = url
            out.samples.append(relayed)
        elif kind == "done":
            out.done = event
            relayed.pop("config", None)  # every setting and path: too much for a status line
        elif kind == "error":
            out.error = event
        self.relay.send(relayed)

    def _replay_samples(self, up_to: int) -> None:
        """A resumed run: the gallery keeps the samples taken before the checkpoint. Sent as sample events
        marked ``earlier`` (the node's outputs only use this run's own samples)."""
        if self.run_dir is None:
            return
        for step, index, path in saved_samples(self.run_dir, up_to)[-MAX_REPLAYED_SAMPLES:]:
            url = view_url(path)
            if url:
                prompt = self.prompts[index] if index < len(self.prompts) else ""
                self.relay.send({"type": "sample", "step": step, "index": index, "prompt": prompt,
                                 "path": str(path), "url": url, "earlier": True})

    def request_stop(self) -> None:
        self.stop_sent_at = time.monotonic()
        self.outcome.stop_requested = True
        if not self.hello_seen:
            self.proc.kill()  # nothing trained yet, nothing to save
            return
        who = "stop" if self.stop_flag is not None and self.stop_flag.is_set() else "interrupt"
        self.relay.status(f"{who}: asking the trainer to save a checkpoint and stop")
        if not self.proc.send("stop"):
            self.proc.kill()

    def run(self) -> RunOutcome:
        started = time.monotonic()
        while True:
            if self.stop_sent_at is None and self.interrupt_requested():
                self.request_stop()
            event = self.proc.next_event(POLL_S)
            if event is not None:
                self.handle(event)
            elif self.proc.stdout_closed and self.proc.wait(POLL_S) is not None:
                break
            if not self.hello_seen and self.stop_sent_at is None and time.monotonic() - started > HELLO_TIMEOUT_S:
                raise TrainerLaunchError(
                    f"the trainer did not say hello within {HELLO_TIMEOUT_S:.0f} s; last log lines:\n"
                    f"{self.proc.stderr_tail()}"
                )
            if self.stop_sent_at is not None and time.monotonic() - self.stop_sent_at > STOP_TIMEOUT_S:
                self.relay.status(f"the trainer did not stop within {STOP_TIMEOUT_S:.0f} s and was killed; "
                                  "the newest saved checkpoint is kept", level="warning")
                self.proc.kill()
                self.stop_sent_at = float("inf")  # no second kill message
        returncode = self.proc.wait()
        assert returncode is not None
        if not self.hello_seen and not self.outcome.stop_requested:
            raise TrainerLaunchError(
                f"'python -m trainer' exited with code {returncode} before saying hello: it is not this pack's "
                f"trainer or it could not start. Last output:\n{self.proc.stderr_tail()}"
            )
        self.outcome.returncode = returncode
        self.outcome.stderr_tail = self.proc.stderr_tail()
        return self.outcome


def _validation_prompts(config_path: Path) -> list[str]:
    try:
        prompts = json.loads(config_path.read_text(encoding="utf-8")).get("validation_prompts", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(p) for p in prompts] if isinstance(prompts, list) else []


def run_trainer(config_path: Path, *, run_dir: Path, node_id: str | None, total_steps: int,
                relay: UiRelay, metrics: MetricsLog) -> RunOutcome:
    """Run the trainer on ``config_path`` until it exits; stop it cleanly if the user interrupts.

    Returns how it ended; the caller raises InterruptProcessingException when ``stop_requested``.
    """
    log_path = run_dir / "trainer.log"
    proc = WARM_TRAINERS.take()
    if proc is None or not proc.begin(config_path, log_path=log_path):
        if proc is not None:
            proc.close()
        proc = TrainerProcess(config_path, log_path=log_path)
    stop_flag = STORE.attach(relay.key)
    stopped = False
    try:
        with proc:
            if proc.warm and proc.started_at is not None:
                how = f"warm trainer (pid {proc.pid}, started {time.time() - proc.started_at:.0f} s ago)"
            else:
                how = f"trainer started (pid {proc.pid})"
            relay.status(f"{how}; log: {log_path}", pid=proc.pid, warm=proc.warm)
            outcome = _Driver(proc, relay, metrics, total_steps, node_id, stop_flag, run_dir=run_dir,
                              prompts=_validation_prompts(config_path)).run()
            stopped = outcome.stop_requested
            return outcome
    finally:
        STORE.detach(relay.key, stopped=stopped)
        # The next run is likely soon (look at the samples, change a setting, train again).
        WARM_TRAINERS.prewarm()
