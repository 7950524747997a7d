"""Validation before work: config, then the model file, then every photo, and every problem at once.

The broken files are built here: an empty file, a text file named .png, a decompression bomb (a PNG
header claiming 400 million pixels, a few hundred bytes on disk), a truncated JPEG and a truncated
PNG. Skipped files and animated images are reported as warning events, not only on stderr.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from comfyui_dreambooth_lora.trainer import data, protocol
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from comfyui_dreambooth_lora.trainer.run import train
from dreambooth_test_support.paths import DREAMBENCH_DIR
from PIL import Image

DOGS = sorted((DREAMBENCH_DIR / "dog").glob("*.jpg"))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A valid PNG header for a side x side grey image with almost no pixel data behind it."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    pixels = _chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + pixels + _chunk(b"IEND", b""))
    return path


def broken_folder(folder: Path, good: int = 2) -> dict[str, str]:
    """``good`` real photos plus five broken files; returns {file name: the cause its error must name}."""
    folder.mkdir(parents=True)
    for jpg in DOGS[:good]:
        shutil.copy(jpg, folder / jpg.name)
    (folder / "a_empty.png").write_bytes(b"")
    (folder / "b_notes.png").write_text("these are my notes, not a picture\n" * 10, encoding="utf-8")
    bomb_png(folder / "c_bomb.png")
    whole = DOGS[0].read_bytes()
    (folder / "d_cut.jpg").write_bytes(whole[: len(whole) // 2])
    png = io.BytesIO()
    with Image.open(DOGS[1]) as img:
        img.convert("RGB").save(png, format="PNG")
    (folder / "e_cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    return {"a_empty.png": "empty file (0 bytes)", "b_notes.png": "not an image that can be read",
            "c_bomb.png": "refused for safety", "d_cut.jpg": "truncated or corrupt",
            "e_cut.png": "truncated or corrupt"}


def test_every_bad_photo_is_named_in_one_error_with_its_cause(tmp_path: Path) -> None:
    folder = tmp_path / "my photos"
    causes = broken_folder(folder)
    scan = data.scan_folder(folder)
    with pytest.raises(data.DataError) as err:
        data.read_images(scan, 64)
    message = str(err.value)
    assert message.startswith(f"5 images in the instance images folder {folder} cannot be used")
    lines = [line for line in message.splitlines() if line.startswith("- ")]
    assert len(lines) == 5, message
    for name, cause in causes.items():
        [line] = [line for line in lines if name in line]
        assert cause in line, (name, line)
    # The plain scan (what the dataset node's cache key uses) names the files it can tell by their header.
    with pytest.raises(data.DataError, match="2 images in the instance images folder") as scan_err:
        data.scan_image_folder(folder)
    assert "a_empty.png" in str(scan_err.value) and "b_notes.png" in str(scan_err.value)


def make_config(ckpt: Path, photos: Path, out: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "pretrained_model": str(ckpt), "instance_data_dir": str(photos), "instance_prompt": "a photo of qzx dog",
        "output_dir": str(out), "resolution": 64, "max_train_steps": 1, "rank": 4, "alpha": 4,
        "train_text_encoder": False, "cache_dir": str(out.parent / "shared-cache"),
    }
    return TrainConfig.from_dict({**values, **overrides})


def run(config: TrainConfig, events: list[dict[str, Any]]) -> Any:
    stream = io.StringIO()
    try:
        return train(config, protocol.EventWriter(stream), protocol.Commands())
    finally:
        events += [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_trainer_names_all_bad_photos_in_one_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    causes = broken_folder(folder)
    events: list[dict[str, Any]] = []
    with pytest.raises(data.DataError) as err:
        run(make_config(tiny_checkpoint, folder, tmp_path / "run"), events)
    assert all(name in str(err.value) for name in causes), str(err.value)
    assert not any(e["type"] == "status" and e["message"].startswith("loading ") for e in events), \
        "the photos are checked before the model is loaded"


def test_a_broken_model_is_reported_before_any_photo_is_read(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    broken_folder(folder)
    whole = tiny_checkpoint.read_bytes()
    half = tmp_path / "half downloaded.safetensors"
    half.write_bytes(whole[: len(whole) // 3])
    events: list[dict[str, Any]] = []
    with pytest.raises(ConfigError) as err:
        run(make_config(half, folder, tmp_path / "run"), events)
    assert err.value.key == "pretrained_model" and "the download is incomplete" in str(err.value)
    assert not any(e["type"] == "status" and "images" in e["message"] for e in events), events

    missing = tmp_path / "no such model.safetensors"
    with pytest.raises(ConfigError, match="does not exist") as err:
        run(make_config(missing, folder, tmp_path / "run2"), events)
    assert err.value.key == "pretrained_model"


def test_skipped_files_and_animations_are_warning_events(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for jpg in DOGS[:2]:
        shutil.copy(jpg, folder / jpg.name)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not a photo")
    (folder / "clip.mp4").write_bytes(b"\0\0\0\x18ftypmp42")
    with Image.open(DOGS[2]) as img:
        frame = img.convert("RGB").resize((80, 80))
    frame.save(folder / "wag.gif", save_all=True, append_images=[frame.rotate(90)], duration=100, loop=0)

    events: list[dict[str, Any]] = []
    result = run(make_config(tiny_checkpoint, folder, tmp_path / "run"), events)
    assert result.status == "done"
    warnings = [e["message"] for e in events if e["type"] == "status" and e["level"] == "warning"]
    skipped = [m for m in warnings if m.startswith("Ignoring ")]
    assert len(skipped) == 1 and "2 file(s)" in skipped[0], warnings
    assert "notes.pdf" in skipped[0] and "clip.mp4" in skipped[0]
    animated = [m for m in warnings if "wag.gif" in m]
    assert len(animated) == 1 and "only its first frame is trained" in animated[0], warnings
    assert any(e["type"] == "status" and e["message"] == "3 instance images, 3 per epoch" for e in events)
