"""Training speed, start-up time and memory: the pack's trainer against its two peers.

The work is the same for everyone: the tiny SD1.5 test checkpoint (``--scale full``: an SD1.5-shaped
random checkpoint, 860M-parameter UNet, 2.1 GB; ``--scale sdxl-tiny``: the tiny SDXL test checkpoint, SDXL's
blocks at 320 channels with both full-size text encoders, 2.4 GB, against TrainLoraNode only), the 5
DreamBench dog photos at 64 px (``--resolution``),
batch 1, LoRA rank 4 (alpha 4), fp32, one BLAS thread per process. Each of our runs is paired with the
peer that trains the same layers: ``ours-unet-all`` with ``native`` (every UNet layer),
``ours-unet`` / ``ours-te`` with ``diffusers-unet`` / ``diffusers-te`` (attention q/k/v/out).

Peers, run interleaved (per repeat: every peer's short run, then every peer's long run):
- ``ours-unet`` / ``ours-te``: ``python -m trainer --config run.json`` (UNet-only / UNet + text encoder),
  LoRA on the attention layers as diffusers' example script does.
- ``ours-unet-all``: UNet only with ``unet_target: full`` (LoRA on every attention, feed-forward, projection,
  resnet conv, time-embedding and resampler layer), TrainLoraNode's work.
- ``ours-unet-warm`` / ``ours-te-warm``: the same run given to a warm trainer (``--config -``, started
  ahead and waiting with its libraries imported, as the ComfyUI node gets one); launch -> first step is
  timed from the moment the config is handed over. Short runs only: the steps are the same as above.
  ``ours-unet-all-warm`` is ``ours-unet-all``'s warm run (``--scale sdxl-tiny`` only).
- ``native``: ComfyUI's own TrainLoraNode in a real ComfyUI server, driven with POST /prompt
  (CheckpointLoaderSimple -> LoadImageDataSetFromFolder -> VAEEncode, CLIPTextEncode -> TrainLoraNode
  -> SaveLoRA). A fresh server per run, so every prompt loads the checkpoint.
- ``diffusers-unet`` / ``diffusers-te``: ``benchmarks/diffusers_loop.py``, the example script's loop.

Measured per run: wall time (differenced between a short and a long run to cancel load and save
time), the step events' times, launch -> first step, peak RSS, and the CPU load of unrelated
processes meanwhile. See benchmarks/README.md.

    python benchmarks/bench_train.py [--repeats N] [--quick] [--only ours|native|diffusers]
    python benchmarks/bench_train.py --scale full --resolution 256 --short 1 --long 4 --in-run-only --repeats 2
    python benchmarks/bench_train.py --scale sdxl-tiny --short 5 --long 30 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_loader import load_by_path
from PIL import Image, ImageOps

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


report = load_by_path("dreambooth_bench_report", BENCH_DIR / "bench_report.py")
Sample = report.Sample

log = logging.getLogger("bench_train")

PHOTOS = REPO / "tests" / "assets" / "dreambench" / "dog"  # 5 DreamBench photos, 256 px, kept in the repo
RESULTS_MD = BENCH_DIR / "RESULTS.md"
SUPPORT_PACKAGE = "dreambooth_test_support"
PROMPT = "a photo of sks dog"
RANK, ALPHA, BATCH, SEED, LEARNING_RATE = 4, 4.0, 1, 0, 1e-4
NATIVE_CKPT = {"tiny": "tiny-sd15.safetensors", "full": "bench-sd15-full.safetensors",
               "sdxl-tiny": "bench-sdxl-tiny.safetensors"}
GROUPS = {"ours": ["ours-unet", "ours-unet-all", "ours-te", "ours-unet-warm", "ours-te-warm", "ours-unet-all-warm"],
          "native": ["native"], "diffusers": ["diffusers-unet", "diffusers-te"]}
# SDXL: only TrainLoraNode's work (every UNet layer, text encoders frozen) is compared; the diffusers
# loop and the attention-only peers are SD1.5 code.
SDXL_PEERS = {"ours-unet-all", "native", "ours-unet-all-warm"}
WARM_IDLE_S = 1.0  # how long a warm trainer waits, after saying ready, before the bench hands it the run


# --------------------------------------------------------------------------- measuring processes


def busy_cpu_seconds() -> float:
    """CPU seconds all cores have spent busy since boot."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def own_cpu_seconds() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def cpu_of(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return 0.0


class LoadMeter:
    """Cores kept busy by processes other than this script and the peer it is measuring."""

    def __init__(self) -> None:
        self.busy0, self.self0 = busy_cpu_seconds(), own_cpu_seconds()

    def others(self, peer_cpu: float, wall: float) -> float | None:
        if wall <= 0:
            return None
        spent = busy_cpu_seconds() - self.busy0 - (own_cpu_seconds() - self.self0) - peer_cpu
        return round(max(0.0, spent) / wall, 2)


def wait_for_quiet(limit_s: float) -> None:
    """Wait (at most limit_s) until other processes use less than report.QUIET_LOAD cores."""
    deadline = time.monotonic() + limit_s
    while True:
        meter = LoadMeter()
        time.sleep(2.0)
        load = meter.others(0.0, 2.0) or 0.0
        if load < report.QUIET_LOAD or time.monotonic() > deadline:
            if load >= report.QUIET_LOAD:
                log.warning("machine still busy (%.2f cores used by other processes); measuring anyway", load)
            return
        log.info("waiting for a quiet machine (%.2f cores used by other processes)", load)


class RssPoller:
    """Peak RSS of one process, sampled every 20 ms (for processes this script does not reap)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process may end between two samples
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class ChildResult:
    wall_s: float
    events: list[tuple[float, dict[str, Any]]]  # (arrival s since launch, event)
    peak_rss: int
    rss_method: str
    other_load: float | None


def run_child(cmd: list[str], env: dict[str, str], log_path: Path, *, handover: str | None = None) -> ChildResult:
    """Run a child that prints JSON lines; time it from launch to exit and read its peak RSS.

    With ``handover`` the child is a warm trainer: that line goes to its stdin WARM_IDLE_S after its
    ready event, and times (wall and events) count from then; earlier events get negative times.
    """
    meter = LoadMeter()
    t0 = time.perf_counter()
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.PIPE if handover else subprocess.DEVNULL)
        poller = None if hasattr(os, "wait4") else RssPoller(proc.pid)
        events: list[tuple[float, dict[str, Any]]] = []
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                now = time.perf_counter() - t0
                try:
                    event = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                events.append((now, event))
                if handover and event.get("type") == "ready":
                    assert proc.stdin is not None
                    time.sleep(WARM_IDLE_S)
                    shift = time.perf_counter() - t0
                    t0 += shift
                    events = [(t - shift, e) for t, e in events]
                    proc.stdin.write(handover.encode())
                    proc.stdin.flush()
        except BaseException:
            proc.kill()  # interrupted: leave no training process behind
            proc.wait()
            raise
        if poller is None:
            # The kernel's own high-water mark of this one child: exact, no sampling gaps.
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            method, child_cpu = "ru_maxrss", usage.ru_utime + usage.ru_stime
        else:
            child_cpu = cpu_of(proc.pid)
            proc.wait()
            peak, method = poller.stop(), "psutil 20 ms"
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}; log {log_path}:\n{tail}")
    return ChildResult(wall, events, peak, method, meter.others(child_cpu, wall))


# --------------------------------------------------------------------------- peers


class Bench:
    def __init__(self, work: Path, scale: str, resolution: int) -> None:
        support = REPO / "tests" / "support"
        load_by_path(SUPPORT_PACKAGE, support / "__init__.py", package=True)
        self.paths = importlib.import_module(f"{SUPPORT_PACKAGE}.paths")
        self.comfyui = importlib.import_module(f"{SUPPORT_PACKAGE}.comfyui")
        load_by_path("dreambooth_bench_engine", REPO / "trainer" / "__init__.py", package=True)
        self.protocol = importlib.import_module("dreambooth_bench_engine.protocol")
        self.launcher = importlib.import_module("dreambooth_bench_engine.launcher")
        tiny = importlib.import_module(f"{SUPPORT_PACKAGE}.tiny_models")
        self.work, self.scale, self.resolution = work, scale, resolution
        self.comfy_root = self.comfyui.provision_comfyui()
        build = {"full": tiny.sd15_full_checkpoint, "sdxl-tiny": tiny.tiny_sdxl_checkpoint}.get(
            scale, tiny.tiny_sd15_checkpoint)
        self.ckpt = build(self.comfy_root)
        self.native_ckpt = NATIVE_CKPT[scale]
        self.native_folder = f"bench_dog_{resolution}"  # input sub-folder LoadImageDataSetFromFolder reads
        self.env = self.paths.child_env({"MKL_NUM_THREADS": "1"})
        self.trainer_cache = work / "trainer-cache"
        self.comfy_base = work / "comfy-base"
        self.counter = 0

    def _fresh(self, name: str) -> Path:
        self.counter += 1
        path = self.work / "runs" / f"{self.counter:03d}-{name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def ours(self, steps: int, train_te: bool, repeat: int, warm: bool = False, all_layers: bool = False) -> Sample:
        peer = ("ours-te" if train_te else "ours-unet") + ("-all" if all_layers else "") + ("-warm" if warm else "")
        run = self._fresh(peer)
        config = {
            "pretrained_model": str(self.ckpt), "instance_data_dir": str(PHOTOS), "instance_prompt": PROMPT,
            "output_dir": str(run / "out"), "resolution": self.resolution, "train_batch_size": BATCH,
            "max_train_steps": steps, "rank": RANK, "alpha": ALPHA, "train_text_encoder": train_te,
            "unet_target": "full" if all_layers else "attn",
            "learning_rate": LEARNING_RATE, "mixed_precision": "no", "device": "cpu", "seed": SEED,
            "resume": "none",
            # Shared like a user's cache: the checkpoint's SHA-256 is memoised after the first run.
            "cache_dir": str(self.trainer_cache),
        }
        cfg_path = run / "run.json"
        cfg_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
        cmd = self.launcher.trainer_command("-" if warm else str(cfg_path), pack_root=REPO)
        res = run_child(cmd, self.env, run / "trainer.log",
                        handover=self.protocol.config_command(cfg_path) if warm else None)
        steps_at = [t for t, e in res.events if e.get("type") == "progress" and e.get("phase") == "train"
                    and e.get("step", 0) >= 1]
        reported = [e["ms_per_step"] for _, e in res.events if e.get("type") == "metrics"]
        phases = our_phases(res.events)
        if warm:
            ready_at = next(t for t, e in res.events if e.get("type") == "ready")
            phases = {"(not counted: spawn -> ready, imports while waiting)": round(ready_at - res.events[0][0], 3),
                      **phases}
        model_load = next((v for k, v in phases.items() if k.startswith("model load")), None)
        return Sample(peer, steps, repeat, res.wall_s, steps_at[0], res.peak_rss, res.rss_method,
                      step_times=steps_at, reported_ms=reported[-1] if reported else None,
                      other_load=res.other_load, phases=phases,
                      extra={} if model_load is None else {"model_load_s": model_load})

    def diffusers(self, steps: int, train_te: bool, repeat: int) -> Sample:
        peer = "diffusers-te" if train_te else "diffusers-unet"
        run = self._fresh(peer)
        cmd = [sys.executable, str(BENCH_DIR / "diffusers_loop.py"), "--pretrained", str(self.ckpt),
               "--data-dir", str(PHOTOS), "--prompt", PROMPT, "--resolution", str(self.resolution),
               "--steps", str(steps), "--rank", str(RANK), "--batch-size", str(BATCH),
               "--learning-rate", str(LEARNING_RATE), "--seed", str(SEED), "--output", str(run / "lora"),
               "--t0", repr(time.time())]
        if train_te:
            cmd.append("--train-text-encoder")
        res = run_child(cmd, self.env, run / "loop.log")
        steps_at = [t for t, e in res.events if e.get("type") == "progress"]
        done = next(e for _, e in res.events if e.get("type") == "done")
        loaded = next(t for t, e in res.events if e.get("type") == "loaded")
        return Sample(peer, steps, repeat, res.wall_s, steps_at[0], res.peak_rss, res.rss_method,
                      step_times=steps_at, reported_ms=done["ms_per_step"], other_load=res.other_load,
                      phases={"imports + load + LoRA set-up": loaded, "first step": steps_at[0] - loaded})

    def prepare_native(self) -> None:
        folder = self.comfy_base / "input" / self.native_folder
        folder.mkdir(parents=True, exist_ok=True)
        size = (self.resolution, self.resolution)
        for jpg in sorted(PHOTOS.glob("*.jpg")):
            with Image.open(jpg) as im:
                fitted = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), size, Image.Resampling.BICUBIC)
            fitted.save(folder / f"{jpg.stem}.png")
        self.comfyui.ComfyServer(self.comfy_root, self.comfy_base).add_model("checkpoints", self.ckpt,
                                                                             self.native_ckpt)

    def native_prompt(self, steps: int, seed: int) -> dict[str, Any]:
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": self.native_ckpt}},
            "2": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": self.native_folder}},
            "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
            "5": {"class_type": "TrainLoraNode", "inputs": {
                "model": ["1", 0], "latents": ["3", 0], "positive": ["4", 0], "batch_size": BATCH,
                "grad_accumulation_steps": 1, "steps": steps, "learning_rate": LEARNING_RATE, "rank": RANK,
                "optimizer": "AdamW", "loss_function": "MSE", "seed": seed, "training_dtype": "fp32",
                "lora_dtype": "fp32", "algorithm": "LoRA",
                # Off, as in ours and the diffusers loop (FACTS: ~400 instead of 304 ms/step with it).
                "gradient_checkpointing": False, "existing_lora": "[None]"}},
            "6": {"class_type": "SaveLoRA", "inputs": {"lora": ["5", 1], "prefix": "loras/bench", "steps": ["5", 3]}},
        }

    def native(self, steps: int, repeat: int) -> Sample:
        import websocket

        run = self._fresh("native")
        server = self.comfyui.ComfyServer(self.comfy_root, self.comfy_base)
        server.log_path = run / "comfyui.log"
        server.start()
        try:
            assert server.proc is not None
            pid = server.proc.pid
            poller = RssPoller(pid)
            client_id = uuid.uuid4().hex
            ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=10)
            ws.settimeout(1.0)
            node_start: dict[str, float] = {}
            executing: list[tuple[float, str]] = []  # (arrival, node) of every `executing` event, in order
            steps_at: list[float] = []
            try:
                meter, server_cpu0 = LoadMeter(), cpu_of(pid)
                t0 = time.perf_counter()
                prompt_id = server.queue_prompt(self.native_prompt(steps, SEED + repeat), client_id)
                while True:
                    if time.perf_counter() - t0 > 900:
                        raise RuntimeError(f"native prompt did not finish:\n{server.log_tail()}")
                    try:
                        msg = ws.recv()
                    except websocket.WebSocketTimeoutException:
                        continue
                    if isinstance(msg, bytes):
                        continue  # previews
                    now = time.perf_counter() - t0
                    event = json.loads(msg)
                    data = event.get("data") or {}
                    if data.get("prompt_id") != prompt_id:
                        continue
                    kind = event.get("type")
                    if kind == "executing" and data.get("node") is not None:
                        node_start.setdefault(str(data["node"]), now)
                        executing.append((now, str(data["node"])))
                    elif kind == "progress" and str(data.get("node")) == "5" and data.get("value", 0) >= 1:
                        steps_at.append(now)
                    elif kind == "execution_success":
                        wall = now
                        break
                    elif kind in ("execution_error", "execution_interrupted"):
                        raise RuntimeError(f"native prompt failed: {json.dumps(data)[:3000]}")
            finally:
                ws.close()
            load = meter.others(cpu_of(pid) - server_cpu0, wall)
            peak, baseline = poller.stop(), poller.baseline
        finally:
            server.stop()
        if not steps_at:
            raise RuntimeError("TrainLoraNode sent no progress event")
        train_at = node_start.get("5", steps_at[0])
        phases = {"checkpoint load + images + VAE/CLIP encode": train_at,
                  "LoRA set-up + first step": steps_at[0] - train_at}
        # CheckpointLoaderSimple ("1") runs until the next node starts executing.
        after = [t for t, node in executing if t > node_start.get("1", wall) and node != "1"]
        ckpt_load = (min(after) if after else wall) - node_start.get("1", 0.0)
        return Sample("native", steps, repeat, wall, steps_at[0], peak, "psutil 20 ms, server process",
                      step_times=steps_at, other_load=load, phases=phases,
                      extra={"server_start_s": round(server.startup_seconds or 0.0, 2),
                             "rss_before_prompt": baseline, "rss_increase": peak - baseline,
                             "model_load_s": round(ckpt_load, 3)})


def our_phases(events: list[tuple[float, dict[str, Any]]]) -> dict[str, float]:
    """Launch phases of our trainer from its own events (arrival times at the launcher).

    A warm trainer's events before the handover (negative times) are its warm-up, not the launch.
    """
    marks: list[tuple[str, float]] = []
    warm = any(t < 0 for t, _ in events)
    for t, e in events:
        kind, msg, step = e.get("type"), str(e.get("message", "")), e.get("step")
        if t < 0:
            continue
        if kind == "hello":
            marks.append(("interpreter + protocol import", t))
        elif kind == "status" and msg.startswith("reading instance images"):
            marks.append(("config" if warm else "torch/accelerate import + config", t))
        elif kind == "status" and msg.startswith("loading "):
            marks.append(("read photos", t))
        elif kind == "status" and msg.startswith("caching latents"):
            marks.append(("model load" if warm else "model load (incl. diffusers/transformers model imports)", t))
        elif kind == "progress" and e.get("phase") == "train" and step == 0:
            marks.append(("caches + LoRA set-up", t))
        elif kind == "progress" and e.get("phase") == "train" and step == 1:
            marks.append(("first step", t))
            break
    phases, prev = {}, 0.0
    for name, t in marks:
        phases[name] = round(t - prev, 3)
        prev = t
    return phases


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 vs 6 steps, 1 repeat, no warm-up")
    parser.add_argument("--only", choices=sorted(GROUPS), action="append",
                        help="run only this peer group (repeatable)")
    parser.add_argument("--peers", default="", help="comma-separated peers to run (default: all of --only's groups)")
    parser.add_argument("--scale", choices=["tiny", "full", "sdxl-tiny"], default="tiny",
                        help="tiny: the test checkpoint (default); full: SD1.5-shaped random weights (2.1 GB file); "
                             "sdxl-tiny: the tiny SDXL test checkpoint (2.4 GB file), ours-unet-all(-warm) vs native")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution in px (default 64)")
    parser.add_argument("--short", type=int, default=10, help="steps of the short run (default 10)")
    parser.add_argument("--long", type=int, default=60, help="steps of the long run (default 60)")
    parser.add_argument("--in-run-only", action="store_true",
                        help="skip the short runs: ms/step is the in-run figure over steps short+1..long of the long "
                             "run (for full size, where a run costs minutes)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each run wait up to S seconds for other processes to go quiet "
                             f"(< {report.QUIET_LOAD} cores); for shared machines")
    parser.add_argument("--work-dir", type=Path, default=BENCH_DIR / "out", help="scratch folder (git-ignored)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"markdown file to update (default: {RESULTS_MD.name} for a full run, "
                             "<work-dir>/last_results.md for --quick/--only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    short, long, repeats = (2, 6, 1) if args.quick else (args.short, args.long, args.repeats)
    if not 0 < short < long or repeats < 1:
        parser.error("need 0 < --short < --long and --repeats >= 1")
    if not PHOTOS.is_dir():
        parser.error(f"missing {PHOTOS}: the DreamBench photos are part of the repository (tests/assets)")
    wanted = {p for g in (args.only or list(GROUPS)) for p in GROUPS[g]}
    if args.scale == "sdxl-tiny":
        wanted &= SDXL_PEERS
    else:
        wanted.discard("ours-unet-all-warm")  # the SD1.5 records keep their peer set
    if args.peers:
        chosen = {p.strip() for p in args.peers.split(",") if p.strip()}
        if chosen - set(report.PEERS):
            parser.error(f"unknown peers {sorted(chosen - set(report.PEERS))}; known: {', '.join(report.PEERS)}")
        wanted &= chosen
    peers = [p for p in report.PEERS if p in wanted]
    if not peers:
        parser.error(f"no peer left to run (--scale {args.scale} runs {', '.join(sorted(SDXL_PEERS))})"
                     if args.scale == "sdxl-tiny" else "no peer left to run")
    partial = args.quick or args.only or args.peers
    results = args.results or (RESULTS_MD if not partial else args.work_dir / "last_results.md")
    markers = report.markers(args.scale, args.resolution)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    # A plain SIGTERM would skip the finally blocks that stop ComfyUI servers and children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.perf_counter()
    code_before = report.code_version()
    bench = Bench(work, args.scale, args.resolution)
    if "native" in peers:
        bench.prepare_native()
    runners = {
        "ours-unet": lambda n, r: bench.ours(n, False, r), "ours-te": lambda n, r: bench.ours(n, True, r),
        "ours-unet-all": lambda n, r: bench.ours(n, False, r, all_layers=True),
        "ours-unet-warm": lambda n, r: bench.ours(n, False, r, warm=True),
        "ours-te-warm": lambda n, r: bench.ours(n, True, r, warm=True),
        "ours-unet-all-warm": lambda n, r: bench.ours(n, False, r, warm=True, all_layers=True),
        "native": lambda n, r: bench.native(n, r),
        "diffusers-unet": lambda n, r: bench.diffusers(n, False, r),
        "diffusers-te": lambda n, r: bench.diffusers(n, True, r),
    }
    if not args.quick:
        # Fills the page cache with the checkpoint and our SHA-256 memo; not measured.
        log.info("warm-up run (not measured)")
        (bench.ours if peers[0].startswith("ours") else bench.diffusers)(1, False, -1)
    samples: list[Sample] = []
    lengths = (long,) if args.in_run_only else (short, long)
    for r in range(repeats):
        for steps in lengths:
            for peer in peers:
                run_steps = steps
                if peer.endswith("-warm"):
                    if steps != lengths[0]:
                        continue  # only its launch differs from the cold peer's
                    run_steps = max(short, 1)
                if args.wait_quiet > 0:
                    wait_for_quiet(args.wait_quiet)
                sample = runners[peer](run_steps, r)
                samples.append(sample)
                log.info("repeat %d %-15s %3d steps: wall %6.2f s, first step %5.2f s, peak RSS %s, other load %s",
                         r + 1, peer, run_steps, sample.wall_s, sample.first_step_s, report.gb(sample.peak_rss),
                         sample.other_load)
    total = time.perf_counter() - started

    summary = report.summarize(samples, short, long)
    body = report.render(summary, short, long, repeats, scale=args.scale, resolution=args.resolution,
                         in_run_only=args.in_run_only)
    info = report.machine_info()
    if report.code_changed(code_before, info["code"]):
        info["code"] += f"; WARNING: the trainer changed during the run (it started at {code_before})"
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()), *sys.argv[1:]])
    raw = work / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    raw.write_text(json.dumps({"machine": info, "command": command, "scale": args.scale,
                               "resolution": args.resolution, "short": short, "long": long,
                               "summary": summary, "samples": [asdict(s) for s in samples]}, indent=1),
                   encoding="utf-8")
    print(body)
    results.parent.mkdir(parents=True, exist_ok=True)
    report.write_results(results, body, info, command, total, markers=markers,
                         heading=report.heading(args.scale, args.resolution))
    print(f"\nwrote {results} and {raw} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
