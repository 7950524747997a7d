"""One identity for a training (trainer/identity.py): resume and reuse by content, never by path or a
step count that silently differs.

Unit checks of the identity itself run without a model; the runs train the tiny SD1.5 checkpoint
in-process for a few steps at 64 px.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_dreambooth_lora.trainer import identity
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from dreambooth_test_support.training import copy_dog_photos, make_config, run_events
from safetensors import safe_open
from safetensors.torch import load_file


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return copy_dog_photos(tmp_path / "dog photos")




def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in events if e["type"] == "status"]


def lora_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata())


# --- the identity itself --------------------------------------------------------------------------
BASE = {"pretrained_model": "/models/a.safetensors", "instance_data_dir": "/photos/dog",
        "instance_prompt": "a photo of qzx dog", "output_dir": "/out/run", "rank": 4, "train_text_encoder": False}


def ident(**overrides: Any) -> identity.TrainingIdentity:
    config = TrainConfig.from_dict({**BASE, **overrides})
    return identity.build(config, base_model_sha256="m" * 64, instance_images="i" * 64, class_images="")


def test_identity_is_made_of_contents_and_settings_not_paths() -> None:
    here = ident()
    moved = ident(pretrained_model="/elsewhere/renamed.safetensors", instance_data_dir="/other/folder",
                  output_dir="/out/run", validation_prompts=["x"], gradient_checkpointing=True)
    assert moved == here and moved.key() == here.key()
    assert "/photos" not in here.to_json() and "a.safetensors" not in here.to_json()
    assert identity.TrainingIdentity.from_json(here.to_json()) == here
    assert [d.describe() for d in ident(rank=8).differences(here)] == ["rank: 4 in the file, 8 now"]
    assert [d.key for d in ident(max_train_steps=300).differences(here)] == ["max_train_steps"]
    other_photos = identity.build(TrainConfig.from_dict(BASE), base_model_sha256="m" * 64,
                                  instance_images="j" * 64, class_images="")
    assert [d.describe() for d in other_photos.differences(here)] == ["the training images or captions changed"]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_total_step_dependent_schedules_do_not_continue_across_a_step_change(schedule: str) -> None:
    saved = ident(lr_scheduler=schedule, max_train_steps=500)
    assert ident(lr_scheduler=schedule, max_train_steps=500).resume_problem(saved, 200) is None
    problem = ident(lr_scheduler=schedule, max_train_steps=800).resume_problem(saved, 500)
    assert problem and f"'{schedule}' learning-rate schedule was laid out for 500 steps, now 800" in problem


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup"])
def test_constant_schedules_continue_across_a_step_change_but_never_beyond(schedule: str) -> None:
    saved = ident(lr_scheduler=schedule, max_train_steps=500)
    assert ident(lr_scheduler=schedule, max_train_steps=800).resume_problem(saved, 500) is None
    assert ident(lr_scheduler=schedule, max_train_steps=300).resume_problem(saved, 300) is None
    beyond = ident(lr_scheduler=schedule, max_train_steps=300).resume_problem(saved, 500)
    assert beyond == "it is at step 500, beyond the 300 steps asked for"
    other = ident(lr_scheduler=schedule, max_train_steps=800, rank=8).resume_problem(saved, 500)
    assert other and "other settings or data (rank: 4 then, 8 now)" in other


# --- item 2: lowering steps, changing steps under a schedule that depends on them -------------------
def test_lowering_steps_never_returns_the_longer_training(tiny_checkpoint: Path, photos: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    long_run, _ = run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=4, checkpointing_steps=1,
                                         checkpoints_total_limit=0))
    assert long_run.step == 4
    at_two = load_file(str(out / "checkpoints" / "step_000002" / "lora.safetensors"))

    short, events = run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=2, overwrite=True))
    messages = statuses(events)
    assert any(m.startswith("not resuming from step_000004: it is at step 4, beyond the 2 steps asked for")
               for m in messages), messages
    assert any(m.startswith("resumed from step_000002") for m in messages), messages
    assert short.step == 2 and lora_meta(short.lora_path)["ss_steps"] == "2"
    written = load_file(str(short.lora_path))
    assert written.keys() == at_two.keys()
    assert all(torch.equal(written[k], at_two[k]) for k in written), "the LoRA of step 2, not of step 4"
    assert json.loads(lora_meta(short.lora_path)[identity.METADATA_KEY])["steps"] == 2


def test_a_cosine_schedule_is_not_continued_with_other_total_steps(tiny_checkpoint: Path, photos: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    lr = 1e-3
    run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=2, lr_scheduler="cosine",
                           learning_rate=lr))
    longer, events = run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=4, lr_scheduler="cosine",
                                            learning_rate=lr, overwrite=True))
    refused = [e for e in events if e["type"] == "status" and e.get("resume_refused")]
    assert len(refused) == 1 and refused[0]["level"] == "warning"
    assert "'cosine' learning-rate schedule was laid out for 2 steps, now 4" in refused[0]["message"]
    assert refused[0]["message"].endswith("training from step 0")
    assert not any(m.startswith("resumed from") for m in statuses(events))
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [e["step"] for e in metrics] == [1, 2, 3, 4]
    # The rate a straight 4-step cosine run has after each step, not the 2-step run's.
    expected = [lr * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    assert [e["lr_unet"] for e in metrics] == pytest.approx(expected, abs=1e-12)
    assert longer.step == 4


# --- item 3: moving the photo folder and the model file keeps resume -------------------------------
def _link_or_copy(source: Path, target: Path) -> Path:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def test_moving_photos_and_model_keeps_resume(tiny_checkpoint: Path, tmp_path: Path) -> None:
    photos = copy_dog_photos(tmp_path / "photos A")
    model = _link_or_copy(tiny_checkpoint, tmp_path / "model A.safetensors")
    out = tmp_path / "run"
    first, _ = run_events(make_config(model, photos, out, max_train_steps=2))
    assert first.step == 2

    moved_photos = photos.rename(tmp_path / "renamed photos B")
    moved_model = model.rename(tmp_path / "model B renamed.safetensors")
    second, events = run_events(make_config(moved_model, moved_photos, out, max_train_steps=3, overwrite=True))
    assert any(m.startswith("resumed from step_000002") for m in statuses(events)), statuses(events)
    assert [e["step"] for e in events if e["type"] == "metrics"] == [3]
    stored = lora_meta(second.lora_path)[identity.METADATA_KEY]
    assert "photos" not in stored and "model" not in stored.replace("base_model_sha256", ""), stored

    # Content, not names: one edited byte in a photo is another training.
    victim = sorted(moved_photos.glob("*.jpg"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    _, events = run_events(make_config(moved_model, moved_photos, out, max_train_steps=4, overwrite=True))
    refused = [m for m in statuses(events) if m.startswith("not resuming from step_000003")]
    assert refused and "the training images or captions changed" in refused[0], statuses(events)


def test_a_named_checkpoint_that_cannot_continue_is_a_config_error(tiny_checkpoint: Path, photos: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=3))
    with pytest.raises(ConfigError, match="beyond the 2 steps asked for") as err:
        run_events(make_config(tiny_checkpoint, photos, tmp_path / "other", max_train_steps=2,
                               resume=str(out / "checkpoints" / "step_000003")))
    assert err.value.key == "resume"


# --- checkpoints of other trainings in the same folder ---------------------------------------------
def test_rotation_keeps_the_checkpoint_just_saved_and_other_trainings(tmp_path: Path) -> None:
    from comfyui_dreambooth_lora.trainer import checkpoint

    def save(step: int, who: identity.TrainingIdentity) -> Path:
        param = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.AdamW([param])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        return checkpoint.save_checkpoint(
            tmp_path, step=step, signature=who.key(), trainable={"w": param.detach()},
            optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
            lora_tensors={"x": torch.zeros(1)}, lora_metadata={}, keep=2, data_position={}, identity=who)

    def kept() -> list[str]:
        return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    long_cosine = ident(lr_scheduler="cosine", max_train_steps=500)
    for step in (300, 400, 500):
        save(step, long_cosine)
    assert kept() == ["step_000400", "step_000500"]
    short_cosine = ident(lr_scheduler="cosine", max_train_steps=250)
    save(100, short_cosine)  # a lower step than the other run's: still the newest of its own training
    assert kept() == ["step_000100", "step_000400", "step_000500"]
    save(200, short_cosine)
    assert kept() == ["step_000100", "step_000200", "step_000400", "step_000500"]
    save(250, short_cosine)
    assert kept() == ["step_000200", "step_000250", "step_000400", "step_000500"]
    choice = checkpoint.find_resume_checkpoint(tmp_path, "auto", long_cosine)
    assert choice.checkpoint is not None and choice.checkpoint.step == 500


def test_the_node_side_comparison_agrees_with_what_the_trainer_stored(tiny_checkpoint: Path, photos: Path,
                                                                       tmp_path: Path) -> None:
    """identity.compare (the node's reuse check) against a LoRA the trainer wrote, class folder included."""
    class_folder = copy_dog_photos(tmp_path / "other dogs", count=3)
    config = make_config(tiny_checkpoint, photos, tmp_path / "run", max_train_steps=1, with_prior_preservation=True,
                         class_prompt="a photo of dog", class_data_dir=str(class_folder), num_class_images=2)
    result, _ = run_events(config)
    stored = identity.TrainingIdentity.from_json(lora_meta(result.lora_path)[identity.METADATA_KEY])
    assert stored.class_images and stored.class_images != stored.instance_images
    assert identity.compare(stored, config) == []
    # Only the first num_class_images class images are read: a third one changing is the same training.
    extra = sorted(class_folder.glob("*.jpg"))[-1]
    extra.write_bytes(extra.read_bytes()[:-10] + b"0123456789")
    assert identity.compare(stored, config) == []
    first = sorted(class_folder.glob("*.jpg"))[0]
    shutil.copy(extra, first)
    assert [d.key for d in identity.compare(stored, config)] == ["class_images"]
    longer = make_config(tiny_checkpoint, photos, tmp_path / "run", max_train_steps=2, with_prior_preservation=True,
                         class_prompt="a photo of dog", class_data_dir=str(class_folder), num_class_images=2)
    assert [d.key for d in identity.compare(stored, longer)] == ["class_images", "max_train_steps"]
