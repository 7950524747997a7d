"""Generation at SD1.5's real size on the CPU: the pack's LoRA loader, ControlNet node and class images
against the same work done by ComfyUI's native nodes.

One real ComfyUI server (this pack installed, started once, not counted) with the SD1.5-shaped random
checkpoint and ControlNet of ``tests/support/tiny_models`` (``sd15_full_checkpoint``,
``sd15_full_controlnet``) and a full-size LoRA in the layout the pack's trainer writes (kohya keys on
the UNet attention q/k/v/out and the CLIP-L attention q/k/v/out_proj, rank 16, random up weights,
built here with the trainer's own ``kohya_state_dict``).

Peers, in rotated order per repeat (groups rotated, and the peers within each group):
- ``lora-pack`` / ``lora-native``: CheckpointLoaderSimple -> DreamBoothLoraLoader / LoraLoader (the
  same UNet and text-encoder strengths) -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler ->
  VAEDecode -> SaveImage; ``lora-none`` is the same prompt without a LoRA, the reference that shows
  what applying the LoRA costs. Every repeat reads a fresh copy of the LoRA file, so both loaders
  read and convert it (neither loader's file cache can serve it).
- ``cn-pack`` / ``cn-native``: DreamBoothControlNetGenerate (the photo given as the hint) vs
  ControlNetLoader -> CLIPTextEncode x2 -> ControlNetApplyAdvanced (with the VAE, as the pack's node
  passes it) -> EmptyLatentImage -> KSampler -> VAEDecode, the same sampler, scheduler, steps, CFG,
  seed, strength and start/end.
- ``class-trainer``: ``python -m trainer --config run.json`` with prior preservation (no class folder,
  so it generates ``num_class_images`` into its cache), 1 training step; the class-image phase is
  timed from its own JSON-line events; then the same run again (``class-trainer-hit``): the cache hit.
  ``class-native``: CLIPTextEncode x2 -> EmptyLatentImage(batch) -> KSampler -> VAEDecode -> SaveImage
  at the same resolution, steps and CFG.

ComfyUI's output cache must not do any peer's work: every repeat tags its prompts (the pack's and
native peer of a pair share a tag, so their images must be pixel-identical; that is checked on every
repeat), and only loaders of shared files may come from the cache (the ``execution_cached`` events).

    python benchmarks/bench_generate.py [--repeats N] [--steps S] [--class-images N] [--quick] [--record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_loader import load_by_path
from PIL import Image, ImageOps

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SUPPORT_PACKAGE = "dreambooth_test_support"

bench_grid = load_by_path("dreambooth_bench_grid", BENCH_DIR / "bench_grid.py")
bench_train = bench_grid.bench_train
report = bench_train.report

MEASURED_CODE = ("nodes/lora_loader.py", "nodes/controlnet.py", "trainer")  # the two nodes and the whole trainer: hashed before and after a run
log = logging.getLogger("bench_generate")

RESULTS_MD = BENCH_DIR / "RESULTS.md"
BEGIN, END = "<!-- bench_generate:begin -->", "<!-- bench_generate:end -->"
CKPT, CONTROLNET, HINT = "sd15-full.safetensors", "controlnet-full.safetensors", "bench_generate_dog.png"
PHOTOS = REPO / "tests" / "assets" / "dreambench" / "dog"
LORA_RANK, LORA_ALPHA = 16, 16.0
PROMPT, NEGATIVE = "a photo of sks dog on the beach", "blurry, low quality"
CLASS_PROMPT = "a photo of dog"
UNET_STRENGTH, TE_STRENGTH = 0.8, 0.6  # different on purpose: the pack's node has separate strengths
CFG, SEED, SAMPLER, SCHEDULER = 7.5, 7, "euler", "normal"
CN_STRENGTH, CN_START, CN_END = 0.9, 0.0, 0.8
# The trainer samples class images with diffusers' DPM-Solver++ (2nd order, multistep); dpmpp_2m is
# ComfyUI's equivalent. The noise schedules differ in detail, the cost per step (one UNet call on
# the prompt and the negative) does not.
CLASS_SAMPLER, CLASS_SCHEDULER, CLASS_CFG = "dpmpp_2m", "normal", 7.5
GROUPS = (("lora-pack", "lora-native", "lora-none"), ("cn-pack", "cn-native"), ("class-trainer", "class-native"))
PEERS = {
    "lora-pack": "DreamBoothLoraLoader -> first image",
    "lora-native": "native LoraLoader -> first image",
    "lora-none": "no LoRA (reference) -> first image",
    "cn-pack": "DreamBoothControlNetGenerate, per image",
    "cn-native": "native ControlNet chain, per image",
    "class-trainer": "trainer: class images (generated)",
    "class-trainer-hit": "trainer: class images (cache hit, same cache)",
    "class-native": "native batch of the same number of images",
}
# Loaders of files every peer shares, and the empty latent (zeros, no work): their output may come from
# ComfyUI's cache.
MAY_BE_CACHED = {"CheckpointLoaderSimple", "ControlNetLoader", "LoadImage", "EmptyLatentImage"}
LOADER_CLASS = {"lora-pack": "DreamBoothLoraLoader", "lora-native": "LoraLoader"}
PAIRS = (("lora-pack", "lora-native"), ("cn-pack", "cn-native"))


@dataclass
class Run:
    peer: str
    repeat: int  # -1: warm-up
    tag: str
    images: int
    wall_s: float  # the prompt (POST -> execution_success) or, for the trainer, its class-image phase
    other_load: float | None
    cached: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds by node class or trainer phase
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shared_load_s(self) -> float:
        """Time in the loaders of shared files. ComfyUI drops a cached output when a prompt without
        that node runs, so whichever peer of a pair comes first after another group reloads the
        ControlNet (~1 s): set-up both would share, not per-image work."""
        return sum(v for k, v in self.phases.items() if k in MAY_BE_CACHED)

    @property
    def work_s(self) -> float:
        return self.wall_s - self.shared_load_s

    @property
    def per_image_s(self) -> float:
        return self.work_s / self.images


# --------------------------------------------------------------------------- files


def build_lora(dest: Path, full_unet_config: dict[str, Any], clip_config: dict[str, Any]) -> Path:
    """A full-size LoRA exactly as the trainer lays it out (UNet + text encoder attention), random up
    weights; built once (a random 860M-parameter UNet takes a while) and kept in ``dest``."""
    key = hashlib.sha256(json.dumps([full_unet_config, LORA_RANK, LORA_ALPHA], sort_keys=True).encode()).hexdigest()
    path = dest / f"sd15-full-lora-r{LORA_RANK}-{key[:10]}.safetensors"
    if path.is_file():
        return path
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    load_by_path("dreambooth_bench_engine", REPO / "trainer" / "__init__.py", package=True)
    lora = importlib.import_module("dreambooth_bench_engine.lora")
    SD1 = importlib.import_module("dreambooth_bench_engine.families").SD1
    t0 = time.perf_counter()
    torch.manual_seed(200)
    unet = UNet2DConditionModel(**full_unet_config)
    # Only the attention projections get LoRA layers: a CLIP-L with a small MLP gives the same keys and shapes.
    text = CLIPTextModel(CLIPTextConfig(**{**clip_config, "intermediate_size": 64}))
    lora.add_lora(unet, rank=LORA_RANK, alpha=LORA_ALPHA, targets=lora.UNET_TARGETS["attn"], dropout=0.0)
    lora.add_lora(text, rank=LORA_RANK, alpha=LORA_ALPHA, targets=lora.TEXT_ENCODER_TARGETS["attn"], dropout=0.0)
    with torch.no_grad():  # trained LoRAs have non-zero up weights; a fresh one is a no-op
        for model in (unet, text):
            for _, layer in lora.lora_layers(model):
                layer.lora_B[lora.ADAPTER].weight.normal_(0.0, 0.02)
    tensors = lora.kohya_state_dict(unet, [text], SD1, torch.float16)
    del unet, text
    dest.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    log.info("built %s (%d tensors) in %.0f s", path.name, len(tensors), time.perf_counter() - t0)
    return path


def lora_name(repeat: int) -> str:
    return f"bench generate lora {'warm' if repeat < 0 else repeat + 1}.safetensors"


def tagged(text: str, tag: str) -> str:
    return f"{text}, {tag}" if text else tag


# --------------------------------------------------------------------------- prompts


def lora_graph(peer: str, tag: str, repeat: int, steps: int, size: int) -> dict[str, Any]:
    graph: dict[str, Any] = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}
    model, clip = ["1", 0], ["1", 1]
    if peer != "lora-none":
        graph["2"] = {"class_type": LOADER_CLASS[peer], "inputs": {
            "model": model, "clip": clip, "lora_name": lora_name(repeat), "strength_model": UNET_STRENGTH,
            "strength_clip": TE_STRENGTH}}
        model, clip = ["2", 0], ["2", 1]
    graph.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": tagged(PROMPT, tag), "clip": clip}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": tagged(NEGATIVE, tag), "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": steps, "cfg": CFG, "sampler_name": SAMPLER, "scheduler": SCHEDULER,
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"bench_generate/{tag}/{peer}"}},
    })
    return graph


def cn_graph(peer: str, tag: str, steps: int, size: int) -> dict[str, Any]:
    graph: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}},
        "3": {"class_type": "LoadImage", "inputs": {"image": HINT}},
    }
    save = {"class_type": "SaveImage", "inputs": {"filename_prefix": f"bench_generate/{tag}/{peer}"}}
    if peer == "cn-pack":
        # width/height 0: the output size follows the hint (size x size), as the native latent does.
        graph["4"] = {"class_type": "DreamBoothControlNetGenerate", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "control_net": ["2", 0], "image": ["3", 0],
            "preprocessor": "none (image is a hint)", "detect_resolution": 512, "positive": tagged(PROMPT, tag),
            "negative": tagged(NEGATIVE, tag), "seed": SEED, "steps": steps, "cfg": CFG, "sampler_name": SAMPLER,
            "scheduler": SCHEDULER, "strength": CN_STRENGTH, "start_percent": CN_START, "end_percent": CN_END,
            "width": 0, "height": 0, "batch_size": 1}}
        graph["5"] = {**save, "inputs": {**save["inputs"], "images": ["4", 0]}}
        return graph
    graph.update({
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": tagged(PROMPT, tag), "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": tagged(NEGATIVE, tag), "clip": ["1", 1]}},
        "6": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["4", 0], "negative": ["5", 0], "control_net": ["2", 0], "image": ["3", 0],
            "strength": CN_STRENGTH, "start_percent": CN_START, "end_percent": CN_END, "vae": ["1", 2]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": SEED, "steps": steps, "cfg": CFG, "sampler_name": SAMPLER, "scheduler": SCHEDULER,
            "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {**save, "inputs": {**save["inputs"], "images": ["9", 0]}},
    })
    return graph


def class_graph(tag: str, count: int, steps: int, size: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": tagged(CLASS_PROMPT, tag), "clip": ["1", 1]}},
        # The trainer's class negative prompt is empty; the tag alone keeps this encode out of the cache.
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": tag, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": count}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": SEED, "steps": steps, "cfg": CLASS_CFG, "sampler_name": CLASS_SAMPLER,
            "scheduler": CLASS_SCHEDULER, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"bench_generate/{tag}/class"}},
    }


# --------------------------------------------------------------------------- running


def trainer_phases(events: list[tuple[float, dict[str, Any]]]) -> dict[str, float]:
    """Marks of one trainer run, seconds since launch, from its own events (arrival times)."""
    marks: dict[str, float] = {}
    for t, e in events:
        kind, msg = e.get("type"), str(e.get("message", ""))
        if kind == "status" and msg.startswith("loading "):
            marks.setdefault("loading", t)
        elif kind == "status" and msg.startswith("preparing ") and "class images" in msg:
            marks.setdefault("class_start", t)
        elif kind == "progress" and e.get("phase") == "class_images":
            marks.setdefault("first_class_image", t)
            marks["last_class_image"] = t
        elif kind == "status" and msg.startswith("caching latents"):
            marks.setdefault("class_end", t)
        elif kind == "progress" and e.get("phase") == "train" and e.get("step", 0) >= 1:
            marks.setdefault("first_step", t)
    missing = {"loading", "class_start", "class_end"} - set(marks)
    if missing:
        raise RuntimeError(f"trainer events lack {sorted(missing)}: {[e for _, e in events][:40]}")
    return marks


class Bench:
    def __init__(self, work: Path, steps: int, size: int, class_images: int, repeats: int) -> None:
        support = REPO / "tests" / "support"
        load_by_path(SUPPORT_PACKAGE, support / "__init__.py", package=True)
        paths = importlib.import_module(f"{SUPPORT_PACKAGE}.paths")
        comfyui = importlib.import_module(f"{SUPPORT_PACKAGE}.comfyui")
        tiny = importlib.import_module(f"{SUPPORT_PACKAGE}.tiny_models")
        load_by_path("dreambooth_bench_engine", REPO / "trainer" / "__init__.py", package=True)
        self.launcher = importlib.import_module("dreambooth_bench_engine.launcher")
        self.steps, self.size, self.class_images, self.work = steps, size, class_images, work
        root = comfyui.provision_comfyui()
        self.ckpt = tiny.sd15_full_checkpoint(root)
        controlnet = tiny.sd15_full_controlnet(root)
        self.env = paths.child_env({"MKL_NUM_THREADS": "1"})
        self.base = work / "comfy-base"
        # Outputs of an earlier invocation carry the same tags; the pixel check must find only this one's.
        shutil.rmtree(self.base / "output", ignore_errors=True)
        self.server = comfyui.ComfyServer(root, self.base, env={"MKL_NUM_THREADS": "1"})
        self.server.install_pack(REPO, paths.PACK_NAME)
        self.server.add_model("checkpoints", self.ckpt, CKPT)
        self.server.add_model("controlnet", controlnet, CONTROLNET)
        lora = build_lora(work / "lora-build", tiny.SD15_UNET_CONFIG, tiny.CLIP_L_TEXT_CONFIG)
        loras = self.server.models_dir / "loras"
        for stale in loras.glob("bench generate lora *.safetensors"):
            stale.unlink()
        for r in range(-1, repeats):
            # Real copies, not links: both loaders key their file caches by the resolved path.
            shutil.copyfile(lora, loras / lora_name(r))
        with Image.open(sorted(PHOTOS.glob("*.jpg"))[0]) as im:
            hint = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (size, size), Image.Resampling.BICUBIC)
        hint.save(self.server.input_dir / HINT)
        self.trainer_cache = work / "trainer-cache"

    def start(self) -> None:
        self.server.start()
        log.info("ComfyUI up in %.1f s", self.server.startup_seconds or 0.0)

    def prompt(self, peer: str, repeat: int, tag: str, graph: dict[str, Any], images: int) -> Run:
        assert self.server.proc is not None
        pid = self.server.proc.pid
        meter, cpu0 = bench_train.LoadMeter(), bench_train.cpu_of(pid)
        wall, cached, phases = bench_grid.run_prompts(self.server, [graph], timeout=1800.0)
        load = meter.others(bench_train.cpu_of(pid) - cpu0, wall)
        recomputed = sorted(set(cached) - MAY_BE_CACHED)
        if recomputed:
            raise RuntimeError(f"{peer} run {tag!r}: ComfyUI served {recomputed} from its cache; the run did "
                               "less work than its peer")
        return Run(peer, repeat, tag, images, wall, load, cached, phases)

    def trainer(self, repeat: int, tag: str, hit: bool) -> Run:
        peer = "class-trainer-hit" if hit else "class-trainer"
        run = self.work / "runs" / f"{tag.replace(' ', '-')}-{peer}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        if not hit:
            # Keep the shared cache (the model's SHA-256 memo) but not the images: this run must make them.
            shutil.rmtree(self.trainer_cache / "class_images", ignore_errors=True)
        config = {
            "pretrained_model": str(self.ckpt), "instance_data_dir": str(PHOTOS), "instance_prompt": "a photo of sks dog",
            "output_dir": str(run / "out"), "resolution": self.size, "train_batch_size": 1, "max_train_steps": 1,
            "rank": 4, "alpha": 4.0, "train_text_encoder": False, "learning_rate": 1e-4, "mixed_precision": "no",
            "device": "cpu", "seed": SEED, "resume": "none", "cache_dir": str(self.trainer_cache),
            "with_prior_preservation": True, "class_prompt": CLASS_PROMPT, "num_class_images": self.class_images,
            "class_generation_steps": self.steps, "class_generation_guidance": CLASS_CFG, "class_negative_prompt": "",
        }
        cfg_path = run / "run.json"
        cfg_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
        cmd = self.launcher.trainer_command(str(cfg_path), pack_root=REPO)
        res = bench_train.run_child(cmd, self.env, run / "trainer.log")
        m = trainer_phases(res.events)
        made = [e for _, e in res.events if e.get("type") == "progress" and e.get("phase") == "class_images"]
        if hit == bool(made):
            raise RuntimeError(f"{peer}: expected {'no' if hit else 'some'} generated class images, got {len(made)}")
        phases = {"launch + imports + model check + photos": m["loading"],
                  "model load (+ waiting for the model's SHA-256)": m["class_start"] - m["loading"]}
        if made:
            phases["class images: set-up + first image"] = m["first_class_image"] - m["class_start"]
            phases["class images: the other images"] = m["last_class_image"] - m["first_class_image"]
            phases["class images: read back + free the VAE decoder"] = m["class_end"] - m["last_class_image"]
        else:
            phases["class images: cache check + read back + free the VAE decoder"] = m["class_end"] - m["class_start"]
        phases["training set-up, 1 step, save, exit"] = res.wall_s - m["class_end"]
        return Run(peer, repeat, tag, self.class_images, m["class_end"] - m["class_start"], res.other_load,
                   phases={k: round(v, 3) for k, v in phases.items()},
                   extra={"process_wall_s": round(res.wall_s, 2), "peak_rss": res.peak_rss,
                          "image_times": [round(t, 2) for t, e in res.events
                                          if e.get("type") == "progress" and e.get("phase") == "class_images"]})

    def run(self, peer: str, repeat: int, tag: str) -> list[Run]:
        if peer.startswith("lora-"):
            return [self.prompt(peer, repeat, tag, lora_graph(peer, tag, repeat, self.steps, self.size), 1)]
        if peer.startswith("cn-"):
            return [self.prompt(peer, repeat, tag, cn_graph(peer, tag, self.steps, self.size), 1)]
        if peer == "class-native":
            graph = class_graph(tag, self.class_images, self.steps, self.size)
            return [self.prompt(peer, repeat, tag, graph, self.class_images)]
        return [self.trainer(repeat, tag, hit=False), self.trainer(repeat, tag, hit=True)]

    def pixels(self, tag: str, peer: str) -> np.ndarray:
        (path,) = (self.base / "output" / "bench_generate" / tag).glob(f"{peer}_*.png")
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")).astype(np.int16)

    def pixel_difference(self, tag: str, pair: tuple[str, str]) -> int:
        a, b = (self.pixels(tag, p) for p in pair)
        return int(np.abs(a - b).max())


# --------------------------------------------------------------------------- report


def summarize(runs: list[Run], diffs: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [r for r in runs if r.repeat >= 0]
    out: dict[str, Any] = {"peers": {}, "ratios": {}}
    for peer in PEERS:
        mine = sorted((r for r in measured if r.peer == peer), key=lambda r: r.repeat)
        if not mine:
            continue
        loads = [r.other_load for r in mine if r.other_load is not None]
        names = dict.fromkeys(k for r in mine for k in r.phases)
        entry = {"work_s": statistics.median(r.work_s for r in mine), "each": [round(r.work_s, 2) for r in mine],
                 "shared_load_each": [round(r.shared_load_s, 2) for r in mine],
                 "per_image_s": statistics.median(r.per_image_s for r in mine), "images": mine[0].images,
                 "phases": {k: statistics.median(r.phases.get(k, 0.0) for r in mine) for k in names},
                 "load_median": round(statistics.median(loads), 2) if loads else None,
                 "load_max": max(loads) if loads else None}
        if peer.startswith("class-trainer"):
            entry["process_wall_s"] = statistics.median(r.extra["process_wall_s"] for r in mine)
            entry["peak_rss"] = statistics.median(r.extra["peak_rss"] for r in mine)
        out["peers"][peer] = entry

    def paired(a: str, b: str, value: Any) -> dict[str, Any] | None:
        pairs = [(value(x), value(y)) for x in measured if x.peer == a for y in measured
                 if y.peer == b and y.repeat == x.repeat]
        pairs = [(x, y) for x, y in pairs if y > 0]
        if not pairs:
            return None
        return {"median": statistics.median(x / y for x, y in pairs), "each": [round(x / y, 3) for x, y in pairs]}

    for a, b in PAIRS:
        out["ratios"][f"{a}/{b}"] = paired(a, b, lambda r: r.work_s)
    for a, b in (("lora-pack", "lora-native"),):
        out["ratios"][f"{a}/{b} loader node"] = paired(a, b, lambda r: r.phases.get(LOADER_CLASS[r.peer], 0.0))
    out["ratios"]["class-trainer/class-native"] = paired("class-trainer", "class-native", lambda r: r.per_image_s)
    # What applying the LoRA costs on top of the same prompt without it, paired per repeat.
    for peer in ("lora-pack", "lora-native"):
        extra = [x.work_s - y.work_s for x in measured if x.peer == peer for y in measured
                 if y.peer == "lora-none" and y.repeat == x.repeat]
        if extra:
            out["peers"][peer]["over_no_lora_s"] = statistics.median(extra)
            out["peers"][peer]["over_no_lora_each"] = [round(x, 2) for x in extra]
    out["pixel_difference"] = {f"{a} vs {b}": max((d[f"{a} vs {b}"] for d in diffs if f"{a} vs {b}" in d),
                                                  default=None) for a, b in PAIRS}
    return out


def _each(values: list[float], fmt: str = "{:.2f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def render(s: dict[str, Any], repeats: int, steps: int, size: int, class_images: int) -> str:
    peers, ratios = s["peers"], s["ratios"]
    lines = [
        f"Full-size SD1.5-shaped random models (UNet 860M parameters, CLIP-L, SD VAE; ControlNet 361M), fp32 on "
        f"the CPU, one thread per process; {size}x{size} px, {steps} steps. LoRA: rank {LORA_RANK}, UNet + "
        f"text-encoder attention, strengths {UNET_STRENGTH:g} / {TE_STRENGTH:g}; generation: {SAMPLER} / "
        f"{SCHEDULER}, CFG {CFG:g}, seed {SEED}; ControlNet strength {CN_STRENGTH:g}, {CN_START:g}-{CN_END:g}. "
        f"Class images: {class_images}, CFG {CLASS_CFG:g} ({CLASS_SAMPLER} / {CLASS_SCHEDULER} natively). "
        f"Median of {repeats} interleaved repeat(s), each repeat in brackets. Prompts count POST -> "
        "execution_success less the time in loaders of shared files (checkpoint, ControlNet, hint image), "
        "listed apart: ComfyUI drops a cached loader output when a prompt without that loader runs, so the "
        "peer that comes first after another group reloads the ControlNet. **other load**: cores kept busy by "
        "processes outside the benchmark (median / max).",
        "",
        "| peer | measured | seconds (each repeat) | per image | shared file loads, not counted | other load |",
        "|---|---|---|---|---|---|",
    ]
    what = {"lora": "POST -> image saved", "cn-": "POST -> image saved", "class-native": "POST -> images saved",
            "class-trainer": "class-image phase (from its events)"}
    for peer, label in PEERS.items():
        e = peers.get(peer)
        if not e:
            continue
        measured = next(v for k, v in what.items() if peer.startswith(k))
        load = f"{e['load_median']} / {e['load_max']}" if e["load_median"] is not None else "n/a"
        shared = _each(e["shared_load_each"]) if any(e["shared_load_each"]) else "-"
        lines.append(f"| {label} | {measured} | {e['work_s']:.2f} ({_each(e['each'])}) | {e['per_image_s']:.2f} s "
                     f"| {shared} | {load} |")
    lines += ["", "| target | measured | goal | result |", "|---|---|---|---|"]

    def ratio_row(key: str, label: str, detail: str = "") -> None:
        r = ratios.get(key)
        if r is None:
            return
        lines.append(f"| {label} | {r['median']:.3f}x (paired per repeat: {_each(r['each'], '{:.3f}')}){detail} "
                     f"| <= 1.05x | {report.verdict(r['median'] <= 1.05)} |")

    def node_s(peer: str, node: str) -> str:
        return f"{peers[peer]['phases'].get(node, 0.0):.3f} s" if peer in peers else "n/a"

    ratio_row("lora-pack/lora-native", "LoRA loader: first image with the LoRA, pack vs native")
    ratio_row("lora-pack/lora-native loader node", "LoRA loader: patch time (the loader node), pack vs native",
              f"; {node_s('lora-pack', 'DreamBoothLoraLoader')} vs {node_s('lora-native', 'LoraLoader')}")
    ratio_row("cn-pack/cn-native", "ControlNet generate: per image, pack vs native")
    ratio_row("class-trainer/class-native", "class images: per image, trainer vs native batch")
    hit = peers.get("class-trainer-hit")
    if hit:
        lines.append(f"| class images: cache hit (second run, same cache) | {hit['work_s']:.2f} s "
                     f"({_each(hit['each'])}) for {hit['images']} images | ~0 (<= 1 s) "
                     f"| {report.verdict(hit['work_s'] <= 1.0)} |")
    for pair, diff in s["pixel_difference"].items():
        if diff is not None:
            lines.append(f"| same work: largest per-pixel difference, {pair} (every repeat, warm-up included) "
                         f"| {diff} | 0 | {report.verdict(diff == 0)} |")
    lines += ["", "What applying the LoRA costs (first image minus the same prompt without a LoRA, paired per "
              "repeat; ComfyUI patches the weights when the sampler and the text encoder load the model, so "
              "this includes the patching that the loader node only schedules):", ""]
    for peer in ("lora-pack", "lora-native"):
        e = peers.get(peer)
        if e and "over_no_lora_s" in e:
            lines.append(f"- {PEERS[peer]}: +{e['over_no_lora_s']:.2f} s ({_each(e['over_no_lora_each'])})")
    lines += ["", "Where the time goes (median seconds per run; prompts: by node class from the websocket's "
              "`executing` events; the trainer: from its own events, launch to exit):", ""]
    for peer, label in PEERS.items():
        e = peers.get(peer)
        if e:
            parts = sorted(e["phases"].items(), key=lambda kv: -kv[1])
            extra = ""
            if "process_wall_s" in e:
                extra = f" (whole trainer process {e['process_wall_s']:.1f} s, peak RSS {report.gb(e['peak_rss'])})"
            lines.append(f"- {label}{extra}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per image (default 4)")
    parser.add_argument("--size", type=int, default=256, help="image width and height in px (default 256)")
    parser.add_argument("--class-images", type=int, default=2, help="class images per run (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 2 class images, 1 repeat")
    parser.add_argument("--only", choices=["lora", "cn", "class"], action="append",
                        help="run only this group (repeatable)")
    parser.add_argument("--record", action="store_true", help=f"update the bench_generate section of {RESULTS_MD.name}")
    parser.add_argument("--work-dir", type=Path, default=BENCH_DIR / "out" / "generate",
                        help="scratch folder (git-ignored)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    steps, repeats, class_images = (2, 1, 2) if args.quick else (args.steps, args.repeats, args.class_images)
    if repeats < 1 or steps < 2 or class_images < 1 or args.size < 64 or args.size % 8:
        parser.error("need --repeats >= 1, --steps >= 2 (dpmpp_2m), --class-images >= 1 and --size >= 64, a multiple of 8")
    if args.record and (args.quick or args.only):
        parser.error("--record needs a full run (no --quick, no --only)")
    groups = [g for g in GROUPS if not args.only or g[0].split("-")[0] in args.only]
    os.environ["OMP_NUM_THREADS"] = "1"  # the server and the trainer inherit it (child_env sets it too)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    info = report.machine_info()
    info["comfyui"] = "0.3.75, one server for all peers (started once, not counted)"
    info["code"] = code_before = report.code_version(MEASURED_CODE)
    bench = Bench(work, steps, args.size, class_images, repeats)
    bench.start()
    runs: list[Run] = []
    diffs: list[dict[str, Any]] = []
    try:
        # Warm-up (not counted): the server loads the checkpoint, the ControlNet and runs every node
        # class once. The trainer needs none: the server's load leaves the checkpoint in the page cache, and
        # the SHA-256 its first run computes is waited for before the class-image phase starts.
        for r in range(-1, repeats):
            tag = "warm up" if r < 0 else f"take {r + 1:03d}"
            if r < 0:
                # One pair per group: the no-LoRA and native class prompts run the same nodes again.
                peers = [p for group in groups for p in group if p not in ("lora-none", "class-trainer", "class-native")]
            else:  # rotated: drift and the cost of switching models hit every peer
                order = groups[r % len(groups):] + groups[: r % len(groups)]
                peers = [p for group in order for p in group[r % len(group):] + group[: r % len(group)]]
            for peer in peers:
                for run in bench.run(peer, r, tag):
                    runs.append(run)
                    log.info("%s %-18s %6.2f s (%5.2f s/image), cached %s, other load %s", tag, run.peer,
                             run.wall_s, run.per_image_s, run.cached, run.other_load)
            done = {run.peer for run in runs if run.tag == tag}
            diff = {f"{a} vs {b}": bench.pixel_difference(tag, (a, b)) for a, b in PAIRS if {a, b} <= done}
            diffs.append(diff)
            log.info("%s: largest pixel difference %s", tag, diff)
    finally:
        bench.server.stop()
    total = time.perf_counter() - started
    now = report.code_version(MEASURED_CODE)
    if report.code_changed(code_before, now):
        info["code"] += f"; WARNING: the measured code changed during the run (now {now})"

    summary = summarize(runs, diffs)
    body = render(summary, repeats, steps, args.size, class_images)
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()), *sys.argv[1:]])
    raw = BENCH_DIR / "out" / f"generate-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    raw.write_text(json.dumps({"machine": info, "command": command, "steps": steps, "size": args.size,
                               "class_images": class_images, "summary": summary, "pixel_differences": diffs,
                               "runs": [asdict(r) for r in runs]}, indent=1), encoding="utf-8")
    print(body)
    if args.record:
        info["comfyui"] = info.pop("comfyui")  # listed last, after the code it ran
        report.write_results(RESULTS_MD, body, info, command, total, markers=(BEGIN, END),
                             heading="Generation at full size: LoRA loader, ControlNet, class images")
    print(f"\nwrote {raw}{' and ' + str(RESULTS_MD) if args.record else ''} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
