"""Full DreamBooth (training_method 'full'): every UNet (and text-encoder) weight trained, saved as a
single-file checkpoint built from the base model's file, optionally with a LoRA extracted by SVD.

Checked on the real engine and the tiny SD1.5 / SD2 checkpoints: the name map back to the file is
exact (an untrained export is the base file, tensor for tensor), a trained export holds the trained
weights where a loader finds them and the base's VAE untouched, a full-rank extracted LoRA rebuilds
the fine-tuned weights, a resumed run ends where an uninterrupted one does, and settings that cannot
go with a full fine-tune are config errors naming the setting.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_dreambooth_lora.trainer import full_finetune, identity, protocol
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from comfyui_dreambooth_lora.trainer.models import UNET_PREFIX, VAE_PREFIX, ModelSource
from comfyui_dreambooth_lora.trainer.run import train
from comfyui_dreambooth_lora.trainer.safetensors_file import read_header
from dreambooth_test_support.tiny_models import tiny_sd2_checkpoint
from dreambooth_test_support.training import copy_dog_photos, make_config, run_events
from safetensors.torch import load_file

FULL: dict[str, Any] = {"training_method": "full", "learning_rate": 1e-3, "save_precision": "fp32"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_dog_photos(tmp_path_factory.mktemp("dog photos"))


@pytest.fixture(scope="module")
def full_run(tiny_checkpoint: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two steps fine-tuning UNet and text encoder, with a full-rank (exact) extracted LoRA."""
    out = tmp_path_factory.mktemp("full run") / "run"
    config = make_config(tiny_checkpoint, photos, out, **FULL, train_text_encoder=True, text_encoder_lr=1e-3,
                         max_train_steps=2, extract_lora_rank=1024)
    result, events = run_events(config)
    yield {"config": config, "result": result, "events": events}
    # ~3 GB of checkpoints: gone with the module, not kept to the end of the session.
    shutil.rmtree(out.parent, ignore_errors=True)


def test_untrained_export_is_the_base_file(tiny_checkpoint: Path) -> None:
    """Loading the base and writing it back through the name map gives the file's own tensors: every
    trained tensor would land exactly where the loader took it from."""
    source = ModelSource(str(tiny_checkpoint))
    base = load_file(str(tiny_checkpoint))
    exported = full_finetune.checkpoint_tensors(tiny_checkpoint, "sd1", source.unet(), source.text_encoders()[0],
                                                dtype=torch.float16)
    assert exported.keys() == {k for k in base if not k.startswith(full_finetune.STALE_PREFIXES)}
    for key, value in base.items():
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key


def test_sd2_unet_names_map_back(tmp_path: Path) -> None:
    ckpt = tiny_sd2_checkpoint()
    source = ModelSource(str(ckpt))
    base = load_file(str(ckpt))
    exported = full_finetune.checkpoint_tensors(ckpt, "sd2", source.unet(), None, dtype=torch.float16)
    unet_keys = [k for k in base if k.startswith(UNET_PREFIX)]
    assert unet_keys and all(torch.equal(exported[k], base[k].half()) for k in unet_keys)


def test_full_run_saves_a_checkpoint_with_the_trained_weights(full_run: dict[str, Any], tiny_checkpoint: Path) -> None:
    config, result = full_run["config"], full_run["result"]
    assert result.status == "done" and result.step == 2
    assert result.checkpoint_path == Path(config.output_path) and result.checkpoint_path.name == "model.safetensors"
    base, tuned = load_file(str(tiny_checkpoint)), load_file(str(result.checkpoint_path))
    assert tuned.keys() == base.keys()
    changed = {prefix: sum(not torch.equal(tuned[k], base[k].float()) for k in base if k.startswith(prefix))
               for prefix in (UNET_PREFIX, "cond_stage_model.", VAE_PREFIX)}
    assert changed[UNET_PREFIX] > 100, changed  # every UNet weight moved
    assert changed["cond_stage_model."] > 100, changed
    assert changed[VAE_PREFIX] == 0, changed  # the VAE is the base's, untouched
    # Loaded back by the engine's own loader, the UNet is the one the last checkpoint of the run holds.
    trained = load_file(str(Path(config.output_dir) / "checkpoints" / "step_000002" / "trainable.safetensors"))
    reloaded = ModelSource(str(result.checkpoint_path)).unet().state_dict()
    for name, value in reloaded.items():
        assert torch.equal(value, trained["unet." + name]), name


def test_checkpoint_header_says_what_it_is(full_run: dict[str, Any]) -> None:
    meta = dict(read_header(full_run["result"].checkpoint_path).metadata)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["dreambooth.training_method"] == "full"
    assert not any(k.startswith("ss_network") for k in meta)
    saved = identity.TrainingIdentity.from_json(meta[identity.METADATA_KEY])
    assert saved.settings["training_method"] == "full" and "rank" not in saved.settings
    assert saved.steps == 2


def test_full_rank_extracted_lora_rebuilds_the_fine_tune(full_run: dict[str, Any], tiny_checkpoint: Path) -> None:
    config, result = full_run["config"], full_run["result"]
    assert result.lora_path == Path(config.extracted_lora_path)
    assert result.lora_path.name == "model_lora_rank1024.safetensors"
    lora = load_file(str(result.lora_path))
    meta = dict(read_header(result.lora_path).metadata)
    assert meta["dreambooth.extracted_from"] == "model.safetensors" and meta["ss_network_dim"] == "1024"
    base = ModelSource(str(tiny_checkpoint))
    tuned = ModelSource(str(result.checkpoint_path))
    checked = 0
    for prefix, before, after in (("lora_unet", base.unet(), tuned.unet()),
                                  ("lora_te", base.text_encoders()[0], tuned.text_encoders()[0])):
        before_modules = dict(before.named_modules())
        for name, module in after.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            path = name if prefix == "lora_unet" or name.startswith("text_model.") else "text_model." + name
            key = f"{prefix}_{path.replace('.', '_')}"
            delta = module.weight.detach() - before_modules[name].weight.detach()
            if not torch.any(delta):
                assert f"{key}.lora_down.weight" not in lora
                continue
            down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
            scale = lora[f"{key}.alpha"].item() / down.shape[0]
            rebuilt = (up.flatten(1) @ down.flatten(1)).reshape(delta.shape) * scale
            assert torch.allclose(rebuilt, delta, atol=1e-5 + 1e-3 * delta.abs().max().item()), key
            checked += 1
    assert checked > 100


def test_low_rank_extraction_is_the_best_approximation() -> None:
    torch.manual_seed(0)
    before = torch.nn.Linear(32, 48)
    after = torch.nn.Linear(32, 48)
    after.load_state_dict(before.state_dict())
    with torch.no_grad():  # a rank-2 change plus a little noise
        after.weight += torch.randn(48, 2) @ torch.randn(2, 32) + 1e-3 * torch.randn(48, 32)
    tensors, layers = full_finetune.extract_lora([("lora_unet", before, after)], 2, torch.float32)
    assert layers == 1
    delta = after.weight.detach() - before.weight.detach()
    approx = tensors["lora_unet_.lora_up.weight"] @ tensors["lora_unet_.lora_down.weight"]
    singular = torch.linalg.svdvals(delta)
    # Eckart-Young: the error of the best rank-2 approximation is the next singular values' norm.
    assert torch.linalg.norm(delta - approx).item() == pytest.approx(singular[2:].norm().item(), rel=1e-4)


def test_resumed_full_run_ends_where_an_uninterrupted_one_does(tiny_checkpoint: Path, photos: Path,
                                                               tmp_path: Path) -> None:
    straight, _ = run_events(make_config(tiny_checkpoint, photos, tmp_path / "straight", **FULL, max_train_steps=3))
    out = tmp_path / "resumed"
    first, _ = run_events(make_config(tiny_checkpoint, photos, out, **FULL, max_train_steps=2))
    assert first.status == "done"
    after_two = load_file(str(first.checkpoint_path))  # the next run writes the same file
    second, events = run_events(make_config(tiny_checkpoint, photos, out, **FULL, max_train_steps=3, overwrite=True))
    assert any("resumed from step_000002" in e.get("message", "") for e in events)
    a, b = load_file(str(straight.checkpoint_path)), load_file(str(second.checkpoint_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in after_two.items())


def test_stopped_full_run_keeps_a_checkpoint_and_no_lora(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    commands = protocol.Commands()
    commands.stop.set()
    config = make_config(tiny_checkpoint, photos, tmp_path / "run", **FULL, max_train_steps=3)
    result = train(config, protocol.EventWriter(None), commands)
    assert result.status == "stopped" and result.lora_path is None and result.checkpoint_path is None
    assert not Path(config.output_path).exists()


@pytest.mark.parametrize(("overrides", "key"), [
    ({"training_method": "full", "init_lora": "x.safetensors"}, "init_lora"),
    ({"training_method": "full", "save_lora_every_n_steps": 10}, "save_lora_every_n_steps"),
    ({"extract_lora_rank": 8}, "extract_lora_rank"),
    ({"training_method": "full", "extracted_lora_path": "x.ckpt", "extract_lora_rank": 8}, "extracted_lora_path"),
])
def test_settings_that_do_not_go_with_the_method(overrides: dict[str, Any], key: str, tmp_path: Path) -> None:
    values = {"pretrained_model": "m.safetensors", "instance_data_dir": "photos", "instance_prompt": "a qzx dog",
              "output_dir": str(tmp_path), **overrides}
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict(values)
    assert caught.value.key == key


def test_sd2_text_encoder_full_fine_tune_is_refused_before_photos_are_read(photos: Path, tmp_path: Path) -> None:
    config = make_config(tiny_sd2_checkpoint(), photos, tmp_path / "run", **FULL, train_text_encoder=True)
    with pytest.raises(ConfigError) as caught:
        train(config, protocol.EventWriter(None), protocol.Commands())
    assert caught.value.key == "train_text_encoder" and "OpenCLIP" in str(caught.value)


def test_lora_identity_is_unchanged_by_the_new_setting(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    """LoRAs trained before training_method existed still match their training (reuse and resume)."""
    config = make_config(tiny_checkpoint, photos, tmp_path / "run")
    settings = identity.result_settings(config)
    assert "training_method" not in settings and settings["rank"] == 4
    assert json.loads(json.dumps(settings)) == settings
