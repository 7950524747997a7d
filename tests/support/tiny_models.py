"""Tiny, random, deterministic SD1.5 models that a real ComfyUI accepts, built at test time.

ComfyUI recognises SD1.5 from tensor shapes: model_channels 320 and context_dim 768 are what
matter, depth is free. So the UNet here has one level (channel_mult [1]) with one res block and
one transformer, while the text encoder (full CLIP-L) and the VAE (full SD VAE) keep their real
sizes because ComfyUI builds those from fixed configs.

The models are created with diffusers / transformers (their own initialisers, so no weight is
left zero or uninitialised: a zero output conv would make every LoRA gradient zero) and
converted to the original LDM key layout with ComfyUI's own converters. That conversion runs in
a child process with the ComfyUI root on sys.path, so the pytest process never imports ComfyUI.

Files are cached under CACHE_DIR/fixtures/, keyed by BUILDER_VERSION; bump it whenever the
output of a builder changes. Run this file to build both: `python tests/support/tiny_models.py`.
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

FIXTURES_DIR = CACHE_DIR / "fixtures"


# --------------------------------------------------------------------------- public API


def tiny_sd15_checkpoint(comfyui_root: Path | None = None) -> Path:
    """Path to the cached tiny SD1.5 single-file checkpoint (fp16 storage, ~465 MB), built if needed."""
    return _cached("tiny-sd15", "sd15", comfyui_root)


def tiny_controlnet(comfyui_root: Path | None = None) -> Path:
    """Path to the cached tiny ControlNet (cldm `control_model.*` keys, fp16), built if needed."""
    return _cached("tiny-controlnet", "controlnet", comfyui_root)


def _cached(stem: str, kind: str, comfyui_root: Path | None) -> Path:
    final = FIXTURES_DIR / f"{stem}-v{BUILDER_VERSION}.safetensors"
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


def _build_sd15(out: Path) -> dict[str, Any]:
    import comfy.diffusers_convert
    import comfy.utils
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**SD_VAE_CONFIG)
    torch.manual_seed(SEED + 2)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))

    sd: dict[str, Any] = {}
    key_map = comfy.utils.unet_to_diffusers(dict(_COMFY_UNET_CONFIG))
    unet_sd = unet.state_dict()
    missing = sorted(set(unet_sd) - set(key_map))
    if missing:
        raise RuntimeError(f"UNet keys without an LDM name: {missing[:20]}")
    for k, v in unet_sd.items():
        sd["model.diffusion_model." + key_map[k]] = v
    for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items():
        sd["first_stage_model." + k] = v
    for k, v in text.state_dict().items():
        # transformers 5.x dropped the `text_model.` level; real SD1.5 files carry it.
        if not k.startswith("text_model."):
            k = "text_model." + k
        sd["cond_stage_model.transformer." + k] = v
    return _save(sd, out, save_file)


def _build_controlnet(out: Path) -> dict[str, Any]:
    import comfy.utils
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    torch.manual_seed(SEED + 3)
    net = ControlNetModel(**TINY_CONTROLNET_CONFIG)
    # diffusers zero-initialises these so a fresh ControlNet is a no-op; a test fixture must
    # visibly change the output instead.
    torch.manual_seed(SEED + 4)
    _reinit_nonzero(net.controlnet_down_blocks)
    _reinit_nonzero(net.controlnet_mid_block)
    _reinit_nonzero(net.controlnet_cond_embedding.conv_out)

    # Same key map as ComfyUI's own diffusers-ControlNet loader (comfy/controlnet.py), which
    # cannot be called directly because it detects the config from known full-size shapes.
    key_map = comfy.utils.unet_to_diffusers(dict(_COMFY_UNET_CONFIG))
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
    return _save(sd, out, save_file)


def _save(sd: dict[str, Any], out: Path, save_file: Any) -> dict[str, Any]:
    import torch

    zero = [k for k, v in sd.items() if k.endswith("weight") and v.ndim > 1 and not torch.any(v)]
    if zero:
        raise RuntimeError(f"weights left all-zero: {zero[:10]}")
    # fp16 halves the file; ComfyUI on CPU and the trainer upcast to fp32 on load.
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}
    save_file(sd, str(out), metadata={"format": "pt", "builder_version": BUILDER_VERSION})
    return {"tensors": len(sd), "params": sum(v.numel() for v in sd.values()), "bytes": out.stat().st_size}


def _child_build(kind: str, out: Path, comfyui_root: Path) -> int:
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(comfyui_root))
    t0 = time.monotonic()
    info = {"sd15": _build_sd15, "controlnet": _build_controlnet}[kind](out)
    info["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny test models and print their paths.")
    parser.add_argument("--build", choices=["sd15", "controlnet"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--comfyui", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        return _child_build(args.build, args.out, args.comfyui)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(tiny_sd15_checkpoint())
    print(tiny_controlnet())
    return 0
