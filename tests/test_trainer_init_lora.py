"""Starting a training from an existing LoRA (config ``init_lora``): the weights it starts from, every
way a file can fail to fit (each a config error naming init_lora and the fix), resume winning over the
file, and the training identity holding the file's content, not its name.

Runs train the tiny SD1.5 checkpoint in-process for a step or three at 64 px.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_dreambooth_lora.trainer import identity, lora, protocol
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from comfyui_dreambooth_lora.trainer.run import train
from dreambooth_test_support.training import copy_dog_photos, make_config, run_events
from safetensors.torch import load_file, save_file

# The LoRA every run here starts from: UNet and text encoder, rank 4, alpha 2, trained from seed 5 so
# that even its down weights differ from what a zero-start run with seed 0 draws.
SEED_SETTINGS: dict[str, Any] = {"train_text_encoder": True, "rank": 4, "alpha": 2, "learning_rate": 1e-3,
                                 "text_encoder_lr": 1e-3, "seed": 5}
# Barely moving: one step at this rate leaves the weights where they started (within 1e-5).
STILL = {"learning_rate": 1e-7, "text_encoder_lr": 1e-7, "max_train_steps": 1}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_dog_photos(tmp_path_factory.mktemp("dog photos"))


@pytest.fixture(scope="module")
def seed_lora(tiny_checkpoint: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seed run")
    result, _ = run_events(make_config(tiny_checkpoint, photos, out / "run", **SEED_SETTINGS))
    return result.lora_path




def statuses(events: list[dict[str, Any]], level: str | None = None) -> list[str]:
    return [e["message"] for e in events if e["type"] == "status" and level in (None, e["level"])]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def config_error(config: TrainConfig) -> str:
    with pytest.raises(ConfigError) as caught:
        train(config, protocol.EventWriter(None), protocol.Commands())
    assert caught.value.key == "init_lora"
    return str(caught.value)


# --- the weights a run starts from ---------------------------------------------------------------
def test_a_run_starts_from_the_init_lora_weights(tiny_checkpoint: Path, photos: Path, seed_lora: Path,
                                                 tmp_path: Path) -> None:
    start = load_file(str(seed_lora))
    assert any(k.endswith("lora_up.weight") and start[k].abs().max() > 1e-4 for k in start), "a trained seed"
    settings = {**SEED_SETTINGS, **STILL, "seed": 0}
    result, events = run_events(make_config(tiny_checkpoint, photos, tmp_path / "from seed",
                                            init_lora=str(seed_lora), **settings))
    assert max_difference(load_file(str(result.lora_path)), start) < 1e-5
    unet_layers = sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in start)
    te_layers = sum(k.startswith("lora_te_") and k.endswith(".alpha") for k in start)
    assert f"starting from LoRA {seed_lora.name} ({unet_layers} UNet + {te_layers} text-encoder modules, " \
           "rank 4)" in statuses(events)
    zero, zero_events = run_events(make_config(tiny_checkpoint, photos, tmp_path / "from zero", **settings))
    assert max_difference(load_file(str(zero.lora_path)), start) > 1e-3
    assert not any(m.startswith("starting from LoRA") for m in statuses(zero_events))


def test_a_checkpoint_of_the_same_training_wins_over_the_init_lora(tiny_checkpoint: Path, photos: Path,
                                                                   seed_lora: Path, tmp_path: Path) -> None:
    common = {**SEED_SETTINGS, "seed": 0, "init_lora": str(seed_lora)}
    straight, _ = run_events(make_config(tiny_checkpoint, photos, tmp_path / "straight", max_train_steps=3, **common))
    out = tmp_path / "resumed"
    run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=2, **common))
    # Another name for the same file: the training is the same, so its checkpoint continues it.
    renamed = shutil.copy(seed_lora, tmp_path / "renamed seed.safetensors")
    resumed, events = run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=3, overwrite=True,
                                             **{**common, "init_lora": str(renamed)}))
    assert any(m.startswith("resumed from step_000002") for m in statuses(events)), statuses(events)
    assert max_difference(load_file(str(resumed.lora_path)), load_file(str(straight.lora_path))) < 1e-6


def test_text_encoder_layers_are_left_out_with_a_warning_when_it_is_not_trained(
        tiny_checkpoint: Path, photos: Path, seed_lora: Path, tmp_path: Path) -> None:
    result, events = run_events(make_config(tiny_checkpoint, photos, tmp_path / "run", init_lora=str(seed_lora),
                                            **{**SEED_SETTINGS, **STILL, "train_text_encoder": False}))
    warnings = statuses(events, "warning")
    assert any(m.startswith(f"init_lora: {seed_lora.name} also holds a text-encoder LoRA") and
               "only its UNet layers are used" in m for m in warnings), warnings
    unet_only = {k: v for k, v in load_file(str(seed_lora)).items() if k.startswith("lora_unet_")}
    assert max_difference(load_file(str(result.lora_path)), unet_only) < 1e-5


# --- files that do not fit: config errors naming init_lora and the fix ----------------------------
@pytest.mark.parametrize(("overrides", "expected"), [
    ({"rank": 8}, "the file has UNet rank 4, rank is 8: set rank to 4"),
    ({"alpha": 4}, "the file has UNet alpha 2, alpha is 4: set alpha to 2"),
    ({"text_encoder_rank": 2, "text_encoder_alpha": 2},
     "the file has text-encoder rank 4, text_encoder_rank is 2: set text_encoder_rank to 4"),
    ({"unet_target": "attn_ff"}, "its UNet layers are unet_target 'attn', this training's are 'attn_ff': set "
     "unet_target to 'attn'"),
    ({"text_encoder_target": "attn_mlp"}, "its text-encoder layers are text_encoder_target 'attn', this "
     "training's are 'attn_mlp': set text_encoder_target to 'attn'"),
])
def test_settings_that_do_not_fit_the_file_are_refused_before_any_photo_is_read(
        tiny_checkpoint: Path, seed_lora: Path, tmp_path: Path, overrides: dict[str, Any], expected: str) -> None:
    no_photos = tmp_path / "no photos"
    no_photos.mkdir()  # a data error would come first if the file were checked after the photos
    message = config_error(make_config(tiny_checkpoint, no_photos, tmp_path / "run", init_lora=str(seed_lora),
                                       **{**SEED_SETTINGS, **STILL, **overrides}))
    assert message.startswith(f"config 'init_lora': {seed_lora.name} does not fit this training: ")
    assert expected in message, message


def test_a_unet_only_file_for_a_run_that_trains_the_text_encoder(tiny_checkpoint: Path, photos: Path,
                                                                  seed_lora: Path, tmp_path: Path) -> None:
    unet_only = tmp_path / "unet only.safetensors"
    save_file({k: v for k, v in load_file(str(seed_lora)).items() if k.startswith("lora_unet_")}, str(unet_only))
    message = config_error(make_config(tiny_checkpoint, photos, tmp_path / "run", init_lora=str(unet_only),
                                       **{**SEED_SETTINGS, **STILL}))
    assert "it has no text-encoder LoRA layers: set train_text_encoder to false" in message


QKV = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _with_foreign_layer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, **{k.replace("down_blocks_0", "down_blocks_7"): v.clone()
                          for k, v in tensors.items() if k.startswith(QKV + ".")}}


def _with_other_width(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, f"{QKV}.lora_down.weight": torch.zeros(4, 17)}


@pytest.mark.parametrize(("change", "expected"), [
    (_with_foreign_layer, "1 UNet layers this model does not have (e.g. lora_unet_down_blocks_7_attentions_0"),
    (_with_other_width, f"UNet layer {QKV} has shape [4, 17] in the file, [4, 320] in this model: it was "
     "trained on another base model family"),
])
def test_a_file_made_for_another_model_is_refused(tiny_checkpoint: Path, photos: Path, seed_lora: Path,
                                                  tmp_path: Path, change: Any, expected: str) -> None:
    other = tmp_path / "other model.safetensors"
    save_file(change(load_file(str(seed_lora))), str(other))
    message = config_error(make_config(tiny_checkpoint, photos, tmp_path / "run", init_lora=str(other),
                                       **{**SEED_SETTINGS, **STILL}))
    assert expected in message, message


def test_broken_missing_and_foreign_files_are_refused_before_any_photo_is_read(tiny_checkpoint: Path,
                                                                             seed_lora: Path, tmp_path: Path) -> None:
    no_photos = tmp_path / "no photos"
    no_photos.mkdir()  # a data error would come first if the file were checked after the photos

    def error_for(path: Path) -> str:
        return config_error(make_config(tiny_checkpoint, no_photos, tmp_path / "run", init_lora=str(path)))

    truncated = tmp_path / "half downloaded.safetensors"
    truncated.write_bytes(seed_lora.read_bytes()[:-1000])
    message = error_for(truncated)
    assert str(truncated) in message and "the download is incomplete" in message
    assert message.endswith("or leave init_lora empty to start from zero")
    missing = error_for(tmp_path / "nowhere.safetensors")
    assert "nowhere.safetensors does not exist: choose an existing LoRA file" in missing
    peft_style = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}, str(peft_style))
    assert "uses diffusers/peft key names" in error_for(peft_style)
    sdxl = tmp_path / "sdxl.safetensors"
    layer = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{layer}.lora_down.weight": torch.zeros(4, 8), f"{layer}.lora_up.weight": torch.zeros(8, 4)},
              str(sdxl))
    assert "sdxl.safetensors is an SDXL LoRA (it has lora_te2_ layers), and the base model is SD1.x" in error_for(sdxl)


def test_open_init_lora_reads_the_layout_of_a_file_the_pack_wrote(seed_lora: Path) -> None:
    init = lora.open_init_lora(seed_lora)
    assert init.modules and all(m.rank == 4 for m in init.modules.values())
    assert set(init.part("unet")) | set(init.part("text_encoder")) == set(init.modules)
    assert all(k.startswith("lora_te_text_model_") for k in init.part("text_encoder"))


# --- identity: the file by content ------------------------------------------------------------------
def _identity(tmp_path: Path, **overrides: Any) -> identity.TrainingIdentity:
    config = TrainConfig.from_dict({"pretrained_model": "/models/a.safetensors", "instance_data_dir": "/photos",
                                    "instance_prompt": "a photo of qzx dog", "output_dir": str(tmp_path / "out"),
                                    **overrides})
    return identity.build(config, base_model_sha256="m" * 64, instance_images="i" * 64, class_images="")


def test_the_identity_holds_the_init_lora_by_content_not_by_name(tmp_path: Path) -> None:
    first = tmp_path / "first.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(first))
    renamed = tmp_path / "elsewhere" / "renamed.safetensors"
    renamed.parent.mkdir()
    shutil.copy(first, renamed)
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.full((2, 3), 2.0)}, str(other))

    from_first = _identity(tmp_path, init_lora=str(first))
    assert _identity(tmp_path, init_lora=str(renamed)).key() == from_first.key()
    assert "first" not in from_first.to_json() and from_first.init_lora_sha256
    assert identity.TrainingIdentity.from_json(from_first.to_json()) == from_first
    from_other = _identity(tmp_path, init_lora=str(other))
    assert from_other.key() != from_first.key()
    assert [d.describe() for d in from_other.differences(from_first)] == [
        "init_lora: a LoRA with other contents in the file"]
    zero = _identity(tmp_path)
    assert [d.describe("then") for d in from_first.differences(zero)] == ["init_lora: empty then, a LoRA now"]
    stored = identity.TrainingIdentity.from_json(from_first.to_json())
    config = TrainConfig.from_dict({"pretrained_model": "/models/a.safetensors", "instance_data_dir": "/photos",
                                    "instance_prompt": "a photo of qzx dog", "output_dir": str(tmp_path / "out"),
                                    "init_lora": str(renamed)})
    assert identity.compare(stored, config, instance_images="i" * 64, class_images="",
                            base_model_sha256=lambda: "m" * 64) == []


def test_an_empty_init_lora_leaves_the_identity_as_it_was_before_the_setting(tmp_path: Path) -> None:
    zero = _identity(tmp_path)
    # Neither the path nor a hash: an identity stored before init_lora existed keeps matching.
    assert "init_lora" not in zero.settings and "init_lora_sha256" not in zero.to_dict()
    assert identity.TrainingIdentity.from_dict(zero.to_dict()).init_lora_sha256 == ""
