"""Device, precision and attention choices, made once per run and explained in the log."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

OOM_ADVICE = (
    "Out of GPU memory. Try, in this order: enable gradient_checkpointing; set mixed_precision to fp16 "
    "(or bf16); keep cache_latents on; lower train_batch_size to 1 (raise gradient_accumulation_steps "
    "instead); use optimizer adamw8bit (needs bitsandbytes); set train_text_encoder false; lower the "
    "resolution (e.g. 512 -> 384); close other programs using the GPU."
)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    mixed_precision: str  # "no" | "fp16" | "bf16"
    weight_dtype: torch.dtype  # dtype of the frozen base weights
    use_xformers: bool


def resolve_runtime(device: str, mixed_precision: str, attention: str) -> Runtime:
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            from .config import ConfigError

            raise ConfigError("device", f"'{device}' requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    if mixed_precision == "auto":
        if dev.type == "cuda":
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # CPUs have no fast fp16 (a matmul is ~80x slower than fp32): train in fp32 there.
            mixed_precision = "no"
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    has_xformers = importlib.util.find_spec("xformers") is not None
    if attention == "xformers" and not (has_xformers and dev.type == "cuda"):
        from .config import ConfigError

        raise ConfigError("attention", "'xformers' needs the xformers package and a CUDA GPU; use 'sdpa'")
    use_xformers = attention == "xformers" or (attention == "auto" and has_xformers and dev.type == "cuda")
    logger.info("device %s, mixed precision %s, attention %s", dev, mixed_precision,
                "xformers" if use_xformers else "sdpa")
    return Runtime(device=dev, mixed_precision=mixed_precision, weight_dtype=weight_dtype, use_xformers=use_xformers)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """This process's peak GPU memory so far (torch's allocator: tensors, and what it holds reserved),
    for the metrics events; nothing off the GPU."""
    if device.type != "cuda":
        return {}
    return {"vram_peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "vram_reserved_peak_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def free_accelerator_memory() -> None:
    """Give freed model memory back: to the GPU's pool and, on glibc, to the OS (freed CPU tensors
    otherwise stay in malloc's arenas and count against the machine until the process exits)."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (e.g. musl): nothing to trim
