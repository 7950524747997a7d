"""Run inside a process that has ComfyUI's root on sys.path: load a checkpoint and a LoRA with
ComfyUI's own loader code and report, as JSON on stdout, what it patched and what it dropped.

Usage: python comfy_lora_probe.py COMFYUI_ROOT CHECKPOINT LORA
"""

from __future__ import annotations

import json
import logging
import sys


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> int:
    root, ckpt, lora_path = sys.argv[1:4]
    sys.path.insert(0, root)
    from comfy.cli_args import args

    args.cpu = True  # what the test server runs with: no GPU here
    args.fp32_text_enc = True
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils

    collector = _Collect()
    logging.getLogger().addHandler(collector)
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    modules = sorted({k.split(".")[0] for k in lora})
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    unet_patched = model.clone().add_patches(loaded, 1.0)
    clip_patched = clip.clone().add_patches(loaded, 1.0)
    json.dump({
        "model_type": type(model.model).__name__,
        "lora_modules": modules,
        "patches": len(loaded),
        "unet_patched": len(unet_patched),
        "clip_patched": len(clip_patched),
        "warnings": collector.messages,
    }, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
