"""The main job, end to end: photos -> DreamBooth-LoRA training -> ControlNet-guided generation,
run headless in a real ComfyUI with this pack installed.

    python3 scripts/dev.py demo                       # embedded tiny model + drawn sample subject
    python3 scripts/dev.py demo --checkpoint sd15.safetensors --photos my_dog/ --controlnet canny.pth

It runs ``example_workflows/api/dreambooth_train_then_generate.json`` - the same graph users load in
the UI - with the model files, photos and sizes swapped in, then prints where the LoRA, the
validation samples and the generated images are. ComfyUI is provisioned into ``.cache/`` unless
``COMFYUI_PATH`` points at an existing one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "example_workflows" / "api" / "dreambooth_train_then_generate.json"
logger = logging.getLogger("demo")


def adapt_workflow(prompt: dict[str, Any], *, checkpoint: str, controlnet: str, folder: str, layout_image: str,
                   resolution: int, steps: int, lora_name: str, num_class_images: int,
                   sample_steps: int, output_prefix: str, rank: int | None = None) -> dict[str, Any]:
    """The example graph with other files and sizes; nothing structural changes."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        kind, inputs = node["class_type"], node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = checkpoint
        if kind == "ControlNetLoader":
            inputs["control_net_name"] = controlnet
        if kind == "LoadImage":
            inputs["image"] = layout_image
        if kind == "DreamBoothDataset":
            inputs.update(folder=folder, resolution=resolution)
        if kind == "DreamBoothPriorPreservation":
            inputs["num_class_images"] = num_class_images
        if kind == "DreamBoothTrain":
            inputs.update(steps=steps, lora_name=lora_name, checkpointing_steps=max(0, steps // 2),
                          validation_steps=0)
            if rank is not None:
                inputs.update(rank=rank, alpha=float(rank))
        if kind == "DreamBoothLoraLoader" and "lora" not in inputs:  # a file, not the train node's output
            inputs["lora_name"] = f"{lora_name}.safetensors"
        if kind == "DreamBoothControlNetGenerate":
            inputs["steps"] = sample_steps
        if kind == "SaveImage":
            inputs["filename_prefix"] = output_prefix
    return out




def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="SD1.x/SD2.x checkpoint (default: a tiny random model)")
    parser.add_argument("--controlnet", type=Path, help="ControlNet matching --checkpoint (default: tiny)")
    parser.add_argument("--photos", type=Path, help="folder of subject photos (default: a drawn sample toy)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 40 tiny, 500 real)")
    parser.add_argument("--resolution", type=int, default=None, help="training px (default 64 tiny, 512 real)")
    parser.add_argument("--out", type=Path, default=REPO / "output" / "demo", help="where everything goes")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    # Sibling scripts; imported here so the tests can load this file for adapt_workflow alone.
    sys.path.insert(0, str(REPO / "scripts"))
    from sample_subject import write_sample_subject  # noqa: PLC0415
    from support_loader import load_test_support  # noqa: PLC0415

    load_test_support()
    from dreambooth_test_support import comfyui, paths, tiny_models  # noqa: PLC0415

    real = args.checkpoint is not None
    if real and args.controlnet is None:
        logger.error("--checkpoint needs --controlnet (a ControlNet for the same base model, e.g. canny)")
        return 2
    steps = args.steps or (500 if real else 40)
    resolution = args.resolution or (512 if real else 64)
    out = args.out.resolve()
    base = out / "comfyui"
    if base.exists():
        shutil.rmtree(base)
    root = comfyui.provision_comfyui()
    logger.info("ComfyUI: %s", root)
    checkpoint = args.checkpoint.resolve() if real else tiny_models.tiny_sd15_checkpoint(root)
    controlnet = args.controlnet.resolve() if args.controlnet else tiny_models.tiny_controlnet(root)
    server = comfyui.ComfyServer(root, base)
    server.install_pack(REPO, paths.PACK_NAME)
    server.add_model("checkpoints", checkpoint, checkpoint.name)
    server.add_model("controlnet", controlnet, controlnet.name)
    photos_dir = Path(server.input_dir) / "demo_subject"
    if args.photos:
        photos = sorted(p for p in args.photos.iterdir() if p.is_file())
        photos_dir.mkdir(parents=True, exist_ok=True)
        for p in photos:
            shutil.copy(p, photos_dir / p.name)
    else:
        photos = write_sample_subject(photos_dir)
    layout = next(p for p in sorted(photos_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    shutil.copy(layout, Path(server.input_dir) / f"layout{layout.suffix}")
    prompt = adapt_workflow(
        json.loads(WORKFLOW.read_text(encoding="utf-8")), checkpoint=checkpoint.name, controlnet=controlnet.name,
        folder="demo_subject", layout_image=f"layout{layout.suffix}", resolution=resolution, steps=steps,
        lora_name="demo/subject", num_class_images=4 if not real else 50, sample_steps=4 if not real else 25,
        output_prefix="demo/subject", rank=None if real else 8)
    started = time.monotonic()
    with server:
        logger.info("running the train -> generate workflow (%d steps at %d px)...", steps, resolution)
        result = server.run_prompt(prompt, timeout=24 * 3600)
        if result.status != "success":
            logger.error("the workflow failed: %s", json.dumps(result.error, indent=1)[:4000])
            return 1
        lora = Path(server.models_dir) / "loras" / "demo" / "subject.safetensors"
        run_dir = Path(server.output_dir) / "dreambooth" / "demo" / "subject"
        samples = sorted((run_dir / "samples").glob("*.png"))
        images = server.output_files(result, "save")
        losses = [e["data"]["event"]["loss"] for e in result.events
                  if e.get("type") == "dreambooth.train" and e["data"]["event"].get("type") == "metrics"]
    logger.info("done in %.0f s", time.monotonic() - started)
    logger.info("LoRA:               %s", lora)
    logger.info("training run:       %s (config, checkpoints, trainer.log)", run_dir)
    if losses:
        logger.info("loss:               %.4f (first step) -> %.4f (last step)", losses[0], losses[-1])
    for path in samples:
        logger.info("validation sample:  %s", path)
    for path in images:
        logger.info("generated image:    %s", path)
    return 0 if lora.is_file() and images else 1


if __name__ == "__main__":
    sys.exit(main())
