"""Device, precision and attention choices, made once per run and explained in the log."""

from __future__ import annotations

import importlib.util
import logging
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# What to change after running out of memory, in the order to try it (cheapest loss first): (the
# setting the step is about, what to do). Templates name settings only as ``{config_key}`` fields, so
# each reader sees the names they know: config keys on the command line, widget names in ComfyUI.
OOM_ADVICE_STEPS: tuple[tuple[str, str], ...] = (
    ("gradient_checkpointing", "turn {gradient_checkpointing} on"),
    ("mixed_precision", "set {mixed_precision} to fp16 (or bf16)"),
    ("cache_latents", "keep {cache_latents} on"),
    ("train_batch_size", "lower {train_batch_size} to 1 and raise {gradient_accumulation_steps} instead"),
    ("optimizer", "set {optimizer} to adamw8bit (needs bitsandbytes)"),
    ("train_text_encoder", "turn {train_text_encoder} off"),
    ("resolution", "lower {resolution} (e.g. 512 -> 384)"),
)
_OOM_INTRO = "Out of GPU memory. Try, in this order: "
_OOM_TAIL = "close other programs using the GPU."


def _template_keys(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


# Every setting the advice names, in the order it names them (for a UI that points at them).
OOM_SETTINGS: tuple[str, ...] = tuple(dict.fromkeys(
    key for _, template in OOM_ADVICE_STEPS for key in _template_keys(template)))


def oom_advice(display: Callable[[str], str] = lambda key: key) -> str:
    """The out-of-memory advice as one sentence; ``display`` turns a config key into the name shown
    (the key itself by default, as a command-line user writes it in the config)."""
    steps = [template.format_map({key: display(key) for key in _template_keys(template)})
             for _, template in OOM_ADVICE_STEPS]
    return _OOM_INTRO + "; ".join([*steps, _OOM_TAIL])


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    mixed_precision: str  # "no" | "fp16" | "bf16"
    weight_dtype: torch.dtype  # dtype of the frozen base weights
    use_xformers: bool
    grad_scaler: bool = False  # fp16 on a GPU: losses are scaled so small gradients do not flush to zero
    # UNet weights in channels-last (NHWC) layout. On a CPU, oneDNN's convolutions run the SD1.5 UNet's
    # forward + backward 1.5x faster in that layout at 64 px and no slower at 128-256 px (one thread,
    # benchmarks/RESULTS.md); on CUDA it is not measured yet, so it stays off there.
    channels_last: bool = False
    # (level, message) lines the run shows on the node and logs: why this device and precision.
    notes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cpu", "cuda", "cuda:N" or "mps"
    note: str = ""  # why, when the choice is not the obvious one
    level: str = "info"  # "warning" when training runs somewhere slower than the user likely expects


@dataclass(frozen=True)
class PrecisionPlan:
    mixed_precision: str  # "no" | "fp16" | "bf16"
    weight_dtype: torch.dtype
    grad_scaler: bool
    note: str
    level: str = "info"


_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def plan_device(requested: str, *, cuda_available: bool, mps_built: bool, mps_available: bool,
                mps_error: str | None = None, platform: str = sys.platform, machine: str = "") -> DevicePlan:
    """Where to train, from facts about this machine (passed in, so every branch is testable anywhere).

    ``mps_error`` is what a trial of the training ops on the Apple GPU raised (None: they ran).
    Falling back to the CPU is never silent: the note says why and how to get the GPU.
    """
    from .config import ConfigError

    if requested == "cpu":
        return DevicePlan("cpu")
    if requested.startswith("cuda"):
        if not cuda_available:
            raise ConfigError("device", f"'{requested}' requested but no CUDA GPU is available; use 'auto' or 'cpu'")
        return DevicePlan(requested)
    if requested == "mps":
        if not mps_available:
            raise ConfigError("device", "'mps' requested but this torch/macOS has no usable Apple GPU (MPS needs "
                              "Apple silicon, macOS 12.3+ and a torch built with MPS); use 'auto' or 'cpu'")
        if mps_error:
            raise ConfigError("device", f"'mps' requested but a training operation fails on the Apple GPU "
                              f"({mps_error}); use 'cpu' or update torch")
        return DevicePlan("mps", "training on the Apple GPU (MPS)")
    if cuda_available:
        return DevicePlan("cuda")
    slow = "training runs on the CPU, which is much slower than a GPU"
    if mps_available and not mps_error:
        return DevicePlan("mps", "training on the Apple GPU (MPS)")
    if mps_available:
        return DevicePlan("cpu", f"{slow}: the Apple GPU (MPS) is present but a training operation fails on it "
                          f"({mps_error}); updating torch may fix this", "warning")
    if platform == "darwin":
        if machine == "arm64" and not mps_built:
            why = "this torch build has no MPS support; install the standard macOS arm64 torch to use the Apple GPU"
        elif mps_built:
            why = "torch has MPS support but macOS reports no usable Apple GPU (needs Apple silicon and macOS 12.3+)"
        else:
            why = "this Mac has no CUDA GPU and no Apple-silicon GPU"
        return DevicePlan("cpu", f"{slow}: {why}", "warning")
    return DevicePlan("cpu", f"{slow}: no CUDA GPU was found (is a CUDA build of torch installed, and the driver "
                      "working?)", "warning")


def plan_precision(device_type: str, requested: str, *, bf16_native: bool) -> PrecisionPlan:
    """Mixed precision for ``device_type``; ``bf16_native`` says whether that device has bf16 in hardware
    (emulated bf16 is slower than fp16 and is never picked by 'auto')."""
    if device_type == "mps":
        # Training in half precision on MPS depends on the torch and macOS versions (GradScaler, bf16
        # kernels); fp32 works everywhere MPS does.
        note = "mixed precision off on the Apple GPU (MPS): training in fp32"
        if requested in ("fp16", "bf16"):
            return PrecisionPlan("no", torch.float32, False, f"{requested} is not used on the Apple GPU (MPS): "
                                 "training in fp32", "warning")
        return PrecisionPlan("no", torch.float32, False, note)
    if device_type == "cuda":
        if requested == "auto":
            if bf16_native:
                return PrecisionPlan("bf16", torch.bfloat16, False, "bf16 (this GPU has native bf16)")
            return PrecisionPlan("fp16", torch.float16, True,
                                 "fp16 with loss scaling (this GPU has no native bf16)")
        if requested == "bf16" and not bf16_native:
            return PrecisionPlan("bf16", torch.bfloat16, False, "bf16 requested on a GPU without native bf16: it "
                                 "is emulated and slow; fp16 (or 'auto') is faster here", "warning")
        if requested == "fp16":
            return PrecisionPlan("fp16", torch.float16, True, "fp16 with loss scaling")
        return PrecisionPlan(requested, _DTYPES[requested], False, requested if requested != "no" else "fp32")
    if requested == "auto":
        # CPUs have no fast fp16 (a matmul is ~80x slower than fp32): train in fp32 there.
        return PrecisionPlan("no", torch.float32, False, "fp32 on the CPU")
    if requested == "fp16":
        return PrecisionPlan("fp16", torch.float16, False, "fp16 on the CPU is very slow (no fp16 hardware); "
                             "'bf16' or 'no' is much faster", "warning")
    return PrecisionPlan(requested, _DTYPES[requested], False, requested if requested != "no" else "fp32")


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether this particular GPU computes bf16 in hardware (Ampere or newer on NVIDIA)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch before 2.3 has no including_emulation and counts emulation as support
            return torch.cuda.get_device_capability(index) >= (8, 0)


def probe_mps() -> str | None:
    """Run the kinds of operations a training step uses on the Apple GPU; None when they all work,
    else the error (an operation missing from this torch's MPS backend)."""
    import torch.nn.functional as F

    try:
        x = torch.randn(1, 4, 16, 16, device="mps", requires_grad=True)
        conv = torch.nn.Conv2d(4, 8, 3, padding=1).to("mps")
        h = F.silu(F.group_norm(conv(x), 4))
        tokens = h.flatten(2).transpose(1, 2)[:, None]
        attn = F.scaled_dot_product_attention(tokens, tokens, tokens)
        F.interpolate(h, scale_factor=2.0, mode="nearest").mean().add(attn.mean()).backward()
        torch.mps.synchronize()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not train there
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def resolve_runtime(device: str, mixed_precision: str, attention: str) -> Runtime:
    """Decide device, precision and attention for this machine; the notes explain the choice."""
    import platform

    mps_backend = getattr(torch.backends, "mps", None)
    mps_built = bool(mps_backend and mps_backend.is_built())
    mps_available = bool(mps_backend and mps_backend.is_available())
    cuda_available = torch.cuda.is_available()
    wants_mps = device == "mps" or (device == "auto" and not cuda_available)
    mps_error = probe_mps() if mps_available and wants_mps else None
    dplan = plan_device(device, cuda_available=cuda_available, mps_built=mps_built, mps_available=mps_available,
                        mps_error=mps_error, machine=platform.machine())
    dev = torch.device(dplan.device)
    bf16_native = dev.type == "cuda" and cuda_bf16_native(dev)
    pplan = plan_precision(dev.type, mixed_precision, bf16_native=bf16_native)
    has_xformers = importlib.util.find_spec("xformers") is not None
    if attention == "xformers" and not (has_xformers and dev.type == "cuda"):
        from .config import ConfigError

        raise ConfigError("attention", "'xformers' needs the xformers package and a CUDA GPU; use 'sdpa'")
    use_xformers = attention == "xformers" or (attention == "auto" and has_xformers and dev.type == "cuda")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    notes = [(dplan.level, dplan.note)] if dplan.note else []
    if pplan.level == "warning":
        notes.append(("warning", pplan.note))
    notes.append(("info", f"device {where}, precision {pplan.note}, attention {'xformers' if use_xformers else 'sdpa'}"))
    return Runtime(device=dev, mixed_precision=pplan.mixed_precision, weight_dtype=pplan.weight_dtype,
                   use_xformers=use_xformers, grad_scaler=pplan.grad_scaler, channels_last=dev.type == "cpu",
                   notes=tuple(notes))


def upcast_attention(unet: torch.nn.Module, family: str) -> bool:
    """Compute SD2.x attention scores in fp32, as its own code, ComfyUI and diffusers (2.1) do.

    SD2's query-key products overflow fp16 (NaN images, NaN loss). Sets ``upcast_attention`` on the
    UNet's attention layers and config; returns whether the UNet is upcast. diffusers' SDPA and
    xformers processors ignore the flag (their fused kernels accumulate the products in fp32, and
    torch's math fallback upcasts half inputs); it guards diffusers' plain AttnProcessor path.
    """
    from diffusers.models.attention_processor import Attention

    wanted = family == "sd2" or bool(getattr(getattr(unet, "config", None), "upcast_attention", False))
    if not wanted:
        return False
    for module in unet.modules():
        if isinstance(module, Attention):
            module.upcast_attention = True
    register = getattr(unet, "register_to_config", None)
    if register is not None:
        register(upcast_attention=True)
    return True


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

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps_backend = getattr(torch.backends, "mps", None)
    if mps_backend is not None and mps_backend.is_available():
        torch.mps.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (e.g. musl): nothing to trim
