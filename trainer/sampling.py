"""Image generation with the (partly trained) model: validation samples and class images.

Both use diffusers' StableDiffusionPipeline assembled from the run's own modules, so a sample shows
exactly what the current LoRA does, with a fixed seed per image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .fileio import long_path
from .models import SCHEDULER_CONFIG, BaseModel
from .protocol import StopRequested

logger = logging.getLogger(__name__)


def build_pipeline(base: BaseModel, unet: torch.nn.Module, text_encoders: list[torch.nn.Module],
                   device: torch.device) -> Any:
    """diffusers' pipeline of the family (SDXL: StableDiffusionXLPipeline, which adds the pooled prompt
    and size conditioning) around the run's own modules. The VAE is fp32 (the engine never casts it), so
    SDXL's fp16 overflow cannot happen here."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG, steps_offset=1, prediction_type=base.prediction_type)
    if base.spec.size_conditioning:
        first, second = text_encoders
        pipe = StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=first, text_encoder_2=second, tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1], unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=base.vae, text_encoder=text_encoders[0], tokenizer=base.tokenizers[0], unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_modules(pipe: Any) -> list[torch.nn.Module]:
    """The modules a sampler run must put in eval mode and hand back as they were (inference_state)."""
    names = ("unet", "text_encoder", "text_encoder_2", "vae")
    return [m for m in (getattr(pipe, n, None) for n in names) if m is not None]


@contextlib.contextmanager
def inference_state(*models: torch.nn.Module | None) -> Iterator[None]:
    """Sample without disturbing training: dropout off (eval mode), and the global generators, which
    LoRA dropout draws from, handed back exactly as they were, so a run with validation samples
    trains the same LoRA as one without. Each model gets its own train/eval mode back."""
    present = [m for m in models if m is not None]
    modes = [(m, m.training) for m in present]
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    mps_backend = getattr(torch.backends, "mps", None)
    mps_state = torch.mps.get_rng_state() if mps_backend is not None and mps_backend.is_available() else None
    for model in present:
        model.eval()
    try:
        yield
    finally:
        for model, training in modes:
            model.train(training)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)


def generate(pipe: Any, prompt: str, *, negative_prompt: str, seed: int, steps: int, guidance: float,
             size: int, autocast_dtype: torch.dtype | None,
             should_stop: Callable[[], bool] | None = None) -> Image.Image:
    """One image with seed ``seed``. ``should_stop`` is asked after every denoising step; when it
    says yes, StopRequested leaves the sampler at once (a 50-step image takes minutes on a CPU)."""
    return generate_batch(pipe, prompt, negative_prompt=negative_prompt, seeds=[seed], steps=steps,
                          guidance=guidance, size=size, autocast_dtype=autocast_dtype, should_stop=should_stop)[0]


@torch.no_grad()
def generate_batch(pipe: Any, prompt: str, *, negative_prompt: str, seeds: list[int], steps: int, guidance: float,
                   size: int, autocast_dtype: torch.dtype | None,
                   should_stop: Callable[[], bool] | None = None) -> list[Image.Image]:
    """One image per seed, denoised as one batch: each image's starting noise comes from its own
    generator, so image ``k`` is the image ``seeds[k]`` gives alone (up to the last bits of batched
    arithmetic), and the prompts are encoded once for the batch."""
    device = pipe.device
    # MPS generators are newer and not reproducible across torch versions; diffusers draws the
    # initial noise on the generator's device and moves it, so a CPU generator works for MPS.
    generators = [torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(seed)
                  for seed in seeds]
    enabled = autocast_dtype is not None and device.type == "cuda"
    extra: dict[str, Any] = {}
    if should_stop is not None:
        def _check(_pipe: Any, _step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if should_stop():
                raise StopRequested
            return kwargs

        extra["callback_on_step_end"] = _check
    # No autocast object at all when off: older torch builds reject device types such as "mps".
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if enabled else contextlib.nullcontext()
    with autocast:
        result = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generators if len(generators) > 1 else generators[0],
                      num_images_per_prompt=len(generators), height=size, width=size, output_type="pil",
                      **extra)
    return list(result.images)


def class_cache_folder(cache_dir: Path, *, model_sha256: str, prompt: str, negative_prompt: str,
                       resolution: int, steps: int, guidance: float, seed: int) -> Path:
    """Where generated class images for these settings live.

    The image count is deliberately not part of the key: image ``i`` is always made with seed
    ``seed + i``, so asking for more images later reuses the ones already made.
    """
    key = json.dumps([model_sha256, prompt, negative_prompt, resolution, steps, guidance, seed])
    return cache_dir / "class_images" / hashlib.sha256(key.encode()).hexdigest()[:20]


# Class images generated per batch: the diffusers DreamBooth example's sample_batch_size. Batching saves
# ~10% per image on a CPU (one prompt encoding, larger GEMMs) and more on a GPU; SD1.5 at 512 px with
# classifier-free guidance runs 8 latents per UNet call, well within an 8 GB card in half precision.
CLASS_IMAGE_BATCH = 4


def ensure_class_images(folder: Path, count: int, make_pipe: Callable[[], Any], *, prompt: str,
                        negative_prompt: str, seed: int, steps: int, guidance: float, size: int,
                        autocast_dtype: torch.dtype | None,
                        on_progress: Callable[[int, int], None],
                        should_stop: Callable[[], bool] | None = None,
                        batch_size: int = CLASS_IMAGE_BATCH) -> list[Path]:
    """Generate whichever of images 0..count-1 are missing from ``folder`` and return all paths.

    Image ``i`` is made with seed ``seed + i``, ``batch_size`` images per sampler run. A stop
    (``should_stop``) raises StopRequested within one denoising step; the batches finished so far
    stay in the cache for the next run.
    """
    Path(long_path(folder)).mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        Path(long_path(folder / "settings.json")).write_text(json.dumps(
            {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps, "size": size}),
            "utf-8")
        pipe = make_pipe()
        with inference_state(*pipeline_modules(pipe)):
            for start in range(0, len(missing), batch_size):
                batch = missing[start:start + batch_size]
                images = generate_batch(pipe, prompt, negative_prompt=negative_prompt, seeds=[seed + i for i in batch],
                                        steps=steps, guidance=guidance, size=size, autocast_dtype=autocast_dtype,
                                        should_stop=should_stop)
                for i, image in zip(batch, images, strict=True):
                    tmp = paths[i].with_suffix(".tmp.png")
                    image.save(long_path(tmp))
                    os.replace(long_path(tmp), long_path(paths[i]))  # a killed run never leaves half an image
                on_progress(start + len(batch), len(missing))
    return paths
