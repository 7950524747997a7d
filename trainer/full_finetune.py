"""Full DreamBooth (the paper's original method): what is saved when every UNet weight was trained.

Training itself is the LoRA loop with other parameters trainable (``run.py``); this module owns the
two files it ends with:

- the **single-file checkpoint** ComfyUI's CheckpointLoaderSimple (and A1111/Forge) load: the base
  model's file with the trained UNet (and text encoder) tensors put back under their original LDM
  names. Which diffusers name is which LDM name is learned from diffusers' own LDM -> diffusers
  converter, the one that loaded the model (``models.py``), run on shape-only placeholders: the
  converter moves tensors without copying them, so each placeholder's identity says where it came
  from. The map is therefore exactly the inverse of the load, for any depth of UNet, and a key it
  does not cover is an error, never a silently stale tensor;
- optionally a **LoRA extracted** from the weight difference by truncated SVD, in the same kohya
  format the LoRA trainer writes, so both LoRA loaders read it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .lora import kohya_module_name
from .models import CLIP_L_PREFIX, UNET_PREFIX, LazySafetensors, read_state_dict, unet_config_from_ldm

logger = logging.getLogger(__name__)

# Weights some checkpoints carry beside the model: an EMA copy of the *old* UNet would be stale.
STALE_PREFIXES = ("model_ema.",)
# Layers a LoRA is extracted for: every Linear and Conv2d a LoRA loader patches (as unet_target 'full').
EXTRACTED_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def check_source(pretrained_model: str, family: str, train_text_encoder: bool) -> None:
    """Refuse, before any photo is read, a full fine-tune this module could not save."""
    if Path(pretrained_model).is_dir():
        raise ConfigError("training_method", "a full fine-tune is saved as a single-file checkpoint built from the "
                          "base model's file; give pretrained_model as a .safetensors checkpoint (ComfyUI's "
                          "models/checkpoints), or use training_method 'lora' with a diffusers folder")
    if family == "sdxl":
        # ~2.6B UNet weights with AdamW need ~42 GB in fp32 before activations: LoRA is the way on one card.
        raise ConfigError("training_method", "a full fine-tune of SDXL is not supported (its UNet alone needs about "
                          "42 GB for fp32 weights, gradients and optimizer state); use training_method 'lora'")
    if family != "sd1" and train_text_encoder:
        raise ConfigError("train_text_encoder", "a full fine-tune of SD2's OpenCLIP text encoder cannot be saved "
                          "yet; turn train_text_encoder off (the UNet is still fully trained) or use "
                          "training_method 'lora'")


def _placeholders(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    shapes = state.shapes() if isinstance(state, LazySafetensors) else {k: tuple(v.shape) for k, v in state.items()}
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _inverse(ldm: dict[str, torch.Tensor], converted: Mapping[str, Any], prefix: str) -> dict[str, str]:
    by_identity = {id(v): k for k, v in ldm.items() if k.startswith(prefix)}
    inverse = {name: by_identity.get(id(v), "") for name, v in converted.items()}
    unmapped = sorted(name for name, key in inverse.items() if not key)
    if unmapped:  # the converter computed a tensor instead of moving one: no 1:1 name to write back
        raise RuntimeError(f"cannot map {len(unmapped)} converted tensors back to checkpoint names, e.g. {unmapped[:3]}")
    return inverse


def ldm_names(state: Mapping[str, torch.Tensor], family: str, *, text_encoder: bool) -> dict[str, str]:
    """Model parameter name (``unet.<diffusers name>``, ``text_encoder.<transformers name>``) -> LDM key."""
    from diffusers.loaders import single_file_utils as sfu

    ldm = _placeholders(state)
    out = {f"unet.{k}": v for k, v in _inverse(
        ldm, sfu.convert_ldm_unet_checkpoint(ldm, unet_config_from_ldm(ldm, family)), UNET_PREFIX).items()}
    if text_encoder:
        for name, key in _inverse(ldm, sfu.convert_ldm_clip_checkpoint(ldm), CLIP_L_PREFIX).items():
            out[f"text_encoder.{name}"] = key
            if name.startswith("text_model."):  # transformers 5 has no text_model level
                out[f"text_encoder.{name[len('text_model.'):]}"] = key
    return out


def checkpoint_tensors(base_file: Path, family: str, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base file's tensors with the trained ones in place, floats in ``dtype``, stale extras dropped."""
    state = read_state_dict(base_file)
    names = ldm_names(state, family, text_encoder=text_encoder is not None)
    trained: dict[str, torch.Tensor] = {}
    parts = [("unet.", unet)] + ([("text_encoder.", text_encoder)] if text_encoder is not None else [])
    for prefix, model in parts:
        for name, param in model.state_dict().items():
            key = names.get(prefix + name)
            if key is None:
                if name.endswith("position_ids"):
                    continue  # a buffer transformers rebuilds; the file keeps its own
                raise RuntimeError(f"no checkpoint name for the trained tensor {prefix}{name}")
            trained[key] = param
    out: dict[str, torch.Tensor] = {}
    dropped = 0
    for key in state:
        if key.startswith(STALE_PREFIXES):
            dropped += 1
            continue
        value = trained.get(key)
        if value is None:
            value = state[key]
        out[key] = (value.detach().to("cpu", dtype) if value.is_floating_point() else value.detach().cpu()).contiguous()
    if isinstance(state, LazySafetensors):
        state.release()  # the base file stays open between reads: not while the export is written
    if dropped:
        logger.info("left out %d EMA tensors of the base model (they hold the weights before training)", dropped)
    missing = sorted(set(trained) - set(out))
    if missing:
        raise RuntimeError(f"trained tensors with no place in {base_file.name}, e.g. {missing[:3]}")
    return out


def checkpoint_metadata(lora_metadata: dict[str, str]) -> dict[str, str]:
    """The LoRA header's provenance, without the LoRA-only keys, and the architecture of a whole model."""
    meta = {k: v for k, v in lora_metadata.items()
            if not k.startswith(("ss_network", "ss_text_encoder_dim", "ss_text_encoder_alpha"))}
    # lora_metadata names the base model's architecture with a "/lora" suffix.
    meta["modelspec.architecture"] = meta["modelspec.architecture"].removesuffix("/lora")
    meta["ss_training_comment"] = meta.get("ss_training_comment", "").replace("DreamBooth-LoRA", "DreamBooth (full)")
    meta["dreambooth.training_method"] = "full"
    return meta


# --- LoRA extraction ------------------------------------------------------------------------------------


def _low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down the best rank-``rank`` approximation of ``delta`` (2-D)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()  # split the singular values evenly: both factors keep a similar scale in fp16
    return u[:, :r] * root, root[:, None] * vh[:r]


def extract_lora(pairs: list[tuple[str, torch.nn.Module, torch.nn.Module]], rank: int,
                 dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """Kohya LoRA tensors approximating ``tuned - base`` for every Linear/Conv2d of each model pair.

    ``pairs``: (kohya prefix ``lora_unet`` / ``lora_te``, base model, tuned model). Alpha is the rank
    of each layer (scale 1), so strength 1 applies the extracted difference as it is. Layers that did
    not change (e.g. a frozen text encoder) are left out. Returns the tensors and the layer count.
    """
    out: dict[str, torch.Tensor] = {}
    layers = 0
    for prefix, base, tuned in pairs:
        base_modules = dict(base.named_modules())
        for name, module in tuned.named_modules():
            if not isinstance(module, EXTRACTED_LAYER_TYPES):
                continue
            before = base_modules[name].weight.detach().to(module.weight.device, torch.float32)
            delta = module.weight.detach().float() - before
            if not torch.any(delta):
                continue
            key = kohya_module_name(prefix, name)
            up, down = _low_rank(delta.reshape(delta.shape[0], -1), rank)
            if delta.ndim == 4:  # conv: down is a conv of the layer's kernel, up a 1x1 conv
                down = down.reshape(down.shape[0], *delta.shape[1:])
                up = up[:, :, None, None]
            out[f"{key}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
            layers += 1
    return out, layers


def extracted_lora_metadata(lora_metadata: dict[str, str], rank: int, checkpoint_name: str) -> dict[str, str]:
    meta = dict(lora_metadata)
    meta.update({"ss_network_dim": str(rank), "ss_network_alpha": str(rank), "ss_text_encoder_dim": "",
                 "ss_text_encoder_alpha": "", "dreambooth.training_method": "full",
                 "dreambooth.extracted_from": checkpoint_name, "dreambooth.extract_lora_rank": str(rank)})
    meta["ss_training_comment"] = meta.get("ss_training_comment", "").replace(
        "DreamBooth-LoRA", f"LoRA (rank {rank}) extracted from a full DreamBooth fine-tune")
    return meta
