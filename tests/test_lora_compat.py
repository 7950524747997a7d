"""The exported LoRA loads fully where users load LoRAs: ComfyUI's native loader and diffusers."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfyui_dreambooth_lora.trainer import protocol
from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.models import load_base_model
from comfyui_dreambooth_lora.trainer.run import train
from dreambooth_test_support.paths import DREAMBENCH_DIR
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "support" / "comfy_lora_probe.py"
DREAMBENCH = DREAMBENCH_DIR


@pytest.fixture(scope="module")
def trained_lora(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on every module type we can train: UNet attention, feed-forward, resnet convs and
    text-encoder attention + MLP. A high learning rate makes its effect visible in 8-bit images."""
    out = tmp_path_factory.mktemp("compat run")
    cfg = TrainConfig.from_dict({
        "pretrained_model": str(tiny_checkpoint), "instance_data_dir": str(DREAMBENCH / "dog"),
        "instance_prompt": "a photo of qzx dog", "output_dir": str(out), "resolution": 64,
        "max_train_steps": 2, "rank": 4, "alpha": 8, "unet_target": "full", "train_text_encoder": True,
        "text_encoder_target": "attn_mlp", "learning_rate": 2e-2, "text_encoder_lr": 2e-2,
    })
    result = train(cfg, protocol.EventWriter(io.StringIO()), protocol.Commands())
    return result.lora_path


def lora_modules(path: Path) -> tuple[set[str], set[str]]:
    modules = {k.split(".")[0] for k in load_file(str(path))}
    return {m for m in modules if m.startswith("lora_unet_")}, {m for m in modules if m.startswith("lora_te_")}


@pytest.mark.comfy  # ComfyUI's own loader code, in a child process
def test_every_module_is_patched_by_comfyui_loader(trained_lora: Path, tiny_checkpoint: Path,
                                                   comfyui_root: Path) -> None:
    proc = subprocess.run([sys.executable, str(PROBE), str(comfyui_root), str(tiny_checkpoint), str(trained_lora)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=comfyui_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    unet, te = lora_modules(trained_lora)
    assert report["model_type"] == "BaseModel"
    assert any("conv1" in m for m in unet) and any("mlp_fc1" in m for m in te), "fixture covers all module kinds"
    assert not [w for w in report["warnings"] if "lora key not loaded" in w], report["warnings"]
    assert report["patches"] == len(unet) + len(te)
    assert report["unet_patched"] == len(unet)
    assert report["clip_patched"] == len(te)


def _txt2img(lora: str | None, strength_model: float, strength_clip: float, prefix: str) -> dict:
    model, clip = ["1", 0], ["1", 1]
    prompt: dict = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}}}
    if lora:
        prompt["2"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                             "strength_model": strength_model,
                                                             "strength_clip": strength_clip}}
        model, clip = ["2", 0], ["2", 1]
    prompt.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a photo of qzx dog"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 3, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    })
    return prompt


def _image(server, prompt: dict) -> torch.Tensor:
    result = server.run_prompt(prompt)
    result.raise_for_status()
    files = server.output_files(result, "8")
    assert len(files) == 1
    with Image.open(files[0]) as img:
        return torch.tensor(list(img.convert("RGB").getdata()), dtype=torch.float32)


def test_native_lora_loader_in_a_real_server_applies_it(trained_lora: Path, comfy_server) -> None:
    loras = Path(comfy_server.models_dir) / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained_lora, loras / "compat-test.safetensors")
    plain = _image(comfy_server, _txt2img(None, 0, 0, "compat_plain"))
    with_lora = _image(comfy_server, _txt2img("compat-test.safetensors", 1.0, 1.0, "compat_lora"))
    unet_only = _image(comfy_server, _txt2img("compat-test.safetensors", 1.0, 0.0, "compat_unet"))
    assert (with_lora - plain).abs().mean() > 0.5
    assert (with_lora - unet_only).abs().mean() > 0.1, "the text-encoder half changes the image too"
    assert "lora key not loaded" not in comfy_server.log_text()


def test_diffusers_load_lora_weights_patches_every_module(trained_lora: Path, tiny_checkpoint: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    base = load_base_model(str(tiny_checkpoint))
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                   unet=base.unet, scheduler=base.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    ids = base.tokenizers[0](["a photo of qzx dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        before = pipe.unet(latents, t, pipe.text_encoder(ids)[0]).sample
    pipe.load_lora_weights(str(trained_lora.parent), weight_name=trained_lora.name, adapter_name="subject")
    unet, te = lora_modules(trained_lora)
    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == len(unet)
    assert sum(isinstance(m, LoraLayer) for m in pipe.text_encoder.modules()) == len(te)
    with torch.no_grad():
        after = pipe.unet(latents, t, pipe.text_encoder(ids)[0]).sample
    assert (after - before).abs().mean() > 1e-3
