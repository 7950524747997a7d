"""Image generation with the (partly trained) model: validation samples and class images.

Both use diffusers' StableDiffusionPipeline assembled from the run's own modules, so a sample shows
exactly what the current LoRA does, with a fixed seed per image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .models import SCHEDULER_CONFIG, BaseModel

logger = logging.getLogger(__name__)


def build_pipeline(base: BaseModel, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                   device: torch.device) -> Any:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG, steps_offset=1, prediction_type=base.prediction_type)
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe: Any, prompt: str, *, negative_prompt: str, seed: int, steps: int, guidance: float,
             size: int, autocast_dtype: torch.dtype | None) -> Image.Image:
    device = pipe.device
    generator = torch.Generator(device=device).manual_seed(seed)
    enabled = autocast_dtype is not None and device.type == "cuda"
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=enabled):
        result = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generator, height=size, width=size, output_type="pil")
    return result.images[0]


def class_cache_folder(cache_dir: Path, *, model_sha256: str, prompt: str, negative_prompt: str,
                       resolution: int, steps: int, guidance: float, seed: int) -> Path:
    """Where generated class images for these settings live.

    The image count is deliberately not part of the key: image ``i`` is always made with seed
    ``seed + i``, so asking for more images later reuses the ones already made.
    """
    key = json.dumps([model_sha256, prompt, negative_prompt, resolution, steps, guidance, seed])
    return cache_dir / "class_images" / hashlib.sha256(key.encode()).hexdigest()[:20]


def ensure_class_images(folder: Path, count: int, make_pipe: Callable[[], Any], *, prompt: str,
                        negative_prompt: str, seed: int, steps: int, guidance: float, size: int,
                        autocast_dtype: torch.dtype | None,
                        on_progress: Callable[[int, int], None]) -> list[Path]:
    """Generate whichever of images 0..count-1 are missing from ``folder`` and return all paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        (folder / "settings.json").write_text(json.dumps({"prompt": prompt, "negative_prompt": negative_prompt,
                                                          "seed": seed, "steps": steps, "size": size}), "utf-8")
        pipe = make_pipe()
        for done, i in enumerate(missing, start=1):
            image = generate(pipe, prompt, negative_prompt=negative_prompt, seed=seed + i, steps=steps,
                             guidance=guidance, size=size, autocast_dtype=autocast_dtype)
            tmp = paths[i].with_suffix(".tmp.png")
            image.save(tmp)
            tmp.replace(paths[i])  # a killed run never leaves a half-written image in the cache
            on_progress(done, len(missing))
    return paths
