"""SDXL in the engine, on the tiny SDXL checkpoint (SDXL's blocks at 320 channels, both text encoders at
their real sizes): loading checked against ComfyUI's own code, training with both text-encoder LoRAs,
and the exported LoRA in ComfyUI's native loader and in diffusers' SDXL pipeline."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_dreambooth_lora.trainer import families, lora, protocol
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from comfyui_dreambooth_lora.trainer.models import ModelSource
from comfyui_dreambooth_lora.trainer.prompts import encode_prompts, size_ids, token_ids, unet_kwargs
from comfyui_dreambooth_lora.trainer.run import RunResult, train
from dreambooth_test_support.paths import DREAMBENCH_DIR
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SUPPORT = Path(__file__).resolve().parent / "support"
PROMPT = "a photo of qzx dog on a beach"
# A portrait photo (768x1024) cut to a 64x64 target 16 px below its top: every size number differs.
SIZES = (1024, 768, 16, 0, 64, 64)


def _probe(script: str, comfyui_root: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SUPPORT / script), str(comfyui_root), *args],
                          capture_output=True, text=True, timeout=600, check=False, cwd=comfyui_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.comfy  # ComfyUI's own loader and SDXL conditioning code, in a child process
def test_conditioning_and_unet_match_comfyui(tiny_sdxl_checkpoint: Path, comfyui_root: Path, tmp_path: Path) -> None:
    ref_file = tmp_path / "comfy.safetensors"
    report = _probe("comfy_sdxl_probe.py", comfyui_root, str(tiny_sdxl_checkpoint), str(ref_file), PROMPT,
                    *map(str, SIZES))
    assert report == {"model_type": "SDXL", "model_config": "SDXL"}, "ComfyUI detects the fixture as SDXL"
    ref = load_file(str(ref_file))

    source = ModelSource(str(tiny_sdxl_checkpoint))
    assert source.family == "sdxl" and source.prediction_type == "epsilon"
    encoders = source.text_encoders()
    assert [type(e).__name__ for e in encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert encoders[1].config.num_hidden_layers == 32, "bigG keeps its last layer: the pooled embedding needs it"
    ids = token_ids(source.tokenizers(), PROMPT)
    assert ids[0][-1].item() == 49407 and ids[1][-1].item() == 0, "CLIP-L pads with its end token, bigG with '!'"
    with torch.no_grad():
        cond = encode_prompts(source.spec, encoders, [i[None] for i in ids])
        assert cond.pooled is not None
        torch.testing.assert_close(cond.hidden, ref["cond"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cond.pooled, ref["pooled"], atol=1e-4, rtol=1e-4)
        unet = source.unet()
        time_ids = size_ids(SIZES[0:2], SIZES[2:4], SIZES[4:6])[None]
        prediction = unet(ref["latents"], ref["timesteps"], **unet_kwargs(source.spec, cond, time_ids)).sample
        torch.testing.assert_close(prediction, ref["prediction"], atol=1e-4, rtol=1e-4)
        # The size numbers reach the UNet: another crop is another prediction.
        moved = unet(ref["latents"], ref["timesteps"],
                     **unet_kwargs(source.spec, cond, size_ids((1024, 768), (0, 0), (64, 64))[None])).sample
    assert (moved - prediction).abs().max() > 1e-3
    vae = source.vae(decoder=False)
    assert vae.config.scaling_factor == families.SDXL.vae_scaling == 0.13025


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, list[dict]]:
    """Two steps of UNet + both text-encoder LoRAs on every module kind, with a learning rate high enough
    to make the LoRA's effect visible, and a validation sample at the end (diffusers' SDXL pipeline)."""
    out = tmp_path_factory.mktemp("sdxl run")
    cfg = TrainConfig.from_dict({
        "pretrained_model": str(tiny_sdxl_checkpoint), "instance_data_dir": str(DREAMBENCH_DIR / "dog"),
        "instance_prompt": "a photo of qzx dog", "output_dir": str(out), "resolution": 64,
        "max_train_steps": 2, "rank": 4, "alpha": 8, "unet_target": "full", "train_text_encoder": True,
        "text_encoder_target": "attn_mlp", "learning_rate": 2e-2, "text_encoder_lr": 2e-2,
        "cache_dir": str(out / "cache"), "validation_prompts": ["a photo of qzx dog"],
        "validation_inference_steps": 2,
    })
    stream = io.StringIO()
    result = train(cfg, protocol.EventWriter(stream), protocol.Commands())
    return result, [json.loads(line) for line in stream.getvalue().splitlines()]


def _modules(path: Path) -> dict[str, set[str]]:
    names = {k.split(".")[0] for k in load_file(str(path))}
    return {prefix: {n for n in names if n.startswith(prefix + "_")} for prefix in ("lora_unet", "lora_te1", "lora_te2")}


@pytest.mark.slow  # a 2-step SDXL training with both text encoders: main leg only
def test_sdxl_lora_has_both_text_encoders_in_kohya_layout(sdxl_run: tuple[RunResult, list[dict]]) -> None:
    result, events = sdxl_run
    assert result.status == "done" and result.lora_path is not None
    losses = [e["loss"] for e in events if e["type"] == "metrics"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    modules = _modules(result.lora_path)
    # 6 text-encoder layer types (q, k, v, out, fc1, fc2) in every layer: CLIP-L has 12, bigG 32.
    assert len(modules["lora_te1"]) == 12 * 6 and len(modules["lora_te2"]) == 32 * 6
    assert all(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules["lora_te2"])
    assert any("label_emb" not in m and "conv1" in m for m in modules["lora_unet"])
    (sample,) = [e for e in events if e["type"] == "sample"]
    with Image.open(sample["path"]) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1.0, "a real 64 px image, not a blank or NaN one"
    tensors = load_file(str(result.lora_path))
    assert torch.all(tensors[next(iter(modules["lora_te2"])) + ".alpha"] == 8)
    with safe_open(str(result.lora_path), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


@pytest.mark.slow
@pytest.mark.comfy  # ComfyUI's own loader code, in a child process
def test_comfyui_native_loader_patches_every_module(sdxl_run: tuple[RunResult, list[dict]], tiny_sdxl_checkpoint: Path,
                                                   comfyui_root: Path) -> None:
    path = sdxl_run[0].lora_path
    assert path is not None
    report = _probe("comfy_lora_probe.py", comfyui_root, str(tiny_sdxl_checkpoint), str(path))
    modules = _modules(path)
    assert report["model_type"] == "SDXL"
    assert not [w for w in report["warnings"] if "lora key not loaded" in w], report["warnings"][:5]
    assert report["unet_patched"] == len(modules["lora_unet"])
    assert report["clip_patched"] == len(modules["lora_te1"]) + len(modules["lora_te2"])
    assert report["patches"] == sum(len(m) for m in modules.values())


@pytest.mark.slow  # a 2-step SDXL training with both text encoders: main leg only
def test_diffusers_sdxl_pipeline_loads_every_module(sdxl_run: tuple[RunResult, list[dict]],
                                                    tiny_sdxl_checkpoint: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    path = sdxl_run[0].lora_path
    assert path is not None
    source = ModelSource(str(tiny_sdxl_checkpoint))
    first, second = source.text_encoders()
    tokenizers = source.tokenizers()
    pipe = StableDiffusionXLPipeline(vae=source.vae(), text_encoder=first, text_encoder_2=second, unet=source.unet(),
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
                                     scheduler=source.noise_scheduler())
    ids = [i[None] for i in token_ids(tokenizers, "a photo of qzx dog")]
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([400])
    time_ids = size_ids((64, 64), (0, 0), (64, 64))[None]

    def predict() -> torch.Tensor:
        with torch.no_grad():
            cond = encode_prompts(families.SDXL, [pipe.text_encoder, pipe.text_encoder_2], ids)
            return pipe.unet(latents, t, **unet_kwargs(families.SDXL, cond, time_ids)).sample

    before = predict()
    pipe.load_lora_weights(str(path))
    modules = _modules(path)
    for model, prefix in ((pipe.unet, "lora_unet"), (pipe.text_encoder, "lora_te1"), (pipe.text_encoder_2, "lora_te2")):
        assert sum(isinstance(m, LoraLayer) for m in model.modules()) == len(modules[prefix]), prefix
    assert (predict() - before).abs().mean() > 1e-3, "the LoRA changes the prediction"


def test_an_fp16_sdxl_diffusers_folder_loads_like_the_single_file(tiny_sdxl_checkpoint: Path, tmp_path: Path) -> None:
    single = ModelSource(str(tiny_sdxl_checkpoint))
    folder = tmp_path / "tiny sdxl diffusers"
    parts = {"unet": single.unet(), "vae": single.vae(), "text_encoder": single.text_encoders()[0],
             "text_encoder_2": single.text_encoders()[1]}
    for name, module in parts.items():  # fp16, as SDXL folders are usually shared
        module.half().save_pretrained(folder / name)
    (folder / "text_encoder_2").rename(folder / "hidden")
    with pytest.raises(ConfigError, match="SDXL folder without text_encoder_2/"):
        ModelSource(str(folder))
    (folder / "hidden").rename(folder / "text_encoder_2")
    source = ModelSource(str(folder))
    assert source.family == "sdxl"
    encoders, unet = source.text_encoders(), source.unet()
    assert all(p.dtype == torch.float32 for m in (*encoders, unet) for p in m.parameters()), "fp32 on load"
    assert source.vae().config.scaling_factor == 0.13025
    ids = [i[None] for i in token_ids(source.tokenizers(), PROMPT)]
    with torch.no_grad():
        cond = encode_prompts(source.spec, encoders, ids)
        expected = encode_prompts(single.spec, [parts["text_encoder"].float(), parts["text_encoder_2"].float()], ids)
    # The folder holds the single file's weights rounded to fp16: the same conditioning up to that rounding.
    torch.testing.assert_close(cond.hidden, expected.hidden, atol=0, rtol=0)
    assert cond.pooled is not None and expected.pooled is not None
    torch.testing.assert_close(cond.pooled, expected.pooled, atol=0, rtol=0)


def test_family_mismatches_are_clear_errors(tmp_path: Path) -> None:
    sd1_lora = tmp_path / "sd1 lora.safetensors"
    layer = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{layer}.lora_down.weight": torch.zeros(4, 768), f"{layer}.lora_up.weight": torch.zeros(768, 4)},
              str(sd1_lora))
    config = TrainConfig.from_dict({"pretrained_model": "/m.safetensors", "instance_data_dir": "/p",
                                    "instance_prompt": "a photo of qzx dog", "output_dir": str(tmp_path),
                                    "train_text_encoder": True})
    with pytest.raises(ConfigError, match="is an SD1.x/SD2.x LoRA .one text encoder., and the base model is SDXL"):
        lora.check_init_lora(lora.open_init_lora(sd1_lora), config, families.SDXL)
    with pytest.raises(ConfigError) as same_family:  # other problems (no UNet layers), but not the family
        lora.check_init_lora(lora.open_init_lora(sd1_lora), config, families.SD1)
    assert "base model is" not in str(same_family.value)
    from comfyui_dreambooth_lora.trainer import full_finetune

    with pytest.raises(ConfigError, match="full fine-tune of SDXL is not supported"):
        full_finetune.check_source("/m.safetensors", "sdxl", train_text_encoder=False)


def test_size_numbers_come_from_each_sample_s_real_crop(tiny_sdxl_checkpoint: Path, tmp_path: Path) -> None:
    """A portrait and a landscape photo with aspect buckets: each micro-batch's SDXL size numbers are its
    photo's original size, its crop's top-left corner in the resized photo and its bucket."""
    from comfyui_dreambooth_lora.trainer.run import TrainingRun

    photos = tmp_path / "photos"
    photos.mkdir()
    dog = sorted((DREAMBENCH_DIR / "dog").glob("*.jpg"))[0]
    with Image.open(dog) as img:
        img.convert("RGB").resize((300, 400)).save(photos / "portrait.png")
        img.convert("RGB").resize((400, 300)).save(photos / "landscape.png")
    cfg = TrainConfig.from_dict({
        "pretrained_model": str(tiny_sdxl_checkpoint), "instance_data_dir": str(photos),
        "instance_prompt": "a photo of qzx dog", "output_dir": str(tmp_path / "run"), "resolution": 64,
        "max_train_steps": 1, "rank": 4, "alpha": 4, "train_text_encoder": False, "aspect_buckets": True,
        "crop": "random", "cache_dir": str(tmp_path / "cache"),
    })
    run = TrainingRun(cfg, protocol.EventWriter(io.StringIO()), protocol.Commands())
    run.prepare()
    seen = {}
    for micro in range(4):
        latents, _prompts, geometry = run._batch(micro)
        ids = run._size_ids(geometry)
        assert ids is not None and ids.shape == (1, 6)
        g = geometry[0]
        assert ids[0].tolist() == [*g.original_size, *g.crop_top_left, *g.target_size]
        assert tuple(latents.shape[-2:]) == (g.target_size[0] // 8, g.target_size[1] // 8)
        seen[g.original_size] = g
    assert set(seen) == {(400, 300), (300, 400)}, "both photos, at their own (height, width)"
    portrait, landscape = seen[(400, 300)], seen[(300, 400)]
    assert portrait.target_size[0] > portrait.target_size[1] and landscape.target_size[0] < landscape.target_size[1]
    loss, _, _ = run.loss_for_micro_batch(0)
    assert torch.isfinite(loss)
