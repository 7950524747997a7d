"""The "diffusers way" peer: a plain DreamBooth-LoRA loop shaped like diffusers' example script.

Per step it does what ``examples/dreambooth/train_dreambooth_lora.py`` does with its defaults
(no pre-computed text embeddings, no latent cache, DataLoader with ``num_workers=0``):

- the dataset opens the photo, applies Resize/CenterCrop/ToTensor/Normalize and tokenizes the
  prompt in ``__getitem__``;
- the image batch is VAE-encoded and the prompt CLIP-encoded on every step;
- UNet LoRA on to_q/k/v/out.0 (``unet.add_adapter``), optional text-encoder LoRA on
  q/k/v/out_proj, gaussian init, lora_alpha = rank;
- AdamW, MSE on epsilon, grad-norm clipping at 1.0, a constant LR scheduler;
- the LoRA is saved with ``save_lora_weights`` at the end.

The base model is loaded with the pack's own ``trainer/models.py`` (same tiny checkpoint, same
offline loader), so comparing this loop with the pack's trainer compares the loops, not loading.

Events are JSON lines on stdout: ``loaded``, ``progress`` {step, total}, ``done`` {first_step_s,
total_s, ms_per_step}. ``--t0`` is the launcher's wall clock at process start; times are relative
to it (to the start of this script when it is not given).

    python benchmarks/diffusers_loop.py --pretrained CKPT --data-dir PHOTOS --steps 20 [--train-text-encoder]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bench_loader import load_by_path

_SCRIPT_START = time.time()
REPO = Path(__file__).resolve().parents[1]
TRAINER_PACKAGE = "dreambooth_bench_trainer"
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def import_trainer() -> ModuleType:
    """The pack's ``trainer/`` as a package under a private name (the repo root stays off sys.path)."""
    return load_by_path(TRAINER_PACKAGE, REPO / "trainer" / "__init__.py", package=True)


def emit(t0: float, type_: str, **payload: Any) -> None:
    print(json.dumps({"type": type_, "t": round(time.time() - t0, 4), **payload}), flush=True)


class DreamBoothDataset:
    """The example script's instance-only dataset: every item re-reads and re-transforms its photo."""

    def __init__(self, folder: Path, prompt: str, tokenizer: Any, size: int) -> None:
        from torchvision import transforms

        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SystemExit(f"no images in {folder}")
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.transforms = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image
        from PIL.ImageOps import exif_transpose

        image = exif_transpose(Image.open(self.paths[index % len(self.paths)]))
        if image.mode != "RGB":
            image = image.convert("RGB")
        ids = self.tokenizer(self.prompt, truncation=True, padding="max_length",
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return {"pixel_values": self.transforms(image), "input_ids": ids}


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),
            "input_ids": torch.cat([e["input_ids"] for e in examples])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", type=Path, required=True, help="single-file SD1.x checkpoint")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of instance photos")
    parser.add_argument("--prompt", default="a photo of sks dog")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="folder for the LoRA (default: no save)")
    parser.add_argument("--t0", type=float, default=None, help="launcher's time.time() at process start")
    args = parser.parse_args(argv)
    t0 = args.t0 if args.t0 is not None else _SCRIPT_START

    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    trainer = import_trainer()
    models = importlib.import_module(f"{trainer.__name__}.models")
    torch.manual_seed(args.seed)
    base = models.load_base_model(str(args.pretrained))
    tokenizer, text_encoder, unet, vae = base.tokenizers[0], base.text_encoders[0], base.unet, base.vae
    noise_scheduler = base.noise_scheduler
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)

    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    if args.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                            target_modules=TEXT_ENCODER_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    if args.train_text_encoder:
        params += [p for p in text_encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=args.steps)
    dataset = DreamBoothDataset(args.data_dir, args.prompt, tokenizer, args.resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=collate, num_workers=0)
    unet.train()
    if args.train_text_encoder:
        text_encoder.train()
    emit(t0, "loaded")

    step, first_step_at = 0, None
    started = time.time()
    while step < args.steps:
        for batch in loader:
            model_input = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],)).long()
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step += 1
            if first_step_at is None:
                first_step_at = time.time()
            emit(t0, "progress", step=step, total=args.steps, loss=round(loss.item(), 5))
            if step >= args.steps:
                break
    ended = time.time()

    if args.output is not None:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        te_layers = (convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
                     if args.train_text_encoder else None)
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            args.output, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            text_encoder_lora_layers=te_layers)
    assert first_step_at is not None
    per_step = 1000 * (ended - first_step_at) / (step - 1) if step > 1 else 1000 * (ended - started)
    emit(t0, "done", steps=step, first_step_s=round(first_step_at - t0, 3), total_s=round(time.time() - t0, 3),
         ms_per_step=round(per_step, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
