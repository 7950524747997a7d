"""Tiny, random, deterministic SD1.5 / SD2.x-v models that a real ComfyUI accepts, built at test time.

ComfyUI recognises SD1.5 from tensor shapes: model_channels 320 and context_dim 768 are what
matter, depth is free. So the UNet here has one level (channel_mult [1]) with one res block and
one transformer, while the text encoder (full CLIP-L) and the VAE (full SD VAE) keep their real
sizes because ComfyUI builds those from fixed configs.

The models are created with diffusers / transformers (their own initialisers, so no weight is
left zero or uninitialised: a zero output conv would make every LoRA gradient zero) and
converted to the original LDM key layout with ComfyUI's own converters. That conversion runs in
a child process with the ComfyUI root on sys.path, so the pytest process never imports ComfyUI.

The SD2 checkpoint follows the same idea with SD2's shapes (context_dim 1024, linear proj_in,
64-channel heads) and an OpenCLIP text encoder of full width but only a few resblocks: unlike the
UNet, ComfyUI builds that encoder from a fixed 24-layer config, so it loads the tiny one with a
"clip missing" warning for the layers the file lacks (nothing here runs those layers in ComfyUI).

Files are cached under CACHE_DIR/fixtures/, keyed by BUILDER_VERSION (SD2_BUILDER_VERSION for the
SD2 file); bump it whenever the output of a builder changes. Run this file to build them all:
`python tests/support/tiny_models.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run as a script: load tests/support as a package (never put the repo root, whose `nodes/`
    # shadows ComfyUI's nodes.py, on sys.path) and hand over to the package's copy of this module.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    _spec = importlib.util.spec_from_file_location(
        "dreambooth_test_support", _here / "__init__.py", submodule_search_locations=[str(_here)]
    )
    assert _spec is not None and _spec.loader is not None
    _pkg = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _pkg
    _spec.loader.exec_module(_pkg)
    sys.exit(importlib.import_module("dreambooth_test_support.tiny_models").main())

from .paths import CACHE_DIR, atomic_file, child_env  # noqa: E402

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
SEED = 20240601

# diffusers-format configs of the tiny models (also what a diffusers pipeline needs to load them).
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [320],
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' legacy name: SD1.5 has 8 heads
    "norm_num_groups": 32,
    "use_linear_projection": False,
}
TINY_CONTROLNET_CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "conditioning_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [320],
    "down_block_types": ["CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "use_linear_projection": False,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
}
# The standard SD VAE (what ComfyUI builds for every SD1.5 checkpoint).
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# openai/clip-vit-large-patch14 text tower, written here so nothing is fetched from the hub.
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# ComfyUI's description of the same UNet, for its diffusers -> LDM key map.
_COMFY_UNET_CONFIG: dict[str, Any] = {
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
}

# Full size, for the benchmarks only (never built by the tests): SD1.5's UNet and ControlNet as
# diffusers configures them (runwayml/stable-diffusion-v1-5 unet/config.json, lllyasviel's
# sd-controlnet-* config.json), random weights. The checkpoint is ~2.1 GB in fp16.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_CONTROLNET_CONFIG: dict[str, Any] = {
    "in_channels": 4, "conditioning_channels": 3, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
}
# unet_to_diffusers walks the up blocks lowest resolution first and pops transformer_depth_output
# from the end, so the three attention-less output blocks come last here.
_COMFY_SD15_UNET_CONFIG: dict[str, Any] = {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1] * 9 + [0] * 3,
    "transformer_depth_middle": 1,
}

# SD2.x-v: the tiny UNet at SD2's widths. diffusers' `attention_head_dim` is its legacy name for the
# number of heads: 320 channels / 64 per head (SD2's num_head_channels) = 5.
SD2_BUILDER_VERSION = "1"
TINY_SD2_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": 5,
    "use_linear_projection": True,
}
# The OpenCLIP ViT-H text tower SD2 uses, cut to 3 resblocks. SD2 conditions on the penultimate
# layer, so a loader keeps 2 of them (diffusers' SD2 text encoder drops resblock 23 the same way).
TINY_OPEN_CLIP_TEXT_CONFIG: dict[str, Any] = {
    **CLIP_L_TEXT_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 1024,
    "num_hidden_layers": 3,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
# Spread of the last output block's first norm1.bias: ComfyUI and the trainer call an SD2 UNet
# v-prediction when its std exceeds 0.09 (real 768-v files are well above it; a fresh LayerNorm
# bias is all zeros).
SD2_V_NORM_BIAS_STD = 0.2

FIXTURES_DIR = CACHE_DIR / "fixtures"

# SDXL: ComfyUI detects SDXL by model_channels 320, transformer_depth [0, 0, 2, 2, 10, 10] (per input
# block), context_dim 2048 and adm_in_channels 2816, so the UNet keeps SDXL's block structure; it is
# small only in width (320 channels at every level instead of 320/640/1280: about 1/10 of SDXL's
# 2.6B parameters). Both text encoders keep their real sizes (ComfyUI's SDXL CLIP has fixed configs):
# CLIP-L and OpenCLIP ViT-bigG (695M parameters). The VAE is the standard SD VAE architecture, which
# SDXL's is. Heads: 320 channels / 64 per head = 5, as ComfyUI computes them.
SDXL_BUILDER_VERSION = "1"
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 320, 320],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048, "attention_head_dim": 5, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
_COMFY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
}
# The tiny SDXL UNet's encoder half as a ControlNet (what ComfyUI detects as an SDXL ControlNet).
TINY_SDXL_CONTROLNET_CONFIG: dict[str, Any] = {
    **{k: TINY_SDXL_UNET_CONFIG[k] for k in (
        "in_channels", "layers_per_block", "block_out_channels", "down_block_types", "transformer_layers_per_block",
        "cross_attention_dim", "attention_head_dim", "use_linear_projection", "addition_embed_type",
        "addition_time_embed_dim", "projection_class_embeddings_input_dim", "norm_num_groups")},
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
}
# OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder), in transformers' terms.
OPEN_CLIP_BIGG_TEXT_CONFIG: dict[str, Any] = {
    **CLIP_L_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}


# --------------------------------------------------------------------------- public API


def tiny_sd15_checkpoint(comfyui_root: Path | None = None) -> Path:
    """Path to the cached tiny SD1.5 single-file checkpoint (fp16 storage, ~465 MB), built if needed."""
    return _cached("tiny-sd15", "sd15", comfyui_root)


def tiny_sd2_checkpoint(comfyui_root: Path | None = None) -> Path:
    """Path to the cached tiny SD2.x-v single-file checkpoint (LDM keys, fp16 storage, ~400 MB).

    UNet `model.diffusion_model.*`, standard SD VAE `first_stage_model.*` (the SD1.5 fixture's
    weights), OpenCLIP text encoder `cond_stage_model.model.*` with 3 resblocks.
    """
    return _cached("tiny-sd2v", "sd2", comfyui_root, SD2_BUILDER_VERSION)


def tiny_sdxl_checkpoint(comfyui_root: Path | None = None) -> Path:
    """Path to the cached tiny SDXL single-file checkpoint (LDM keys as SDXL files carry them, fp16
    storage, ~2.2 GB: the two text encoders are full size), built if needed.

    UNet `model.diffusion_model.*` (SDXL's blocks at 320 channels), VAE `first_stage_model.*` (the
    SD1.5 fixture's weights), CLIP-L `conditioner.embedders.0.transformer.*`, OpenCLIP bigG
    `conditioner.embedders.1.model.*`.
    """
    return _cached("tiny-sdxl", "sdxl", comfyui_root, SDXL_BUILDER_VERSION)


def tiny_sdxl_controlnet(comfyui_root: Path | None = None) -> Path:
    """Path to the cached tiny SDXL ControlNet (cldm `control_model.*` keys, fp16, ~0.3 GB), built if needed."""
    return _cached("tiny-sdxl-controlnet", "sdxl-controlnet", comfyui_root, SDXL_BUILDER_VERSION)


def tiny_controlnet(comfyui_root: Path | None = None) -> Path:
    """Path to the cached tiny ControlNet (cldm `control_model.*` keys, fp16), built if needed."""
    return _cached("tiny-controlnet", "controlnet", comfyui_root)


def sd15_full_checkpoint(comfyui_root: Path | None = None) -> Path:
    """Path to an SD1.5-shaped random single-file checkpoint (860M-parameter UNet, ~2.1 GB), built if
    needed. For the benchmarks: too big and slow for the test suite."""
    return _cached("sd15-full", "sd15-full", comfyui_root)


def sd15_full_controlnet(comfyui_root: Path | None = None) -> Path:
    """Path to an SD1.5-shaped random ControlNet (cldm keys, ~0.7 GB), built if needed. For the benchmarks."""
    return _cached("controlnet-full", "controlnet-full", comfyui_root)


def _cached(stem: str, kind: str, comfyui_root: Path | None, version: str = BUILDER_VERSION) -> Path:
    final = FIXTURES_DIR / f"{stem}-v{version}.safetensors"
    if final.is_file():
        return final
    if comfyui_root is None:
        from .comfyui import provision_comfyui

        comfyui_root = provision_comfyui()
    for stale in FIXTURES_DIR.glob(f"{stem}-v*.safetensors"):
        stale.unlink()
    t0 = time.monotonic()
    with atomic_file(final) as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--build", kind,
               "--out", str(tmp), "--comfyui", str(comfyui_root)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"building {stem} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
    log.info("built %s in %.1f s", final.name, time.monotonic() - t0)
    return final


# --------------------------------------------------------------------------- builders (child process)


def _reinit_nonzero(module: Any) -> None:
    """Give zero-initialised layers (ControlNet zero convs) PyTorch's default random init."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _build_sd15(out: Path, full: bool = False) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**(SD15_UNET_CONFIG if full else TINY_UNET_CONFIG))
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**SD_VAE_CONFIG)
    torch.manual_seed(SEED + 2)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))

    sd = _ldm_unet_and_vae(unet, vae, _COMFY_SD15_UNET_CONFIG if full else _COMFY_UNET_CONFIG)
    for k, v in text.state_dict().items():
        # transformers 5.x dropped the `text_model.` level; real SD1.5 files carry it.
        if not k.startswith("text_model."):
            k = "text_model." + k
        sd["cond_stage_model.transformer." + k] = v
    return _save(sd, out, save_file)


def _ldm_unet_and_vae(unet: Any, vae: Any, comfy_config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers UNet and VAE under the LDM key names of a single-file checkpoint (ComfyUI's maps)."""
    import comfy.diffusers_convert
    import comfy.utils

    sd: dict[str, Any] = {}
    key_map = comfy.utils.unet_to_diffusers(dict(comfy_config))
    unet_sd = unet.state_dict()
    missing = sorted(set(unet_sd) - set(key_map))
    if missing:
        raise RuntimeError(f"UNet keys without an LDM name: {missing[:20]}")
    for k, v in unet_sd.items():
        sd["model.diffusion_model." + key_map[k]] = v
    for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items():
        sd["first_stage_model." + k] = v
    return sd


def _build_sd2(out: Path) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(SEED + 5)
    unet = UNet2DConditionModel(**TINY_SD2_UNET_CONFIG)
    gen = torch.Generator().manual_seed(SEED + 6)
    with torch.no_grad():
        norm1 = unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1
        norm1.bias.copy_(torch.randn(norm1.bias.shape, generator=gen) * SD2_V_NORM_BIAS_STD)
    torch.manual_seed(SEED + 1)  # the SD1.5 fixture's VAE seed: the same standard VAE weights
    vae = AutoencoderKL(**SD_VAE_CONFIG)
    torch.manual_seed(SEED + 7)
    # With projection: real SD2 files carry OpenCLIP's text_projection (unused for conditioning).
    text = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_OPEN_CLIP_TEXT_CONFIG))

    sd = _ldm_unet_and_vae(unet, vae, _COMFY_UNET_CONFIG)
    # ComfyUI's own SD2 save path (SD20.process_clip_state_dict_for_saving).
    for k, v in _open_clip_state_dict(text).items():
        sd["cond_stage_model.model." + k] = v
    last = max(int(k.split(".")[3]) for k in sd if k.startswith("model.diffusion_model.output_blocks."))
    bias = sd[f"model.diffusion_model.output_blocks.{last}.1.transformer_blocks.0.norm1.bias"]
    if not torch.std(bias.float(), unbiased=False) > 0.09:
        raise RuntimeError("the v-prediction norm bias lost its spread")
    return _save(sd, out, save_file, SD2_BUILDER_VERSION)


def _open_clip_state_dict(text: Any) -> dict[str, Any]:
    """A transformers CLIP text model (with projection) under OpenCLIP's key names, the way ComfyUI
    saves SD2 / SDXL checkpoints: resblocks, fused in_proj, transposed text_projection."""
    import comfy.diffusers_convert

    text_sd = {"transformer." + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
               for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    return comfy.diffusers_convert.convert_text_enc_state_dict_v20(text_sd)


def _build_sdxl(out: Path) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED + 20)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    torch.manual_seed(SEED + 1)  # the SD1.5 fixture's VAE seed: the same standard VAE weights
    vae = AutoencoderKL(**SD_VAE_CONFIG)
    sd = _ldm_unet_and_vae(unet, vae, _COMFY_SDXL_UNET_CONFIG)
    del unet, vae
    torch.manual_seed(SEED + 21)
    clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    for k, v in clip_l.state_dict().items():
        if not k.startswith("text_model."):
            k = "text_model." + k
        sd["conditioner.embedders.0.transformer." + k] = v
    del clip_l
    torch.manual_seed(SEED + 22)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG_TEXT_CONFIG))
    for k, v in _open_clip_state_dict(clip_g).items():
        sd["conditioner.embedders.1.model." + k] = v
    del clip_g
    return _save(sd, out, save_file, SDXL_BUILDER_VERSION)


def _build_controlnet(out: Path, full: bool = False, sdxl: bool = False) -> dict[str, Any]:
    import comfy.utils
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    torch.manual_seed(SEED + 3)
    config = TINY_SDXL_CONTROLNET_CONFIG if sdxl else SD15_CONTROLNET_CONFIG if full else TINY_CONTROLNET_CONFIG
    comfy_config = _COMFY_SDXL_UNET_CONFIG if sdxl else _COMFY_SD15_UNET_CONFIG if full else _COMFY_UNET_CONFIG
    net = ControlNetModel(**config)
    # diffusers zero-initialises these so a fresh ControlNet is a no-op; a test fixture must
    # visibly change the output instead.
    torch.manual_seed(SEED + 4)
    _reinit_nonzero(net.controlnet_down_blocks)
    _reinit_nonzero(net.controlnet_mid_block)
    _reinit_nonzero(net.controlnet_cond_embedding.conv_out)

    # Same key map as ComfyUI's own diffusers-ControlNet loader (comfy/controlnet.py), which
    # cannot be called directly because it detects the config from known full-size shapes.
    key_map = comfy.utils.unet_to_diffusers(dict(comfy_config))
    key_map["controlnet_mid_block.weight"] = "middle_block_out.0.weight"
    key_map["controlnet_mid_block.bias"] = "middle_block_out.0.bias"
    net_sd = net.state_dict()
    for i in range(len(net.controlnet_down_blocks)):
        for s in ("weight", "bias"):
            key_map[f"controlnet_down_blocks.{i}.{s}"] = f"zero_convs.{i}.0.{s}"
    n_blocks = len(net.controlnet_cond_embedding.blocks)
    for s in ("weight", "bias"):
        key_map[f"controlnet_cond_embedding.conv_in.{s}"] = f"input_hint_block.0.{s}"
        for i in range(n_blocks):
            key_map[f"controlnet_cond_embedding.blocks.{i}.{s}"] = f"input_hint_block.{(i + 1) * 2}.{s}"
        key_map[f"controlnet_cond_embedding.conv_out.{s}"] = f"input_hint_block.{(n_blocks + 1) * 2}.{s}"
    missing = sorted(set(net_sd) - set(key_map))
    if missing:
        raise RuntimeError(f"ControlNet keys without an LDM name: {missing[:20]}")
    sd = {"control_model." + key_map[k]: v for k, v in net_sd.items()}
    return _save(sd, out, save_file, SDXL_BUILDER_VERSION if sdxl else BUILDER_VERSION)


def _save(sd: dict[str, Any], out: Path, save_file: Any, version: str = BUILDER_VERSION) -> dict[str, Any]:
    import torch

    zero = [k for k, v in sd.items() if k.endswith("weight") and v.ndim > 1 and not torch.any(v)]
    if zero:
        raise RuntimeError(f"weights left all-zero: {zero[:10]}")
    # fp16 halves the file; ComfyUI on CPU and the trainer upcast to fp32 on load.
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}
    save_file(sd, str(out), metadata={"format": "pt", "builder_version": version})
    return {"tensors": len(sd), "params": sum(v.numel() for v in sd.values()), "bytes": out.stat().st_size}


def tiny_clip_folder(dest: Path, seed: int = SEED + 10) -> Path:
    """A tiny random CLIP (both towers) in transformers format under ``dest``, as the score models read it.

    config.json + model.safetensors + preprocessor_config.json (32 px) + the pack's own CLIP
    tokenizer files, so the vocabulary is CLIP's real 49408 tokens. Built in-process in about a second.
    """
    import shutil

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from .paths import REPO_ROOT

    text = {**CLIP_L_TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    vision = {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 16, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(dest))
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copyfile(REPO_ROOT / "trainer" / "assets" / "clip_tokenizer" / name, dest / name)
    return dest


def tiny_dino_folder(dest: Path, seed: int = SEED + 11) -> Path:
    """A tiny random ViT (DINO's layout: ViTModel without pooler) in transformers format under ``dest``."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(str(dest))
    return dest


def _child_build(kind: str, out: Path, comfyui_root: Path) -> int:
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(comfyui_root))
    t0 = time.monotonic()
    builders = {"sd15": _build_sd15, "sd2": _build_sd2, "sdxl": _build_sdxl, "controlnet": _build_controlnet,
                "sdxl-controlnet": lambda o: _build_controlnet(o, sdxl=True),
                "sd15-full": lambda o: _build_sd15(o, full=True), "controlnet-full": lambda o: _build_controlnet(o, full=True)}
    info = builders[kind](out)
    info["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny test models and print their paths.")
    parser.add_argument("--build", choices=["sd15", "sd2", "sdxl", "sdxl-controlnet", "controlnet", "sd15-full", "controlnet-full"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--comfyui", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        return _child_build(args.build, args.out, args.comfyui)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(tiny_sd15_checkpoint())
    print(tiny_sd2_checkpoint())
    print(tiny_controlnet())
    return 0
