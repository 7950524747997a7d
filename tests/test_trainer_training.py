"""The training engine on the tiny SD1.5 checkpoint: method, determinism, resume, stop, protocol.

In-process runs (``train()`` / ``TrainingRun``) keep these fast; the CLI is exercised where the
process boundary is the point (exit codes, stdin commands, stdout hygiene, accelerate).
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_dreambooth_lora.trainer import protocol
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from comfyui_dreambooth_lora.trainer.run import TrainingRun
from dreambooth_test_support.paths import DREAMBENCH_DIR
from dreambooth_test_support.training import copy_dog_photos, make_config, run_events
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real DreamBench dog photos, read in place (copied only into a temp folder)."""
    return copy_dog_photos(tmp_path_factory.mktemp("dog photos"))




def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --- method -------------------------------------------------------------------------------------
def test_loss_falls_when_overfitting_a_few_images(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    cfg = make_config(tiny_checkpoint, photos, tmp_path / "run", learning_rate=2e-3, rank=8, alpha=8,
                      max_train_steps=25)
    run = TrainingRun(cfg, protocol.EventWriter(None), protocol.Commands())
    run.prepare()

    def fixed_loss() -> float:
        with torch.no_grad():  # the same micro-batches: same images, noise and timesteps
            return sum(run.loss_for_micro_batch(m)[0].item() for m in range(6)) / 6

    before = fixed_loss()
    for _ in range(cfg.max_train_steps):
        run.optimisation_step()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


def class_prediction(run: TrainingRun, latents: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction for noised class latents under the class prompt (fixed noise/timesteps)."""
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(100, 900, (latents.shape[0],), generator=gen)
    noisy = run.base.noise_scheduler.add_noise(latents, noise, t)
    with torch.no_grad():
        return run.unet(noisy, t, run._embeddings(["a photo of dog"] * len(t)).hidden).sample


def test_prior_preservation_keeps_class_predictions_closer_to_frozen_model(
    tiny_checkpoint: Path, photos: Path, tmp_path: Path
) -> None:
    drifts = {}
    class_latents = None
    for prior in (True, False):
        cfg = make_config(tiny_checkpoint, photos, tmp_path / f"run-{prior}", learning_rate=1e-3, rank=8, alpha=8,
                          max_train_steps=20, train_text_encoder=True, text_encoder_lr=1e-4,
                          with_prior_preservation=prior, class_prompt="a photo of dog", num_class_images=3,
                          class_generation_steps=3, resume="none")
        run = TrainingRun(cfg, protocol.EventWriter(None), protocol.Commands())
        run.prepare()
        if prior:
            assert run.class_latents is not None and len(run.class_records) == 3
            class_latents = torch.stack([run.class_latents.get(i, False)[0] for i in range(3)]) * run.vae_scaling
        assert class_latents is not None

        frozen = class_prediction(run, class_latents)  # LoRA up-weights start at zero: this is the base model
        for _ in range(cfg.max_train_steps):
            run.optimisation_step()
        drifts[prior] = torch.mean((class_prediction(run, class_latents) - frozen) ** 2).item()
    assert drifts[True] < drifts[False], drifts


def test_class_images_are_generated_once_and_reused(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    common = {"with_prior_preservation": True, "class_prompt": "a photo of dog", "num_class_images": 2,
              "class_generation_steps": 2, "max_train_steps": 1, "cache_dir": str(tmp_path / "cache")}
    _, first = run_events(make_config(tiny_checkpoint, photos, tmp_path / "a", **common))
    generated = [e for e in first if e["type"] == "progress" and e["phase"] == "class_images"]
    assert [(e["step"], e["total"]) for e in generated] == [(2, 2)], "both images in one batch"
    folders = list((tmp_path / "cache" / "class_images").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 2
    _, second = run_events(make_config(tiny_checkpoint, photos, tmp_path / "b", **common))
    assert not [e for e in second if e["type"] == "progress" and e["phase"] == "class_images"]
    _, third = run_events(make_config(tiny_checkpoint, photos, tmp_path / "c", **{**common, "num_class_images": 3}))
    assert [e["step"] for e in third if e["type"] == "progress" and e["phase"] == "class_images"] == [1]


def test_a_batch_of_class_images_is_each_seed_s_own_image(tiny_checkpoint: Path) -> None:
    """Image i is seed + i whether it was made in a batch or alone: a cache grown later (more class
    images, another batch boundary) holds the same images a single run would have made."""
    from comfyui_dreambooth_lora.trainer import models, sampling

    base = models.load_base_model(str(tiny_checkpoint))
    pipe = sampling.build_pipeline(base, base.unet, base.text_encoders, torch.device("cpu"))
    settings = {"negative_prompt": "", "steps": 2, "guidance": 7.5, "size": 64, "autocast_dtype": None}
    batch = sampling.generate_batch(pipe, "a photo of dog", seeds=[11, 12, 13], **settings)
    alone = [sampling.generate(pipe, "a photo of dog", seed=s, **settings) for s in (11, 12, 13)]
    import numpy as np

    diffs = [int(np.abs(np.asarray(b, np.int16) - np.asarray(a, np.int16)).max()) for b, a in zip(batch, alone, strict=True)]
    assert max(diffs) <= 2, f"batched images differ from the single-seed ones by {diffs} levels"
    assert np.abs(np.asarray(alone[0], np.int16) - np.asarray(alone[1], np.int16)).max() > 20, "seeds differ"


# --- reproducibility and resume --------------------------------------------------------------------
def test_same_seed_same_data_gives_bit_identical_lora(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    outputs = []
    for name in ("a", "b"):
        cfg = make_config(tiny_checkpoint, photos, tmp_path / name, train_text_encoder=True, random_flip=True)
        result, _ = run_events(cfg)
        outputs.append(lora_tensors(result.lora_path))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    other, _ = run_events(make_config(tiny_checkpoint, photos, tmp_path / "c", train_text_encoder=True,
                                      random_flip=True, seed=1))
    changed = lora_tensors(other.lora_path)
    assert any(not torch.equal(changed[k], outputs[0][k]) for k in changed if k.endswith("lora_down.weight"))


def test_resume_mid_epoch_matches_uninterrupted_run(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    common = {"train_text_encoder": True, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 4,
              "learning_rate": 1e-3}
    straight, _ = run_events(make_config(tiny_checkpoint, photos, tmp_path / "straight", max_train_steps=5, **common))
    out = tmp_path / "resumed"
    # 2 steps of 3 images: the resumed run starts in the middle of the first epoch.
    first, _ = run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=2,
                                      output_path=str(out / "part.safetensors"), **common))
    assert first.step == 2
    second, events = run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=5, **common))
    assert any(e["type"] == "status" and "resumed from step_000002" in e["message"] for e in events)
    state = json.loads((out / "checkpoints" / "step_000005" / "state.json").read_text(encoding="utf-8"))
    assert state["data_position"] == {"epoch": 1, "offset": 2, "images_seen": 5}
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # The first part alone differs: the comparison above is not trivially true.
    part = lora_tensors(first.lora_path)
    assert any(not torch.allclose(part[k], a[k]) for k in a if k.endswith("lora_up.weight"))


def test_checkpoints_rotate_and_resume_ignores_changed_settings(tiny_checkpoint: Path, photos: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=4, checkpointing_steps=1,
                           checkpoints_total_limit=2))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_000003", "step_000004"]
    _, events = run_events(make_config(tiny_checkpoint, photos, out, max_train_steps=2, rank=8,
                                       output_path=str(out / "other.safetensors")))
    assert not any("resumed" in e.get("message", "") for e in events)


# --- the LoRA file ------------------------------------------------------------------------------
def test_lora_file_has_kohya_keys_true_alpha_and_metadata(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    cfg = make_config(tiny_checkpoint, photos, tmp_path / "run", train_text_encoder=True, rank=4, alpha=2,
                      text_encoder_rank=2, text_encoder_alpha=1, identifier="qzx", save_precision="fp16")
    result, _ = run_events(cfg)
    with safe_open(str(result.lora_path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        unet_alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
        te_alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
        te_down = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight")
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    assert float(unet_alpha) == 2.0 and float(te_alpha) == 1.0 and te_down.shape[0] == 2
    assert te_down.dtype == torch.float16
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["dreambooth.identifier"] == "qzx" and meta["dreambooth.instance_prompt"] == "a photo of qzx dog"
    assert meta["ss_sd_model_name"] == tiny_checkpoint.name and len(meta["ss_new_sd_model_hash"]) == 64
    assert meta["ss_steps"] == "3" and meta["ss_seed"] == "0"
    assert str(photos) not in json.dumps(meta), "user paths must not leak into a shared LoRA"


def test_existing_lora_is_never_overwritten_silently(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"a good LoRA")
    with pytest.raises(ConfigError, match="already exists"):
        run_events(make_config(tiny_checkpoint, photos, tmp_path / "run", output_path=str(target)))
    assert target.read_bytes() == b"a good LoRA"
    assert not list(tmp_path.glob(".mine.safetensors.*"))


def test_a_failing_validation_sample_does_not_stop_training(tiny_checkpoint: Path, photos: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from comfyui_dreambooth_lora.trainer import sampling

    calls = []

    def broken(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(sampling, "generate", broken)
    cfg = make_config(tiny_checkpoint, photos, tmp_path / "run", validation_prompts=["a qzx dog"],
                      validation_steps=1, max_train_steps=2)
    result, events = run_events(cfg)
    assert result.status == "done" and result.lora_path.is_file()
    assert len(calls) == 2
    warnings = [e for e in events if e["type"] == "status" and e["level"] == "warning"]
    assert any("sampler exploded" in e["message"] for e in warnings)


def test_validation_samples_are_written(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    cfg = make_config(tiny_checkpoint, photos, tmp_path / "run", validation_prompts=["a qzx dog", "a dog"],
                      validation_steps=2, max_train_steps=2, validation_inference_steps=2)
    _, events = run_events(cfg)
    samples = [e for e in events if e["type"] == "sample"]
    assert [(e["step"], e["index"]) for e in samples] == [(2, 0), (2, 1)]
    from PIL import Image

    for e in samples:
        with Image.open(e["path"]) as img:
            assert img.size == (64, 64)


# --- the process boundary -----------------------------------------------------------------------
def _spawn(config: TrainConfig, tmp_path: Path, argv_prefix: list[str] | None = None) -> subprocess.Popen[str]:
    path = tmp_path / "run config.json"
    path.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    cmd = (argv_prefix or [sys.executable]) + ["-m", "trainer", "--config", str(path)]
    return subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")


def test_stop_command_saves_checkpoint_and_exits_stopped(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    cfg = make_config(tiny_checkpoint, photos, tmp_path / "run", max_train_steps=200)
    proc = _spawn(cfg, tmp_path)
    assert proc.stdout is not None and proc.stdin is not None
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))  # every stdout line must be a protocol event
        if events[-1]["type"] == "metrics":
            proc.stdin.write('{"command": "save"}\n')
            proc.stdin.write("stop\n")  # a bare word works too
            proc.stdin.flush()
            break
    for line in proc.stdout:
        events.append(json.loads(line))
    assert proc.wait(timeout=60) == protocol.EXIT_STOPPED
    done = events[-1]
    assert done["type"] == "done" and done["status"] == "stopped" and done["step"] < 200
    lora = Path(done["lora_path"])
    assert lora.is_file() and lora.parent.parent.name == "checkpoints"
    assert any(k.startswith("lora_unet_") for k in lora_tensors(lora))
    assert not Path(cfg.output_path).exists()


def test_orphaned_trainer_stops_when_its_launcher_goes_away(tiny_checkpoint: Path, photos: Path,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(make_config(tiny_checkpoint, photos, tmp_path / "run").to_dict()), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path), "--stop-when-stdin-closes"],
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == protocol.EXIT_STOPPED, proc.stderr[-2000:]
    done = json.loads(proc.stdout.splitlines()[-1])
    assert done["type"] == "done" and done["status"] == "stopped" and done["step"] == 0
    assert done["lora_path"] is None


def test_stray_prints_never_reach_the_event_stream(tmp_path: Path) -> None:
    code = (
        "import sys, os\n"
        "from trainer.protocol import EventWriter, claim_stdout_for_protocol\n"
        "w = EventWriter(claim_stdout_for_protocol())\n"
        "print('stray print from a library')\n"
        "os.write(1, b'raw fd write\\n')\n"
        "w.emit('status', message='ok', loss=float('nan'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["message"] == "ok"
    assert json.loads(lines[0])["loss"] == "nan"
    assert "stray print" in proc.stderr and "raw fd write" in proc.stderr


def test_commands_parse_json_bare_words_and_ignore_junk() -> None:
    commands = protocol.Commands()
    for line in ('{"command": "sample"}', "save", "", "{not json", '{"command": "explode"}', '["x"]'):
        commands.handle_line(line)
    assert commands.take("sample") and commands.take("save") and not commands.take("stop")
    assert not commands.take("sample"), "a command is consumed once"


def test_data_errors_exit_with_data_code_naming_the_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no photos here"
    empty.mkdir()
    proc = _spawn(make_config(tiny_checkpoint, empty, tmp_path / "run"), tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == protocol.EXIT_DATA, err
    error = [json.loads(line) for line in out.splitlines()][-1]
    assert error["type"] == "error" and error["kind"] == "data" and "no photos here" in error["message"]


def test_oom_is_reported_with_concrete_advice() -> None:
    from comfyui_dreambooth_lora.trainer.__main__ import _error_kind
    from comfyui_dreambooth_lora.trainer.runtime import OOM_SETTINGS, oom_advice

    kind, message, advice = _error_kind(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert kind == "oom" and "Tried to allocate" in message
    assert advice.startswith("Out of GPU memory. Try, in this order: turn gradient_checkpointing on;")
    assert "lower train_batch_size to 1 and raise gradient_accumulation_steps instead" in advice
    assert advice.endswith("close other programs using the GPU.")
    shown = oom_advice(display=lambda key: key.replace("_", " ").upper())
    assert "turn GRADIENT CHECKPOINTING on" in shown and "set OPTIMIZER to adamw8bit" in shown
    assert "gradient_checkpointing" not in shown
    assert set(OOM_SETTINGS) <= {f.name for f in dataclasses.fields(TrainConfig)}  # every one a real setting


def test_oom_error_event_names_the_settings_in_the_order_of_the_advice(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"pretrained_model": "m.safetensors", "instance_data_dir": "photos",
                                  "instance_prompt": "a photo of qzx dog", "output_dir": str(tmp_path / "out")}),
                      encoding="utf-8")
    # A real GPU out-of-memory cannot happen on a CPU test machine: the run raises the error torch raises.
    code = (
        "import sys, torch, trainer.run\n"
        "def train(*args, **kwargs):\n"
        "    raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')\n"
        "trainer.run.train = train\n"
        "from trainer.__main__ import main\n"
        f"sys.exit(main(['--config', {str(config)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == protocol.EXIT_OOM, proc.stderr
    error = [json.loads(line) for line in proc.stdout.splitlines()][-1]
    assert error["type"] == "error" and error["kind"] == "oom"
    assert error["settings"] == ["gradient_checkpointing", "mixed_precision", "cache_latents", "train_batch_size",
                                 "gradient_accumulation_steps", "optimizer", "train_text_encoder", "resolution"]
    positions = [error["advice"].index(key) for key in error["settings"]]
    assert positions == sorted(positions)


@pytest.mark.slow
def test_accelerate_two_cpu_processes_write_one_lora(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    cfg = make_config(tiny_checkpoint, photos, tmp_path / "run", max_train_steps=2, train_text_encoder=True)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu"]
    started = time.monotonic()
    proc = _spawn(cfg, tmp_path, argv_prefix=launcher)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events].count("hello") == 1, "only the main process speaks the protocol"
    assert events[-1]["type"] == "done" and events[-1]["step"] == 2
    assert Path(cfg.output_path).is_file()
    assert len(list(Path(cfg.output_path).parent.glob("*.safetensors"))) == 1
    assert time.monotonic() - started < 600


# --- aspect-ratio buckets ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DreamBench dogs cut to landscape, portrait and square: three buckets at 64 px (72x56 twice, 48x80, 64x64)."""
    folder = tmp_path_factory.mktemp("mixed photos")
    boxes = {"00": (0, 32, 256, 224), "01": (48, 0, 208, 256), "02": (0, 0, 256, 256), "03": (0, 40, 256, 216)}
    for name, box in boxes.items():
        with Image.open(DREAMBENCH_DIR / "dog" / f"{name}.jpg") as photo:
            photo.convert("RGB").crop(box).save(folder / f"{name}.png")
    return folder


def test_bucketed_batches_share_one_shape_with_class_images_in_the_same_bucket(
    tiny_checkpoint: Path, mixed_photos: Path, tmp_path: Path
) -> None:
    # Square class photos from a folder: what matters here is their cut to each bucket, not their generation.
    classes = copy_dog_photos(tmp_path / "class photos", count=2)
    cfg = make_config(tiny_checkpoint, mixed_photos, tmp_path / "run", aspect_buckets=True, train_batch_size=2,
                      with_prior_preservation=True, class_prompt="a photo of dog",
                      class_data_dir=str(classes), num_class_images=2, max_train_steps=2)
    run = TrainingRun(cfg, protocol.EventWriter(None), protocol.Commands())
    run.prepare()
    assert sorted(p.bucket for p in run.instance_prepared) == [(48, 80), (64, 64), (72, 56), (72, 56)]
    shapes = set()
    for micro in range(8):
        latents, prompts, geometry = run._batch(micro)
        assert latents.shape[0] == len(prompts) == len(geometry) == 4  # 2 instance + 2 class samples
        h, w = latents.shape[-2:]
        assert all(g.target_size == (8 * h, 8 * w) for g in geometry), (latents.shape, geometry)
        assert prompts[2:] == ["a photo of dog"] * 2
        shapes.add((h, w))
    assert shapes == {(10, 6), (8, 8), (7, 9)}, "every bucket is trained"
    # The latents are cached per bucket, class images in every bucket the instances use.
    assert {key[2] for key in run.class_latents.entries} == {(48, 80), (64, 64), (72, 56)}
    loss, _instance, prior = run.loss_for_micro_batch(0)
    assert torch.isfinite(loss) and prior > 0


def test_bucketed_run_resumed_mid_epoch_matches_uninterrupted_run(tiny_checkpoint: Path, mixed_photos: Path,
                                                                  tmp_path: Path) -> None:
    common = {"aspect_buckets": True, "random_flip": True, "lr_scheduler": "constant", "learning_rate": 1e-3}
    straight, _ = run_events(make_config(tiny_checkpoint, mixed_photos, tmp_path / "straight", max_train_steps=4,
                                         **common))
    out = tmp_path / "resumed"
    first, _ = run_events(make_config(tiny_checkpoint, mixed_photos, out, max_train_steps=2,
                                      output_path=str(out / "part.safetensors"), **common))
    second, events = run_events(make_config(tiny_checkpoint, mixed_photos, out, max_train_steps=4, **common))
    assert any(e["type"] == "status" and "resumed from step_000002" in e["message"] for e in events)
    assert any(e["type"] == "status" and e["message"].startswith("aspect buckets: ") for e in events)
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    part = lora_tensors(first.lora_path)
    assert any(not torch.allclose(part[k], a[k]) for k in a if k.endswith("lora_up.weight"))
    # Buckets on is another training: the square run's checkpoints are not resumed.
    _, square_events = run_events(make_config(tiny_checkpoint, mixed_photos, out, max_train_steps=4,
                                              output_path=str(out / "square.safetensors"),
                                              **{**common, "aspect_buckets": False}))
    assert not any("resumed" in e.get("message", "") for e in square_events)


def test_random_crop_in_buckets(tiny_checkpoint: Path, mixed_photos: Path, tmp_path: Path) -> None:
    cfg = make_config(tiny_checkpoint, mixed_photos, tmp_path / "run", aspect_buckets=True, crop="random",
                      max_train_steps=2)
    run = TrainingRun(cfg, protocol.EventWriter(None), protocol.Commands())
    run.prepare()
    assert run.instance_latents is None  # a new crop every step
    tops = set()
    for micro in range(6):
        latents, _prompts, (geometry,) = run._batch(micro)
        assert geometry.target_size == (8 * latents.shape[-2], 8 * latents.shape[-1])
        assert geometry.target_size != (64, 64) or geometry.original_size == (256, 256)
        tops.add(geometry.crop_top_left)
    assert len(tops) > 1


def test_face_crop_keeps_latents_cached_and_names_photos_without_a_face(tiny_checkpoint: Path, mixed_photos: Path,
                                                                         tmp_path: Path) -> None:
    stream = io.StringIO()
    cfg = make_config(tiny_checkpoint, mixed_photos, tmp_path / "run", crop="face", aspect_buckets=True)
    run = TrainingRun(cfg, protocol.EventWriter(stream), protocol.Commands())
    run.prepare()
    assert run.instance_latents is not None and len(run.instance_latents.entries) == 4, "fixed crops are cached"
    assert run.base.vae is None, "every latent is cached: the VAE is freed"
    messages = [json.loads(line).get("message", "") for line in stream.getvalue().splitlines()]
    for name in ("00.png", "01.png", "02.png", "03.png"):  # dogs: no face, so the center crop, said per file
        assert any(name in m and "no face" in m for m in messages), (name, messages)
    for item in run.instance_prepared:
        (rh, rw), (th, tw) = item.geometry.resized_size(), item.geometry.target_size
        top, left = item.geometry.crop_top_left
        assert abs(2 * top - (rh - th)) <= 1 and abs(2 * left - (rw - tw)) <= 1, item.geometry
