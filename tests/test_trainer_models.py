"""Base-model loading: family detection, safe .ckpt reading, diffusers folders, offline only."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from comfyui_dreambooth_lora.trainer import models
from comfyui_dreambooth_lora.trainer.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SD1_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}


SDXL_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
}


def test_detect_family_sd1_sd2_sdxl_and_clear_errors_for_others() -> None:
    assert models.detect_family(SD1_KEYS) == "sd1"
    sd2 = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    }
    assert models.detect_family(sd2) == "sd2"
    assert models.detect_family(SDXL_KEYS) == "sdxl"
    refiner = {k: v for k, v in SDXL_KEYS.items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ConfigError, match="SDXL refiner; DreamBooth needs the SDXL base model with both text encoders"):
        models.detect_family(refiner)
    unet_only = {k: v for k, v in SDXL_KEYS.items() if not k.startswith("conditioner.")}
    with pytest.raises(ConfigError, match="SDXL file without its text encoders"):
        models.detect_family(unet_only)
    with pytest.raises(ConfigError, match="EDM-schedule SDXL models"):
        models.detect_prediction_type({"edm_mean": torch.zeros(4), **dict.fromkeys(SDXL_KEYS)}, "sdxl")
    assert models.detect_prediction_type({"v_pred": torch.zeros(()), **dict.fromkeys(SDXL_KEYS)}, "sdxl") == "v_prediction"
    assert models.detect_prediction_type(dict.fromkeys(SDXL_KEYS), "sdxl") == "epsilon"
    with pytest.raises(ConfigError, match="no Stable Diffusion UNet"):
        models.detect_family({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)})


def test_sd2_768_v_models_are_detected_as_v_prediction() -> None:
    key = models.UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    conv_in = torch.zeros(320, 4, 3, 3)
    gen = torch.Generator().manual_seed(0)
    v_model = {models.UNET_PREFIX + "input_blocks.0.0.weight": conv_in, key: torch.randn(320, generator=gen) * 0.5}
    eps_model = {models.UNET_PREFIX + "input_blocks.0.0.weight": conv_in, key: torch.randn(320, generator=gen) * 0.01}
    assert models.detect_prediction_type(v_model, "sd2") == "v_prediction"
    assert models.detect_prediction_type(eps_model, "sd2") == "epsilon"
    assert models.detect_prediction_type(v_model, "sd1") == "epsilon"


def test_tiny_checkpoint_loads_with_shapes_read_from_the_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = models.load_base_model(str(tiny_checkpoint), cache_dir=tmp_path)
    assert base.family == "sd1" and base.prediction_type == "epsilon"
    assert base.unet.config.block_out_channels == (320,) or list(base.unet.config.block_out_channels) == [320]
    assert base.unet.config.cross_attention_dim == 768
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in base.unet.parameters())
    ids = base.tokenizers[0](["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0].item() == 49406  # CLIP's start token, not a fallback id
    with torch.no_grad():
        assert torch.isfinite(base.text_encoders[0](ids)[0]).all()
    assert (tmp_path / "model_hashes.json").is_file(), "the file hash is memoised"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_vae_without_decoder_has_the_same_encoder_and_reads_no_decoder_weight(tiny_checkpoint: Path) -> None:
    source = models.ModelSource(str(tiny_checkpoint))
    full, encoder_only = source.vae(decoder=True), source.vae(decoder=False)
    assert not hasattr(encoder_only, "decoder") and not hasattr(encoder_only, "post_quant_conv")
    kept = encoder_only.state_dict()
    assert kept and all(not v.is_meta for v in kept.values()), "no placeholder left in the model"
    reference = full.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in kept.items())
    assert channels_last_convs(source.unet(channels_last=True)) and not channels_last_convs(source.unet())


def _same_weights(direct: torch.nn.Module, widened: torch.nn.Module, dtype: torch.dtype) -> None:
    mine, theirs = direct.state_dict(), widened.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    assert all(p.dtype == dtype for p in direct.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_components_read_in_the_run_dtype_equal_the_fp32_ones_cast(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    """A LoRA training in half precision reads the frozen UNet and text encoders straight in that dtype
    (never widened to fp32 first): the very weights a cast of the fp32 load gives."""
    source = models.ModelSource(str(tiny_checkpoint))
    _same_weights(source.unet(dtype=dtype), source.unet().to(dtype), dtype)
    for direct, widened in zip(source.text_encoders(dtype=dtype), source.text_encoders(), strict=True):
        _same_weights(direct, widened.to(dtype), dtype)
    unet = source.unet(channels_last=True, dtype=dtype)
    assert channels_last_convs(unet) and all(p.dtype == dtype for p in unet.parameters())
    # Reading in one dtype leaves the file's default for the next component: the VAE stays fp32.
    assert all(p.dtype == torch.float32 for p in source.vae().parameters())


def channels_last_convs(unet: torch.nn.Module) -> bool:
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    return bool(convs) and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                               for w in convs)


def test_ckpt_is_read_weights_only_and_pickled_code_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(2)}}, good)
    assert torch.equal(models.read_state_dict(good)["model.diffusion_model.x"], torch.ones(2))

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # noqa: ANN204
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.ckpt"
    with bad.open("wb") as fh:
        pickle.dump({"state_dict": Exploit()}, fh)
    with pytest.raises(ConfigError, match="only tensors are loaded|Only tensors are loaded"):
        models.read_state_dict(bad)
    assert not marker.exists()


def test_diffusers_folder_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = models.load_base_model(str(tiny_checkpoint))
    folder = tmp_path / "tiny diffusers"
    base.unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    base.text_encoders[0].save_pretrained(folder / "text_encoder")
    again = models.load_base_model(str(folder))
    assert again.family == "sd1"
    for a, b in zip(base.unet.parameters(), again.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    half = models.ModelSource(str(folder))
    _same_weights(half.unet(dtype=torch.float16), base.unet.half(), torch.float16)
    _same_weights(half.text_encoders(dtype=torch.float16)[0], base.text_encoders[0].half(), torch.float16)
    with pytest.raises(ConfigError, match="not a diffusers model folder"):
        models.load_base_model(str(tmp_path))


def test_missing_model_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        models.load_base_model(str(tmp_path / "nope.safetensors"))
    assert info.value.key == "pretrained_model" and "does not exist" in str(info.value)


def test_trainer_imports_nothing_from_comfyui() -> None:
    forbidden = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "nodes",
                 "node_helpers", "execution", "latent_preview"}
    offenders = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not offenders
