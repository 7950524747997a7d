"""LoRA layers (peft) and the one file format we write: kohya-style keys with the true alpha.

Kohya keys are what ComfyUI's native LoraLoader, A1111/Forge and diffusers' ``load_lora_weights``
all read. diffusers' own ``convert_state_dict_to_kohya`` is not used: it writes alpha = rank, which
is wrong whenever alpha != rank, and with transformers 5 it drops the ``text_model`` level that
ComfyUI's key map needs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import fileio
from .identity import METADATA_KEY, TrainingIdentity

logger = logging.getLogger(__name__)

UNET_TARGETS: dict[str, list[str]] = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
}
UNET_TARGETS["attn_ff"] = UNET_TARGETS["attn"] + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_TARGETS["full"] = UNET_TARGETS["attn_ff"] + [
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
]
TEXT_ENCODER_TARGETS: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
TEXT_ENCODER_TARGETS["attn_mlp"] = TEXT_ENCODER_TARGETS["attn"] + ["fc1", "fc2"]

ADAPTER = "default"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_lora(model: torch.nn.Module, *, rank: int, alpha: float, targets: list[str], dropout: float) -> None:
    """Inject LoRA layers in place; only they are trainable afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights=True)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA parameters by their in-model names (what checkpoints store)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(state) != trainable:
        missing, extra = sorted(trainable - set(state)), sorted(set(state) - trainable)
        raise ValueError(f"checkpoint does not match this LoRA layout (missing {missing[:2]}, extra {extra[:2]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def kohya_state_dict(unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    models: list[tuple[str, torch.nn.Module]] = [("lora_unet", unet)]
    if text_encoder is not None:
        models.append(("lora_te", text_encoder))
    for prefix, model in models:
        for name, layer in lora_layers(model):
            if prefix == "lora_te" and not name.startswith("text_model."):
                name = "text_model." + name  # transformers 5 has no text_model level; the format does
            key = f"{prefix}_{name.replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=dtype)
    return out


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], *,
                             overwrite: bool, replace: Callable[[str, str], None] = os.replace,
                             link: Callable[[str, str], None] = os.link,
                             replace_attempts: int = fileio.REPLACE_ATTEMPTS,
                             replace_delay_s: float = fileio.REPLACE_DELAY_S) -> None:
    """Write to a temp file in the same folder, fsync, then move into place.

    A crash mid-write leaves only the temp file. An existing file is replaced only when
    ``overwrite`` is set, retrying while another program holds it open (Windows refuses to replace
    a LoRA that ComfyUI has loaded); when that never succeeds, the old file is unchanged, the new one
    stays in the temp file and FileInUseError names both. Without ``overwrite`` an existing file
    raises FileExistsError, atomically: the no-clobber create either lands whole or fails.
    ``replace`` and ``link`` are the operations used (tests inject failing ones).
    """
    from safetensors.torch import save_file

    Path(fileio.long_path(path.parent)).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    keep_tmp = False
    try:
        save_file(tensors, fileio.long_path(tmp), metadata=metadata)
        with open(fileio.long_path(tmp), "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            try:
                fileio.replace_with_retry(tmp, path, replace=replace, attempts=replace_attempts,
                                          delay_s=replace_delay_s)
            except fileio.FileInUseError:
                keep_tmp = True  # the only copy of the new LoRA: never delete it
                raise
        else:
            fileio.create_no_clobber(tmp, path, link=link)  # FileExistsError rather than replacing a good file
    finally:
        if not keep_tmp:
            Path(fileio.long_path(tmp)).unlink(missing_ok=True)


def metadata_signature(config: Any) -> dict[str, Any]:
    """The training signature as ``dreambooth.config`` stores it: user paths cut to their basenames.

    For people and other tools to read. Whether a LoRA is what a config would train is decided by
    ``dreambooth.identity`` (``identity.compare``), which uses contents, not names.
    """
    training = config.training_signature()
    for key in ("pretrained_model", "instance_data_dir", "class_data_dir"):
        if training.get(key):
            training[key] = Path(training[key]).name
    return json.loads(json.dumps(training))


def lora_metadata(config: Any, base: Any, *, step: int, version: str,
                  identity: TrainingIdentity | None = None) -> dict[str, str]:
    """Header metadata in the keys LoRA tools already read (kohya ``ss_*``, SAI ``modelspec.*``).

    Only basenames of user paths are written: a shared LoRA must not leak someone's folders.
    ``identity`` is written as ``dreambooth.identity``: hashes and settings, no paths; the train node
    reuses the file only when it matches.
    """
    arch = "stable-diffusion-v1" if base.family == "sd1" else "stable-diffusion-v2-768-v" if \
        base.prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_text_encoder_dim": str(config.text_encoder_rank) if config.train_text_encoder else "",
        "ss_text_encoder_alpha": str(config.text_encoder_alpha) if config.train_text_encoder else "",
        "ss_base_model_version": "sd_v1" if base.family == "sd1" else "sd_v2",
        "ss_v2": str(base.family == "sd2"),
        "ss_v_parameterization": str(base.prediction_type == "v_prediction"),
        "ss_sd_model_name": base.name,
        "ss_sd_model_hash": base.sha256[:10],
        "ss_new_sd_model_hash": base.sha256,
        "ss_output_name": config.lora_name,
        "ss_steps": str(step),
        "ss_max_train_steps": str(config.max_train_steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else 0),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_seed": str(config.seed),
        "ss_prior_loss_weight": str(config.prior_loss_weight if config.with_prior_preservation else 0),
        "ss_training_comment": f"DreamBooth-LoRA: {config.instance_prompt}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": config.lora_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "dreambooth.trainer_version": version,
        "dreambooth.instance_prompt": config.instance_prompt,
        "dreambooth.identifier": config.identifier,
        "dreambooth.class_prompt": config.class_prompt if config.with_prior_preservation else "",
        "dreambooth.base_model": base.name,
        "dreambooth.base_model_sha256": base.sha256,
        "dreambooth.prediction_type": base.prediction_type,
        "dreambooth.unet_target": config.unet_target,
        "dreambooth.text_encoder_target": config.text_encoder_target if config.train_text_encoder else "",
    }
    meta["dreambooth.config"] = json.dumps(metadata_signature(config), sort_keys=True)
    if identity is not None:
        meta[METADATA_KEY] = identity.to_json()
    meta.update({f"user.{k}": v for k, v in config.metadata.items()})
    return meta
