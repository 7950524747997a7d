"""The trainer warns when the dataset's resolution is far below the one the model family was trained at."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from comfyui_dreambooth_lora.trainer import protocol
from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.run import TrainingRun
from dreambooth_test_support.paths import DREAMBENCH_DIR


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the checkpoint hash check_model starts in the background is made once."""
    return tmp_path_factory.mktemp("advice cache")


def _warnings(checkpoint: Path, resolution: int, out: Path, cache: Path) -> list[str]:
    """The warning statuses of check_model(), which opens the checkpoint's header only (no weight, no photo)."""
    cfg = TrainConfig.from_dict({
        "pretrained_model": str(checkpoint), "instance_data_dir": str(DREAMBENCH_DIR / "dog"),
        "instance_prompt": "a photo of qzx dog", "output_dir": str(out), "resolution": resolution,
        "device": "cpu", "cache_dir": str(cache),
    })
    stream = io.StringIO()
    TrainingRun(cfg, protocol.EventWriter(stream), protocol.Commands()).check_model()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [e["message"] for e in events if e["type"] == "status" and e["level"] == "warning"]


@pytest.mark.parametrize(("resolution", "advice"), [
    (512, "SDXL was trained at 1024 px; 512 px gives blurry results: set resolution to 1024 (or 768 on small cards)"),
    (768, None),
])
def test_sdxl_below_its_resolution_is_a_warning(tiny_sdxl_checkpoint: Path, tmp_path: Path, cache: Path,
                                                resolution: int, advice: str | None) -> None:
    warnings = _warnings(tiny_sdxl_checkpoint, resolution, tmp_path, cache)
    blurry = [w for w in warnings if "blurry" in w]
    assert blurry == ([advice] if advice else []), warnings


def test_sd15_is_warned_only_at_half_its_resolution(tiny_checkpoint: Path, tmp_path: Path, cache: Path) -> None:
    assert not [w for w in _warnings(tiny_checkpoint, 512, tmp_path, cache) if "blurry" in w]
    assert [w for w in _warnings(tiny_checkpoint, 256, tmp_path / "small", cache) if "blurry" in w] == [
        "SD1.x was trained at 512 px; 256 px gives blurry results: set resolution to 512 (or 384 on small cards)"]
