"""Broken model files are errors that say what is wrong, never weights read back as zeros.

Every broken file is built here at test time: a real .safetensors file cut short (the most common
case: a download that stopped), an empty file, a web page saved under the model's name, a Git LFS
pointer, a pickle renamed to .safetensors, a header that lies about its tensors.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from comfyui_dreambooth_lora.trainer import protocol
from comfyui_dreambooth_lora.trainer.config import ConfigError
from comfyui_dreambooth_lora.trainer.launcher import child_env, trainer_command
from comfyui_dreambooth_lora.trainer.models import LazySafetensors
from comfyui_dreambooth_lora.trainer.safetensors_file import SafetensorsFileError, human_size, read_header
from dreambooth_test_support.paths import DREAMBENCH_DIR
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.arange(4096, dtype=torch.float32).reshape(64, 64),
               "b.bias": torch.ones(300, dtype=torch.float16), "empty": torch.zeros(0)}, str(path),
              metadata={"format": "pt"})
    return path


def cut(src: Path, fraction: float, name: str) -> Path:
    data = src.read_bytes()
    out = src.with_name(name)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def test_a_complete_file_reads_exactly_what_was_written(good: Path) -> None:
    header = read_header(good)
    assert set(header.tensors) == {"a.weight", "b.bias", "empty"} and header.metadata == {"format": "pt"}
    lazy = LazySafetensors(good)
    assert torch.equal(lazy["a.weight"], torch.arange(4096, dtype=torch.float32).reshape(64, 64))
    assert lazy["empty"].shape == (0,) and lazy.shapes()["b.bias"] == (300,)


@pytest.mark.parametrize("fraction", [0.5, 0.99])
def test_a_half_downloaded_file_is_refused_like_the_safetensors_library_refuses_it(good: Path,
                                                                                   fraction: float) -> None:
    broken = cut(good, fraction, f"cut {fraction}.safetensors")
    with pytest.raises(SafetensorError):  # the reference implementation agrees it is broken
        with safe_open(str(broken), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(SafetensorsFileError) as caught:
        read_header(broken)
    message = str(caught.value)
    assert str(broken) in message and "the download is incomplete" in message
    assert f"ends at {human_size(broken.stat().st_size)}" in message and "Download the file again" in message
    with pytest.raises(ConfigError) as as_config:
        LazySafetensors(broken)
    assert as_config.value.key == "pretrained_model" and "incomplete" in str(as_config.value)


def _with_header(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "is empty (0 bytes)"),
    (b"\x01\x02\x03", "is only 3 bytes long"),
    (b"<!DOCTYPE html><html><body>Sign in to download</body></html>", "is a web page, not a model"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2132625894\n", "Git LFS pointer"),
    (b"PK\x03\x04\x14\x00\x00\x08\x08\x00" + bytes(100), "PyTorch pickle"),
    (struct.pack("<Q", 20) + b"not json at all!!!!!", "its header is not valid"),
    (struct.pack("<Q", 5000) + b"{}", "inside its own header"),
])
def test_files_that_are_not_models_say_what_they_are(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "sd15.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsFileError, match=None) as caught:
        read_header(path)
    assert fragment in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize(("entry", "data", "fragment"), [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, bytes(12), "needs 16"),
    ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}, bytes(4), "unknown type 'Q4'"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, bytes(4), "invalid shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}, bytes(8), "invalid data offsets"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, bytes(10), "6 bytes after its last tensor"),
])
def test_a_header_that_lies_about_its_tensors_is_refused(tmp_path: Path, entry: dict, data: bytes,
                                                          fragment: str) -> None:
    path = _with_header(tmp_path / "m.safetensors", {"w": entry}, data)
    with pytest.raises(SafetensorsFileError) as caught:
        read_header(path)
    assert fragment in str(caught.value)


def test_overlapping_tensors_are_refused(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(SafetensorsFileError, match="overlap"):
        read_header(_with_header(tmp_path / "m.safetensors", header, bytes(12)))


def test_a_file_that_shrinks_after_its_header_was_read_is_an_error_not_zeros(good: Path) -> None:
    lazy = LazySafetensors(good)
    data = good.read_bytes()
    good.write_bytes(data[:-200])  # b.bias (fp16, 600 bytes) now ends past the end of the file
    with pytest.raises(ConfigError, match="truncated while in use"):
        lazy["b.bias"]


def test_a_file_that_shrinks_while_open_is_an_error_not_zeros(good: Path) -> None:
    lazy = LazySafetensors(good, load_dtype=torch.float32)
    assert lazy["a.weight"].sum() > 0  # the file is open now, and stays open between reads
    data = good.read_bytes()
    good.write_bytes(data[:-200])
    with pytest.raises(ConfigError, match="truncated while in use"):
        lazy["b.bias"]
    lazy.release()


def test_load_dtype_reads_floating_point_tensors_converted_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    half = torch.randn(70, 33).to(torch.float16)
    small = torch.randn(5).to(torch.bfloat16)
    save_file({"big": half, "small": small, "ids": torch.arange(7), "f32": torch.ones(3)}, str(path))
    lazy = LazySafetensors(path, load_dtype=torch.float32)
    for _ in range(2):  # the second pass reads through the reused scratch buffer of the first
        assert lazy["big"].dtype == torch.float32 and torch.equal(lazy["big"], half.float())
        assert lazy["small"].dtype == torch.float32 and torch.equal(lazy["small"], small.float())
    assert lazy["ids"].dtype == torch.int64 and torch.equal(lazy["ids"], torch.arange(7))  # integers untouched
    big = lazy["big"]
    assert torch.equal(lazy["small"], small.float()) and torch.equal(big, half.float()), "no tensor shares the scratch"
    lazy.release()
    assert torch.equal(lazy["f32"], torch.ones(3)), "reading after release() reopens the file"
    lazy.release()
    assert LazySafetensors(path)["big"].dtype == torch.float16, "without load_dtype, the file's own dtype"


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.5, 0.99])
def test_the_trainer_refuses_a_half_downloaded_base_model_with_a_config_error(
        tiny_checkpoint: Path, tmp_path: Path, fraction: float) -> None:
    broken = cut_copy(tiny_checkpoint, tmp_path / f"sd15 cut {fraction}.safetensors", fraction)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "pretrained_model": str(broken), "instance_data_dir": str(DREAMBENCH_DIR / "dog"),
        "instance_prompt": "a photo of qzx dog", "output_dir": str(tmp_path / "out"), "resolution": 64,
        "max_train_steps": 2, "cache_dir": str(tmp_path / "cache")}), encoding="utf-8")
    proc = subprocess.run(trainer_command(str(config)), capture_output=True, text=True, encoding="utf-8",
                          env=child_env(), timeout=300, check=False)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == protocol.EXIT_CONFIG, proc.stderr[-3000:]
    error = events[-1]
    assert error["type"] == "error" and error["kind"] == "config" and error["key"] == "pretrained_model"
    assert str(broken) in error["message"] and "the download is incomplete" in error["message"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.safetensors")), \
        "no LoRA from a broken model"


def cut_copy(src: Path, dst: Path, fraction: float) -> Path:
    size = src.stat().st_size
    with src.open("rb") as fin, dst.open("wb") as fout:
        remaining = int(size * fraction)
        while remaining:
            chunk = fin.read(min(remaining, 1 << 24))
            fout.write(chunk)
            remaining -= len(chunk)
    return dst
