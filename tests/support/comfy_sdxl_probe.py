"""Run inside a process that has ComfyUI's root on sys.path: load an SDXL checkpoint with ComfyUI's own
code and write, for one prompt and one set of size numbers, its text conditioning, pooled embedding and
the UNet's prediction on fixed inputs to a .safetensors file, for the engine's tests to compare with.

Usage: python comfy_sdxl_probe.py COMFYUI_ROOT CHECKPOINT OUT.safetensors PROMPT ORIG_H ORIG_W CROP_TOP CROP_LEFT TARGET_H TARGET_W
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    root, ckpt, out, prompt = sys.argv[1:5]
    orig_h, orig_w, crop_top, crop_left, target_h, target_w = (int(v) for v in sys.argv[5:11])
    sys.path.insert(0, root)
    from comfy.cli_args import args

    args.cpu = True  # what the test server runs with: no GPU here
    args.fp32_text_enc = True
    import comfy.sd
    import torch
    from safetensors.torch import save_file

    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    # ComfyUI's own SDXL "adm" vector: the pooled prompt and the six size numbers, embedded.
    adm = model.model.encode_adm(pooled_output=pooled, width=orig_w, height=orig_h, crop_w=crop_left, crop_h=crop_top,
                                 target_width=target_w, target_height=target_h)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, target_h // 8, target_w // 8, generator=gen)
    timesteps = torch.tensor([500.0])
    with torch.no_grad():
        prediction = model.model.diffusion_model(latents, timesteps=timesteps, context=cond, y=adm)
    save_file({"cond": cond.contiguous(), "pooled": pooled.contiguous(), "latents": latents,
               "timesteps": timesteps, "prediction": prediction.contiguous()}, out)
    json.dump({"model_type": type(model.model).__name__,
               "model_config": type(model.model.model_config).__name__}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
