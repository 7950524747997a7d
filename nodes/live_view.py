"""Live view, server side: every training run's events kept in memory, and the routes the web extension uses.

The browser that queued a prompt is not the only one that wants to watch it: a second tab, or the same
tab after a reload, asks ``GET /dreambooth/runs`` for what it missed and then follows the broadcast
``dreambooth.train`` messages. A run's history is compacted as it grows (loss points thinned to an even
stride, the last status lines, the last progress per phase), so a week-long run costs the same memory
as a short one.

Routes (registered once, on ComfyUI's server):

- ``GET /dreambooth/runs``: ``{"runs": [...]}``, newest first, each with its replayable ``events``.
- ``POST /dreambooth/stop`` ``{"node": "<execution id>", "run_name": "<lora name>"}``: a graceful stop,
  the same path as ComfyUI's Cancel (the trainer saves a checkpoint, the node ends "interrupted").
- ``GET``/``POST /dreambooth/settings`` ``{"prestart_trainer": bool}``: the trainer started ahead of runs.

This module imports nothing from ComfyUI at import time, so its store is unit-tested on its own.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

MAX_RUNS = 8  # a history for the browser to catch up with, not an archive: run folders keep the rest
MAX_POINTS = 2000  # loss points per run; beyond it the stride doubles (the curve keeps its whole range)
MAX_SAMPLES = 400
MAX_STATUS = 20
RUNNING, STOPPED, FINISHED, ERROR = "running", "stopped", "finished", "error"
FINAL_STATES = (STOPPED, FINISHED, ERROR)

RunKey = tuple[str | None, str | None, str | None]  # (node execution id, prompt id, run name)


def _slim_metrics(event: dict[str, Any]) -> dict[str, Any]:
    """What a loss chart needs of an older metrics event; the newest is kept whole for the step line."""
    return {k: event[k] for k in ("type", "step", "loss", "total", "time") if k in event}


@dataclass
class RunRecord:
    node: str | None
    prompt_id: str | None
    run_name: str | None
    state: str = RUNNING
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    stride: int = 1
    # (sequence number, event): the sequence puts the kept events back in arrival order for replay.
    metrics: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    samples: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    progress: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    statuses: deque[tuple[int, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=MAX_STATUS))
    singles: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # hello, ready, done, ...
    last_metrics: tuple[int, dict[str, Any]] | None = None
    stop_flag: threading.Event | None = None  # set while a trainer driver can be asked to stop
    _seq: itertools.count = field(default_factory=itertools.count)

    @property
    def key(self) -> RunKey:
        return (self.node, self.prompt_id, self.run_name)

    @property
    def stoppable(self) -> bool:
        return self.state == RUNNING and self.stop_flag is not None and not self.stop_flag.is_set()

    def add(self, event: dict[str, Any]) -> None:
        event = dict(event)
        seq = next(self._seq)
        self.updated = time.time()
        kind = event.get("type")
        if kind == "metrics":
            self._add_metrics(seq, event)
        elif kind == "sample":
            self.samples.append((seq, event))
            del self.samples[:-MAX_SAMPLES]
        elif kind == "progress":
            self.progress[str(event.get("phase", ""))] = (seq, event)
        elif kind == "status":
            self.statuses.append((seq, event))
            if event.get("reused"):
                self.state = FINISHED  # the LoRA on disk already was this training
            elif event.get("interrupted") and self.state == RUNNING:
                self.state = STOPPED
        elif kind == "loss_history":
            # The curve before a resume: points already on the chart from this run are newer.
            self.singles[kind] = (seq, event)
        else:
            self.singles[str(kind)] = (seq, event)
            if kind == "done":
                self.state = STOPPED if event.get("status") == "stopped" else FINISHED
            elif kind == "error":
                self.state = ERROR

    def _add_metrics(self, seq: int, event: dict[str, Any]) -> None:
        try:
            step = int(event.get("step", 0))
        except (TypeError, ValueError):
            return
        self.last_metrics = (seq, event)
        # The newest point is always kept, even off the stride, so the chart reaches the current step.
        if self.metrics and self.metrics[-1][1]["step"] % self.stride:
            self.metrics.pop()
        self.metrics.append((seq, _slim_metrics(event) | {"step": step}))
        if len(self.metrics) > MAX_POINTS:
            self.stride *= 2
            newest = self.metrics[-1]
            self.metrics = [m for m in self.metrics[:-1] if m[1]["step"] % self.stride == 0]
            self.metrics.append(newest)

    def end(self, *, stopped: bool) -> None:
        """The node is done with the trainer; a run that never said how it ended ends here."""
        self.stop_flag = None
        if self.state == RUNNING:
            self.state = STOPPED if stopped else ERROR
        self.updated = time.time()

    def events(self) -> list[dict[str, Any]]:
        kept = [*self.metrics, *self.samples, *self.progress.values(), *self.statuses, *self.singles.values()]
        if self.last_metrics is not None and self.metrics and self.metrics[-1][0] == self.last_metrics[0]:
            kept[len(self.metrics) - 1] = self.last_metrics
        return [event for _, event in sorted(kept, key=lambda item: item[0])]

    def summary(self, *, with_events: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "prompt_id": self.prompt_id, "run_name": self.run_name,
                               "state": self.state, "started": round(self.started, 3),
                               "updated": round(self.updated, 3), "stoppable": self.stoppable}
        if with_events:
            out["events"] = self.events()
        return out


class RunStore:
    """The last few runs, keyed by (node, prompt id, run name). Thread-safe: the execution thread
    records, the server's event loop reads and asks for stops."""

    def __init__(self, max_runs: int = MAX_RUNS) -> None:
        self.max_runs = max_runs
        self._runs: dict[RunKey, RunRecord] = {}  # insertion order = age
        self._lock = threading.Lock()

    def _get(self, key: RunKey) -> RunRecord:
        record = self._runs.get(key)
        if record is not None:
            return record
        # ComfyUI runs one node at a time: a run still "running" without a trainer attached when another
        # begins ended in an exception before its trainer started (and said nothing more).
        for other in self._runs.values():
            if other.state == RUNNING and other.stop_flag is None:
                other.end(stopped=False)
        record = self._runs[key] = RunRecord(*key)
        while len(self._runs) > self.max_runs:
            oldest = next((k for k, r in self._runs.items() if r.state != RUNNING), next(iter(self._runs)))
            del self._runs[oldest]
        return record

    def record(self, key: RunKey, event: dict[str, Any]) -> None:
        with self._lock:
            self._get(key).add(event)

    def attach(self, key: RunKey) -> threading.Event:
        """A trainer driver starts for this run: the flag it polls, set by ``request_stop``."""
        flag = threading.Event()
        with self._lock:
            record = self._get(key)
            record.stop_flag = flag
            record.state = RUNNING
        return flag

    def detach(self, key: RunKey, *, stopped: bool) -> None:
        with self._lock:
            record = self._runs.get(key)
            if record is not None:
                record.end(stopped=stopped)

    def request_stop(self, node: str, run_name: str | None) -> bool:
        """Ask the running run of ``node`` (and ``run_name``, when given) to stop; False when none runs."""
        with self._lock:
            for record in reversed(list(self._runs.values())):
                if record.node == node and (run_name is None or record.run_name == run_name) and record.stoppable:
                    assert record.stop_flag is not None
                    record.stop_flag.set()
                    return True
        return False

    def runs(self, *, with_events: bool = True) -> list[dict[str, Any]]:
        with self._lock:
            return [r.summary(with_events=with_events) for r in reversed(list(self._runs.values()))]

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()


STORE = RunStore()

_routes_registered = False


def _bad_request(web: Any, message: str, status: int = 400) -> Any:
    return web.json_response({"error": message}, status=status)


def register_routes() -> None:
    """Registers the live view's HTTP routes on ComfyUI's server (once)."""
    global _routes_registered
    if _routes_registered:
        return
    try:
        from aiohttp import web
        from server import PromptServer

        routes = PromptServer.instance.routes
    except (ImportError, AttributeError):  # not inside a ComfyUI server (a script importing the nodes)
        logger.debug("no PromptServer to add the live view's routes to", exc_info=True)
        return
    from . import trainer_process  # imports ComfyUI: only inside a server

    async def json_body(request: web.Request) -> dict[str, Any] | None:
        try:
            body = await request.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    @routes.get("/dreambooth/runs")
    async def runs(request: web.Request) -> web.Response:
        return web.json_response({"runs": STORE.runs()})

    @routes.post("/dreambooth/stop")
    async def stop(request: web.Request) -> web.Response:
        body = await json_body(request)
        if body is None or not isinstance(body.get("node"), (str, int)) or isinstance(body.get("node"), bool):
            return _bad_request(web, 'POST /dreambooth/stop needs a JSON body {"node": "<execution id of the '
                                     'DreamBooth Train node>", "run_name": "<its lora_name>"}')
        node, run_name = str(body["node"]), body.get("run_name")
        if run_name is not None and not isinstance(run_name, str):
            return _bad_request(web, f"run_name must be the node's lora_name as a string, got {run_name!r}")
        if not STORE.request_stop(node, run_name):
            running = [f"node {r['node']} ({r['run_name']})" for r in STORE.runs(with_events=False) if r["stoppable"]]
            return _bad_request(web, f"no training of node {node}" + (f" with lora_name {run_name!r}" if run_name else "")
                                + " is running" + (f"; running now: {', '.join(running)}" if running else "")
                                + ". It may have just ended: reload the run list.", status=404)
        logger.info("stop requested from the web UI for node %s (%s)", node, run_name)
        return web.json_response({"stopping": True})

    @routes.get("/dreambooth/settings")
    async def get_settings(request: web.Request) -> web.Response:
        return web.json_response(trainer_process.live_settings())

    @routes.post("/dreambooth/settings")
    async def post_settings(request: web.Request) -> web.Response:
        body = await json_body(request)
        value = body.get("prestart_trainer") if body is not None else None
        if not isinstance(value, bool):
            return _bad_request(web, 'POST /dreambooth/settings needs a JSON body {"prestart_trainer": true or '
                                     f"false}}, got {body!r}")
        # Closing or starting a trainer process waits on it: off the event loop.
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, trainer_process.set_prestart_trainer, value)
        return web.json_response(trainer_process.live_settings())

    _routes_registered = True
