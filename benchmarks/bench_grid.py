"""Comparison grid vs the same cells queued as native ComfyUI prompts: wall time per cell.

One real ComfyUI server (this pack installed, started once) with the tiny SD1.5 test checkpoint and
two LoRAs in the layout the pack's trainer writes (kohya keys on the UNet attention q/k/v/out and
the CLIP-L attention q/k/v/out_proj, rank 4, alpha 4, fp16), built here with the trainer's own
``kohya_state_dict`` and random weights. The cells: the base model and each LoRA at two UNet
strengths (text-encoder strength 1) x 3 prompts, one seed, euler / normal, CFG 7.5.

Peers, on the same cells, in rotated order per repeat:
- ``grid``: one prompt, CheckpointLoaderSimple -> DreamBoothCompareGrid (which also draws and saves
  the grid, the cell PNGs and its JSON/CSV table); POST /prompt -> execution_success.
- ``native-separate``: one prompt per cell, CheckpointLoaderSimple -> LoraLoader (LoRA rows) ->
  CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage, all queued at once;
  first POST -> last execution_success.
- ``native-one-graph``: all cells as one native prompt (one LoraLoader and one negative encode per
  row, as the grid shares them); POST -> execution_success.

ComfyUI's output cache must not do any peer's work: every run appends its own tag to every prompt
and to the negative prompt (CLIP always encodes 77 padded tokens, so the tag costs nothing), and the
script checks the websocket's ``execution_cached`` lists: only the checkpoint loader, and within one
run a row's LoraLoader / negative encode, may come from the cache. The untimed warm-up runs use one
tag for all peers, and their cells are compared pixel by pixel (the grid must produce what native
prompts produce).

    python benchmarks/bench_grid.py [--repeats N] [--steps S] [--size PX] [--quick] [--record]
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
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_loader import load_by_path
from PIL import Image

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SUPPORT_PACKAGE = "dreambooth_test_support"

bench_train = load_by_path("dreambooth_bench_train", BENCH_DIR / "bench_train.py")
report = bench_train.report
LoadMeter, cpu_of = bench_train.LoadMeter, bench_train.cpu_of

MEASURED_CODE = ("nodes/compare_grid.py", "nodes/lora_loader.py")  # the grid node and the LoRA helper it calls: hashed before and after a run
log = logging.getLogger("bench_grid")

RESULTS_MD = BENCH_DIR / "RESULTS.md"
BEGIN, END = "<!-- bench_grid:begin -->", "<!-- bench_grid:end -->"
CKPT = "tiny-sd15.safetensors"
LORAS = ("bench grid lora a.safetensors", "bench grid lora b.safetensors")
PROMPTS = ("a photo of sks dog", "a photo of sks dog on the beach", "a watercolor painting of sks dog")
NEGATIVE = "blurry, low quality"
UNET_STRENGTHS = (0.5, 1.0)
TE_STRENGTH, CFG, SEED, SAMPLER, SCHEDULER = 1.0, 7.5, 7, "euler", "normal"
GRID_NODE = "DreamBoothCompareGrid"
PEERS = {"grid": "DreamBoothCompareGrid, one prompt",
         "native-separate": "native, one prompt per cell (all queued at once)",
         "native-one-graph": "native, all cells in one prompt"}
# Nodes whose output may legitimately come from ComfyUI's cache (shared set-up, not per-cell work).
MAY_BE_CACHED = {"CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode", "EmptyLatentImage"}


@dataclass(frozen=True)
class Row:
    lora: str | None  # None: the base model
    unet: float


ROWS = (Row(None, 0.0), *(Row(name, u) for name in LORAS for u in UNET_STRENGTHS))


@dataclass
class Run:
    peer: str
    repeat: int  # -1: warm-up
    tag: str
    cells: int
    prompts: int
    wall_s: float
    other_load: float | None
    cached: dict[str, int] = field(default_factory=dict)  # class_type -> nodes served from the cache
    phases: dict[str, float] = field(default_factory=dict)  # seconds by node class (grid: by part)

    @property
    def ms_per_cell(self) -> float:
        return 1000 * self.wall_s / self.cells


# --------------------------------------------------------------------------- LoRA files


def build_loras(dest: Path) -> list[Path]:
    """Two LoRAs exactly as the trainer lays them out (UNet + text encoder), random non-zero up weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    load_by_path("dreambooth_bench_engine", REPO / "trainer" / "__init__.py", package=True)
    lora = importlib.import_module("dreambooth_bench_engine.lora")
    SD1 = importlib.import_module("dreambooth_bench_engine.families").SD1
    tiny = importlib.import_module(f"{SUPPORT_PACKAGE}.tiny_models")
    # Only the attention projections get LoRA layers, so a CLIP-L with a small MLP gives the same
    # keys and shapes in a fraction of the build time.
    te_config = {**tiny.CLIP_L_TEXT_CONFIG, "intermediate_size": 64}
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(LORAS):
        torch.manual_seed(100 + i)
        unet = UNet2DConditionModel(**tiny.TINY_UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**te_config))
        lora.add_lora(unet, rank=4, alpha=4.0, targets=lora.UNET_TARGETS["attn"], dropout=0.0)
        lora.add_lora(text, rank=4, alpha=4.0, targets=lora.TEXT_ENCODER_TARGETS["attn"], dropout=0.0)
        with torch.no_grad():  # trained LoRAs have non-zero up weights; a fresh one is a no-op
            for model in (unet, text):
                for _, layer in lora.lora_layers(model):
                    layer.lora_B[lora.ADAPTER].weight.normal_(0.0, 0.05)
        tensors = lora.kohya_state_dict(unet, [text], SD1, torch.float16)
        path = dest / name
        save_file(tensors, str(path), metadata={"format": "pt"})
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- prompts


def tagged(text: str, tag: str) -> str:
    return f"{text}, {tag}"


def grid_prompt(tag: str, steps: int, size: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": GRID_NODE, "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
            "prompts": "\n".join(tagged(p, tag) for p in PROMPTS), "include_base": True,
            "lora_names": "\n".join(LORAS), "unet_strengths": ", ".join(f"{u:g}" for u in UNET_STRENGTHS),
            "text_encoder_strengths": f"{TE_STRENGTH:g}", "cfgs": f"{CFG:g}",
            "negative_prompt": tagged(NEGATIVE, tag), "seed": SEED, "steps": steps, "sampler_name": SAMPLER,
            "scheduler": SCHEDULER, "width": size, "height": size, "filename_prefix": f"bench_grid_{tag}"}},
    }


def native_graph(cells: list[tuple[int, int]], tag: str, steps: int, size: int) -> dict[str, Any]:
    """Native nodes for ``cells`` ((row, column) pairs); a row's LoraLoader and negative encode are shared."""
    graph: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }
    ids = iter(range(3, 1_000_000))
    per_row: dict[int, tuple[list[Any], str]] = {}
    for r, c in cells:
        row = ROWS[r]
        if r not in per_row:
            model, clip = ["1", 0], ["1", 1]
            if row.lora is not None:
                lid = str(next(ids))
                graph[lid] = {"class_type": "LoraLoader", "inputs": {
                    "model": model, "clip": clip, "lora_name": row.lora, "strength_model": row.unet,
                    "strength_clip": TE_STRENGTH}}
                model, clip = [lid, 0], [lid, 1]
            nid = str(next(ids))
            graph[nid] = {"class_type": "CLIPTextEncode", "inputs": {"text": tagged(NEGATIVE, tag), "clip": clip}}
            per_row[r] = ([model, clip], nid)
        (model, clip), neg = per_row[r]
        pos, ks, dec, save = (str(next(ids)) for _ in range(4))
        graph[pos] = {"class_type": "CLIPTextEncode", "inputs": {"text": tagged(PROMPTS[c], tag), "clip": clip}}
        graph[ks] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": steps, "cfg": CFG, "sampler_name": SAMPLER, "scheduler": SCHEDULER,
            "positive": [pos, 0], "negative": [neg, 0], "latent_image": ["2", 0], "denoise": 1.0}}
        graph[dec] = {"class_type": "VAEDecode", "inputs": {"samples": [ks, 0], "vae": ["1", 2]}}
        graph[save] = {"class_type": "SaveImage", "inputs": {
            "images": [dec, 0], "filename_prefix": f"bench_native/{tag}/r{r}_c{c}"}}
    return graph


def all_cells() -> list[tuple[int, int]]:
    return [(r, c) for r in range(len(ROWS)) for c in range(len(PROMPTS))]


# --------------------------------------------------------------------------- running


def run_prompts(server: Any, graphs: list[dict[str, Any]],
                timeout: float = 900.0) -> tuple[float, dict[str, int], dict[str, float]]:
    """Queue every graph at once; wall seconds from the first POST to the last execution_success.

    Also returns how many nodes of each class ComfyUI served from its cache instead of running them,
    and where the time went (``phases``, from the websocket's executing / progress events).
    """
    import websocket

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=10)
    ws.settimeout(1.0)
    cached: dict[str, int] = {}
    phases: dict[str, float] = {}
    current: tuple[str, float] | None = None  # the running node's phase and since when
    ticks: list[float] = []  # the grid node's one-per-cell progress
    start = 0.0  # when the grid node began

    def close(now: float) -> None:
        nonlocal current
        if current is not None:
            phases[current[0]] = phases.get(current[0], 0.0) + now - current[1]
            current = None

    try:
        t0 = time.perf_counter()
        pending = {}
        for graph in graphs:
            pending[server.queue_prompt(graph, client_id)] = graph
        while pending:
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{len(pending)} prompt(s) did not finish:\n{server.log_tail()}")
            try:
                msg = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(msg, bytes):
                continue  # previews
            event = json.loads(msg)
            data, kind = event.get("data") or {}, event.get("type")
            graph = pending.get(data.get("prompt_id"))
            if graph is None:
                continue
            now = time.perf_counter() - t0
            if kind == "executing":
                close(now)
                if data.get("node") is not None:
                    current = (graph[str(data["node"])]["class_type"], now)
                    if current[0] == GRID_NODE:
                        start = now
            elif kind == "progress" and graph.get(str(data.get("node")), {}).get("class_type") == GRID_NODE:
                ticks.append(now)
            if kind == "execution_cached":
                for node in data.get("nodes") or []:
                    cls = graph[str(node)]["class_type"]
                    cached[cls] = cached.get(cls, 0) + 1
            elif kind == "execution_success":
                close(now)
                pending.pop(data["prompt_id"])
                wall = time.perf_counter() - t0
            elif kind in ("execution_error", "execution_interrupted"):
                raise RuntimeError(f"prompt failed: {json.dumps(data)[:3000]}\n{server.log_tail()}")
    finally:
        ws.close()
    if ticks and GRID_NODE in phases:
        # Split the grid node's time by its per-cell ticks; a row's first cell also applies the row's
        # LoRA and encodes its prompts and negative.
        node = phases.pop(GRID_NODE)
        n = len(PROMPTS)
        gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
        phases["grid: set-up, first row's LoRA + encodes, first cell"] = ticks[0] - start
        phases["grid: later rows' first cell (LoRA apply + encodes + cell)"] = sum(
            g for i, g in enumerate(gaps, start=1) if i % n == 0)
        phases["grid: other cells (sample + decode)"] = sum(g for i, g in enumerate(gaps, start=1) if i % n)
        phases["grid: after the last cell (draw + save)"] = node - (ticks[-1] - start)
    phases["outside nodes (queue, HTTP, between prompts)"] = wall - sum(phases.values())
    return wall, cached, {k: round(v, 3) for k, v in phases.items()}


class Bench:
    def __init__(self, work: Path, steps: int, size: int) -> None:
        support = REPO / "tests" / "support"
        load_by_path(SUPPORT_PACKAGE, support / "__init__.py", package=True)
        paths = importlib.import_module(f"{SUPPORT_PACKAGE}.paths")
        comfyui = importlib.import_module(f"{SUPPORT_PACKAGE}.comfyui")
        tiny = importlib.import_module(f"{SUPPORT_PACKAGE}.tiny_models")
        self.steps, self.size = steps, size
        root = comfyui.provision_comfyui()
        ckpt = tiny.tiny_sd15_checkpoint(root)
        self.base = work / "comfy-base"
        # Outputs of an earlier invocation carry the same tags; cell_pixels must find only this one's.
        shutil.rmtree(self.base / "output", ignore_errors=True)
        self.server = comfyui.ComfyServer(root, self.base)
        self.server.install_pack(REPO, paths.PACK_NAME)
        self.server.add_model("checkpoints", ckpt, CKPT)
        for path in build_loras(work / "loras"):
            self.server.add_model("loras", path)
        self.counter = 0

    def start(self) -> None:
        self.server.start()
        log.info("ComfyUI up in %.1f s", self.server.startup_seconds or 0.0)

    def run(self, peer: str, repeat: int, tag: str | None = None) -> Run:
        self.counter += 1
        tag = tag or f"take {self.counter:03d}"
        cells = all_cells()
        if peer == "grid":
            graphs = [grid_prompt(tag, self.steps, self.size)]
        elif peer == "native-separate":
            graphs = [native_graph([cell], tag, self.steps, self.size) for cell in cells]
        else:
            graphs = [native_graph(cells, tag, self.steps, self.size)]
        assert self.server.proc is not None
        pid = self.server.proc.pid
        meter, cpu0 = LoadMeter(), cpu_of(pid)
        wall, cached, phases = run_prompts(self.server, graphs)
        load = meter.others(cpu_of(pid) - cpu0, wall)
        recomputed = sorted(set(cached) - MAY_BE_CACHED)
        # Warm-up runs share one tag, so the one-graph run finds the separate run's last cell cached.
        if recomputed and repeat >= 0:
            raise RuntimeError(f"{peer} run {tag!r}: ComfyUI served {recomputed} from its cache; the run did "
                               "less work than the others")
        return Run(peer, repeat, tag, len(cells), len(graphs), wall, load, cached, phases)

    def cell_pixels(self, run: Run) -> list[np.ndarray]:
        """The run's cell images, row-major, as the peer saved them."""
        out = self.base / "output"
        if run.peer == "grid":
            (folder,) = (out / "dreambooth_grids").glob(f"bench_grid_{run.tag}_*_cells")
            files = [folder / f"r{r:03}_c{c:03}.png" for r, c in all_cells()]
        else:
            files = [next((out / "bench_native" / run.tag).glob(f"r{r}_c{c}_*.png")) for r, c in all_cells()]
        arrays = []
        for path in files:
            with Image.open(path) as img:
                arrays.append(np.asarray(img.convert("RGB")).astype(np.int16))
        return arrays


# --------------------------------------------------------------------------- report


def summarize(runs: list[Run]) -> dict[str, Any]:
    measured = [r for r in runs if r.repeat >= 0]
    out: dict[str, Any] = {}
    for peer in PEERS:
        mine = sorted((r for r in measured if r.peer == peer), key=lambda r: r.repeat)
        if mine:
            loads = [r.other_load for r in mine if r.other_load is not None]
            names = dict.fromkeys(k for r in mine for k in r.phases)
            out[peer] = {"phases": {k: statistics.median(r.phases.get(k, 0.0) for r in mine) for k in names},
                         "ms_per_cell": statistics.median(r.ms_per_cell for r in mine),
                         "each": [round(r.ms_per_cell) for r in mine],
                         "load_median": round(statistics.median(loads), 2) if loads else None,
                         "load_max": max(loads) if loads else None}
    for peer in ("native-separate", "native-one-graph"):
        if "grid" in out and peer in out:
            pairs = [(g.ms_per_cell, n.ms_per_cell) for g in measured if g.peer == "grid"
                     for n in measured if n.peer == peer and n.repeat == g.repeat]
            out[f"ratio_vs_{peer}"] = {"median": statistics.median(a / b for a, b in pairs),
                                      "each": [round(a / b, 3) for a, b in pairs]}
    return out


def render(summary: dict[str, Any], repeats: int, steps: int, size: int, identity: dict[str, int] | None) -> str:
    lines = [
        f"Cells: {len(ROWS)} rows (base, {len(LORAS)} LoRAs x UNet strength "
        f"{', '.join(f'{u:g}' for u in UNET_STRENGTHS)}; text-encoder strength {TE_STRENGTH:g}) x {len(PROMPTS)} "
        f"prompts = {len(all_cells())} cells, {size}x{size} px, {steps} steps, {SAMPLER} / {SCHEDULER}, CFG {CFG:g}, "
        f"seed {SEED}. Median of {repeats} interleaved repeat(s), each repeat in brackets; **other load**: cores "
        "kept busy by processes outside the benchmark (median / max).",
        "",
        "| peer | ms per cell | vs grid | other load |",
        "|---|---|---|---|",
    ]
    grid = summary.get("grid", {}).get("ms_per_cell")
    for peer, label in PEERS.items():
        s = summary.get(peer)
        if not s:
            continue
        rel = f"{s['ms_per_cell'] / grid:.2f}x" if grid else "n/a"
        load = f"{s['load_median']} / {s['load_max']}" if s["load_median"] is not None else "n/a"
        lines.append(f"| {label} | {s['ms_per_cell']:.0f} ms ({', '.join(map(str, s['each']))}) | {rel} | {load} |")
    lines += ["", "| target | measured | goal | result |", "|---|---|---|---|"]
    for peer in ("native-separate", "native-one-graph"):
        ratio = summary.get(f"ratio_vs_{peer}")
        if ratio is None:
            continue
        ok = ratio["median"] <= 1.0
        lines.append(f"| grid vs {PEERS[peer]}, time per cell | {ratio['median']:.2f}x "
                     f"(paired per repeat: {', '.join(f'{x:.2f}' for x in ratio['each'])}) | <= 1.00x (not slower) | "
                     f"{report.verdict(ok)} |")
    lines += ["", "Where the time goes (median seconds per run of all cells, from the websocket's `executing` "
              "events; the grid's node split by its per-cell progress ticks):", ""]
    for peer, label in PEERS.items():
        s = summary.get(peer)
        if s:
            parts = sorted(s["phases"].items(), key=lambda kv: -kv[1])
            lines.append(f"- {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts))
    if identity is not None:
        lines += ["", "Same work check (untimed warm-up, one tag for all peers): largest per-pixel difference "
                  f"between the grid's cells and the native cells: {identity['separate']} (one prompt per cell), "
                  f"{identity['one-graph']} (one graph), on 0-255."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per cell (default 10)")
    parser.add_argument("--size", type=int, default=64, help="cell width and height in px (default 64)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 repeat")
    parser.add_argument("--record", action="store_true", help=f"update the bench_grid section of {RESULTS_MD.name}")
    parser.add_argument("--work-dir", type=Path, default=BENCH_DIR / "out" / "grid",
                        help="scratch folder (git-ignored)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    steps, repeats = (2, 1) if args.quick else (args.steps, args.repeats)
    if repeats < 1 or steps < 1 or args.size < 64 or args.size % 8:
        parser.error("need --repeats >= 1, --steps >= 1 and --size >= 64, a multiple of 8")
    os.environ["OMP_NUM_THREADS"] = "1"  # the server inherits it (child_env sets it too)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    info = report.machine_info()
    info["comfyui"] = "0.3.75, one server for all peers (started once, not counted)"
    info["code"] = code_before = report.code_version(MEASURED_CODE)
    bench = Bench(work, steps, args.size)
    bench.start()
    runs: list[Run] = []
    try:
        # Warm-up: loads the checkpoint, the LoRA files and every code path once; one tag for all peers
        # so their cells can be compared (the grid runs first: it cannot reuse a native node's output).
        warm = [bench.run(peer, -1, tag="warm up") for peer in PEERS]
        runs += warm
        base = bench.cell_pixels(warm[0])
        identity = {peer.removeprefix("native-"): int(max(np.abs(a - b).max() for a, b in
                                                         zip(base, bench.cell_pixels(run), strict=True)))
                    for peer, run in zip(PEERS, warm, strict=True) if peer != "grid"}
        log.info("warm-up done; largest pixel difference grid vs native: %s", identity)
        order = list(PEERS)
        for r in range(repeats):
            for peer in order[r % len(order):] + order[: r % len(order)]:  # rotated: drift hits every peer
                run = bench.run(peer, r)
                runs.append(run)
                log.info("repeat %d %-17s %5.2f s, %4.0f ms/cell, cached %s, other load %s", r + 1, peer,
                         run.wall_s, run.ms_per_cell, run.cached, run.other_load)
    finally:
        bench.server.stop()
    total = time.perf_counter() - started
    now = report.code_version(MEASURED_CODE)
    if report.code_changed(code_before, now):
        info["code"] += f"; WARNING: the grid node changed during the run (now {now})"

    summary = summarize(runs)
    body = render(summary, repeats, steps, args.size, identity)
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()), *sys.argv[1:]])
    raw = BENCH_DIR / "out" / f"grid-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    raw.write_text(json.dumps({"machine": info, "command": command, "steps": steps, "size": args.size,
                               "summary": summary, "identity": identity,
                               "runs": [{**asdict(r), "ms_per_cell": r.ms_per_cell} for r in runs]}, indent=1),
                   encoding="utf-8")
    print(body)
    if args.record:
        info["comfyui"] = info.pop("comfyui")  # listed last, after the code it ran
        report.write_results(RESULTS_MD, body, info, command, total, markers=(BEGIN, END),
                             heading="Comparison grid vs native prompts")
    print(f"\nwrote {raw}{' and ' + str(RESULTS_MD) if args.record else ''} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
