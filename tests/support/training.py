"""The small real training the engine tests share: DreamBench dog photos and tiny-model settings."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

from comfyui_dreambooth_lora.trainer import protocol
from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.run import RunResult, train

from .paths import DREAMBENCH_DIR


def copy_dog_photos(folder: Path, count: int = 3) -> Path:
    """The first ``count`` DreamBench dog photos (kept in the repo) copied into ``folder``."""
    src = DREAMBENCH_DIR / "dog"
    assert src.is_dir(), f"missing {src}: the DreamBench photos are part of the repository (tests/assets)"
    folder.mkdir(parents=True, exist_ok=True)
    for jpg in sorted(src.glob("*.jpg"))[:count]:
        shutil.copy(jpg, folder / jpg.name)
    return folder


def tiny_run_values(ckpt: Path, photos: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """Config values for a 3-step, 64 px, rank-4 UNet-only run; ``overrides`` replace any of them."""
    values: dict[str, Any] = {
        "pretrained_model": str(ckpt), "instance_data_dir": str(photos),
        "instance_prompt": "a photo of qzx dog", "output_dir": str(out), "resolution": 64,
        "max_train_steps": 3, "rank": 4, "alpha": 2, "train_text_encoder": False,
        "cache_dir": str(out.parent / "shared-cache"), "save_precision": "fp32",
    }
    values.update(overrides)
    return values


def make_config(ckpt: Path, photos: Path, out: Path, **overrides: Any) -> TrainConfig:
    """The tiny run's validated config (``tiny_run_values``)."""
    return TrainConfig.from_dict(tiny_run_values(ckpt, photos, out, **overrides))


def run_events(config: TrainConfig, commands: protocol.Commands | None = None) -> tuple[RunResult, list[dict[str, Any]]]:
    """Train in this process; the result and every protocol event the trainer emitted."""
    stream = io.StringIO()
    result = train(config, protocol.EventWriter(stream), commands or protocol.Commands())
    return result, [json.loads(line) for line in stream.getvalue().splitlines()]
