"""Training speed and VRAM at full size on a GPU: SD1.5-shaped random weights at 512 px.

The shapes are SD1.5's (UNet 860M parameters, CLIP-L, the SD VAE), the weights random and built
here at run time (seeded, fp16, a diffusers folder: nothing is downloaded). The photos are the
embedded sample subject (``scripts/sample_subject.py``), so the script needs nothing beside the
repository. Each mode runs ``python -m trainer`` once; what is read from its events:

- **ms/step**: in-run, from the arrival of the step events after the first few (warm-up) steps;
- **launch -> first step**: process start to the first step event;
- **VRAM**: the trainer's own report of torch's allocator peak (``vram_peak_gb``, and reserved);
- **samples/s** and **achieved TFLOP/s**: batch x it/s, and that times the work of one sample: 1,714 GFLOP for
  LoRA forward + backward of the SD1.5 UNet at 512 px (forward 803 GFLOP, backward to the activations about
  as much again), scaled with the pixel count at other resolutions; the text encoder's share is left out.

    python benchmarks/bench_gpu.py                     # 4 modes x 30 steps at 512 px, batch 1, 4 and 8
    python benchmarks/bench_gpu.py --record            # ... and update the GPU section of RESULTS.md
    python benchmarks/bench_gpu.py --scale tiny --resolution 64 --steps 4 --device cpu   # self-check
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_loader import load_by_path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
BEGIN, END = "<!-- bench_gpu:begin -->", "<!-- bench_gpu:end -->"
WARMUP_STEPS = 5  # steps left out of ms/step: cudnn autotuning, allocator growth
log = logging.getLogger("bench_gpu")

GFLOP_PER_SAMPLE_512 = 1714.0  # SD1.5 UNet LoRA forward + backward at 512 px (see the module docstring)
MODES = {  # id: (what it trains, train_text_encoder, gradient_checkpointing)
    "unet": ("UNet LoRA", False, False),
    "unet-gc": ("UNet LoRA, gradient checkpointing", False, True),
    "te": ("UNet + text-encoder LoRA", True, False),
    "te-gc": ("UNet + text-encoder LoRA, gradient checkpointing", True, True),
}


def warmup_steps(steps: int) -> int:
    return min(WARMUP_STEPS, steps - 1)


def build_model(folder: Path, scale: str) -> Path:
    """A diffusers folder with SD1.5-shaped (or the tests' tiny) random weights, built once."""
    marker = folder / "built.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("scale") == scale:
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    load_by_path("dreambooth_test_support", REPO / "tests" / "support" / "__init__.py", package=True)
    tiny = importlib.import_module("dreambooth_test_support.tiny_models")
    started = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(tiny.SD15_UNET_CONFIG if scale == "full" else tiny.TINY_UNET_CONFIG))
    unet.to(torch.float16).save_pretrained(folder / "unet")
    del unet
    torch.manual_seed(1)
    AutoencoderKL(**tiny.SD_VAE_CONFIG).to(torch.float16).save_pretrained(folder / "vae")
    torch.manual_seed(2)
    CLIPTextModel(CLIPTextConfig(**tiny.CLIP_L_TEXT_CONFIG)).to(torch.float16).save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}), encoding="utf-8")
    marker.write_text(json.dumps({"scale": scale}), encoding="utf-8")
    log.info("built the %s random-weight model in %s in %.0f s", scale, folder, time.perf_counter() - started)
    return folder


def run_mode(name: str, batch: int, model: Path, photos: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    _, train_te, checkpointing = MODES[name]
    run = work / f"{name}-b{batch}"
    config = {
        "pretrained_model": str(model), "instance_data_dir": str(photos), "instance_prompt": "a photo of qzx toy",
        "output_dir": str(run / "out"), "resolution": args.resolution, "train_batch_size": batch,
        "max_train_steps": args.steps, "rank": 16, "alpha": 16, "train_text_encoder": train_te,
        "gradient_checkpointing": checkpointing, "mixed_precision": "auto", "device": args.device,
        "seed": 0, "resume": "none", "checkpointing_steps": 0, "cache_dir": str(work / "cache"),
        "overwrite": True,
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    load_by_path("dreambooth_bench_engine", REPO / "trainer" / "__init__.py", package=True)
    launcher = importlib.import_module("dreambooth_bench_engine.launcher")
    env = launcher.child_env()
    started = time.perf_counter()
    events: list[tuple[float, dict[str, Any]]] = []
    with open(run / "trainer.log", "wb") as err:
        proc = subprocess.Popen(launcher.trainer_command(str(run / "run.json"), pack_root=REPO), cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                events.append((time.perf_counter() - started, json.loads(raw)))
            except json.JSONDecodeError:
                continue
        code = proc.wait()
    if code != 0:
        tail = (run / "trainer.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"mode {name!r}: the trainer exited {code}:\n{tail}")
    steps = {e["step"]: t for t, e in events if e.get("type") == "progress" and e.get("phase") == "train"}
    metrics = [e for _, e in events if e.get("type") == "metrics"]
    first, last = warmup_steps(args.steps), args.steps
    ms = 1000 * (steps[last] - steps[first]) / (last - first)
    # The runtime's choice ("device cuda:0, mixed precision bf16, attention sdpa") is in the log.
    log_lines = (run / "trainer.log").read_text(encoding="utf-8", errors="replace").splitlines()
    chosen = next((line.split(": ", 1)[-1] for line in log_lines if "mixed precision" in line), None)
    samples_per_s = batch * 1000 / ms
    tflops = samples_per_s * GFLOP_PER_SAMPLE_512 * (args.resolution / 512) ** 2 / 1000
    return {"mode": name, "what": MODES[name][0], "batch": batch, "ms_per_step": round(ms, 1),
            "it_per_s": round(1000 / ms, 2), "samples_per_s": round(samples_per_s, 2), "tflops": round(tflops, 1),
            "launch_to_first_step_s": round(steps[1], 2), "vram_peak_gb": metrics[-1].get("vram_peak_gb"),
            "vram_reserved_peak_gb": metrics[-1].get("vram_reserved_peak_gb"),
            "precision": chosen}


def machine() -> dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "missing"
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def render(results: list[dict[str, Any]], info: dict[str, str], args: argparse.Namespace) -> str:
    gb = lambda x: "n/a" if x is None else f"{x:.2f} GB"  # noqa: E731
    lines = [
        f"Recorded {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {info['device']} "
        f"(commit {info['commit']}; torch {info['torch']}, diffusers {info['diffusers']}, "
        f"transformers {info['transformers']}, peft {info['peft']}).",
        "",
        f"SD1.5-shaped random weights ({args.scale}), {args.resolution} px, LoRA rank 16, "
        f"mixed precision auto, {args.steps} steps; ms/step over steps {warmup_steps(args.steps) + 1}-{args.steps}; "
        f"TFLOP/s counts {GFLOP_PER_SAMPLE_512:.0f} GFLOP per sample at 512 px (UNet LoRA forward + backward).",
        "",
        "| mode | batch | ms/step | it/s | samples/s | TFLOP/s | launch -> first step | VRAM peak (allocated / reserved) "
        "| precision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['what']} | {r['batch']} | {r['ms_per_step']:.0f} | {r['it_per_s']:.2f} | {r['samples_per_s']:.2f} "
                     f"| {r['tflops']:.1f} | {r['launch_to_first_step_s']:.1f} s "
                     f"| {gb(r['vram_peak_gb'])} / {gb(r['vram_reserved_peak_gb'])} | {r['precision'] or 'n/a'} |")
    te_b1 = [r for r in results if r["mode"] in ("te", "te-gc") and r["batch"] == 1 and r["vram_peak_gb"] is not None]
    if te_b1 and args.resolution == 512 and args.scale == "full":
        best = min(r["vram_peak_gb"] for r in te_b1)
        lines += ["", f"- Goal: peak VRAM <= 8 GB for LoRA + text encoder at 512 px, batch 1: {best:.2f} GB - "
                  f"{'pass' if best <= 8 else '**FAIL**'}."]
    if args.peak_tflops:
        top = max((r for r in results if r["batch"] == 8), key=lambda r: r["tflops"], default=None)
        if top is not None:
            share = top["tflops"] / args.peak_tflops
            lines.append(f"- Goal: >= 40% of the card's dense bf16 peak ({args.peak_tflops:.0f} TFLOP/s) at batch 8: "
                         f"{top['tflops']:.1f} TFLOP/s = {share:.0%} ({top['what']}) - "
                         f"{'pass' if share >= 0.4 else '**FAIL**'}.")
    return "\n".join(lines)


def record(body: str) -> None:
    text = RESULTS_MD.read_text(encoding="utf-8")
    section = f"{BEGIN}\n\n{body}\n\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + f"\n\n## GPU: full size\n\n{section}\n"
    RESULTS_MD.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["full", "tiny"], default="full", help="SD1.5 shapes, or the tests' tiny UNet")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a self-check")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ",".join(MODES))
    parser.add_argument("--batch-sizes", default="1,4,8", help="comma-separated train_batch_size values (default 1,4,8)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the card's dense bf16 peak in TFLOP/s (e.g. 989 for an H100 SXM) for the utilisation goal")
    parser.add_argument("--work-dir", type=Path, default=BENCH_DIR / "out" / "gpu", help="scratch folder (git-ignored)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--record", action="store_true", help=f"update the GPU section of {RESULTS_MD.name}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.steps < 2:
        parser.error(f"unknown modes {unknown}" if unknown else "--steps must be at least 2")
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        parser.error("--batch-sizes needs positive integers")
    work = args.work_dir.resolve()
    model = build_model(work / f"sd15-random-{args.scale}", args.scale)
    subject = load_by_path("dreambooth_scripts_sample_subject", REPO / "scripts" / "sample_subject.py")
    photos = work / "photos"
    subject.write_sample_subject(photos, count=max(5, max(batches)), size=max(args.resolution, 256))
    results = []
    for batch in batches:
        for name in modes:
            results.append(run_mode(name, batch, model, photos, work, args))
            log.info("%s", json.dumps(results[-1]))
    body = render(results, machine(), args)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if args.record:
        record(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
