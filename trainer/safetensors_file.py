"""Strict reading of ``.safetensors`` files: a broken file is an error that says what is wrong.

A half-downloaded checkpoint is the most common broken input there is, and a reader that trusts the
header reads the missing tensors back as zeros: training then "works" and writes a useless LoRA.
Everything here is checked against the file's real size *before* any tensor is read, the way the
``safetensors`` library itself checks it:

- the 8-byte header length fits in the file, the header is a JSON object of tensor entries;
- every entry has a known dtype, a shape of non-negative integers and ``data_offsets`` whose length
  is exactly ``prod(shape) * itemsize``;
- the tensors' bytes end exactly where the file ends (a shorter file is an incomplete download).

ComfyUI-free and torch-free, so the node layer can check a LoRA, ControlNet or annotator file
before it hands the file to a library whose own error would not name the setting.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# Bytes per element; the names are the format's own.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class SafetensorsFileError(ValueError):
    """The file is not a complete, well-formed .safetensors file. ``str()`` says what and how to fix it."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}. {fix}")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset into the data section, which starts right after the header
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # 8 + header length: where tensor bytes begin in the file
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int


def human_size(n: int) -> str:
    """Bytes in the units a user sees in a file browser (decimal, one decimal place)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


_REDOWNLOAD = "Download the file again (the download is incomplete or the file is damaged)"


def _not_safetensors(path: Path, first: bytes) -> SafetensorsFileError:
    stripped = first.lstrip().lower()
    if stripped.startswith(b"<"):
        return SafetensorsFileError(
            path, "is a web page, not a model: an error or login page was saved instead of the file",
            "Download the file again from its page (some sites need you to log in first)")
    if first.startswith(b"PK\x03\x04") or first.startswith(b"\x80"):
        return SafetensorsFileError(
            path, "is a PyTorch pickle (.ckpt/.pt) named .safetensors",
            "Rename it to .ckpt, or better, use the .safetensors version of the model")
    if stripped.startswith(b"version https://git-lfs"):
        return SafetensorsFileError(
            path, "is a Git LFS pointer (a small text file), not the model's weights",
            "Download the real file (git lfs pull, or the download button of the model's page)")
    return SafetensorsFileError(path, "is not a .safetensors file (its header is not valid)", _REDOWNLOAD)


def read_header(path: Path) -> SafetensorsHeader:
    """Read and check the header and the file size. Raises SafetensorsFileError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if size == 0:
                raise SafetensorsFileError(path, "is empty (0 bytes)", _REDOWNLOAD)
            if len(head) < 8:
                raise SafetensorsFileError(path, f"is only {size} bytes long, too short for a model", _REDOWNLOAD)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or header_len < 2:
                raise _not_safetensors(path, head + fh.read(56))
            if 8 + header_len > size:
                raise SafetensorsFileError(
                    path, f"ends at {human_size(size)} inside its own header ({human_size(8 + header_len)})",
                    _REDOWNLOAD)
            raw = fh.read(header_len)
    except OSError as exc:
        raise SafetensorsFileError(path, f"cannot be read ({exc.strerror or exc})",
                                   "Check that the file exists and that you may read it") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_safetensors(path, head + raw[:56]) from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, head + raw[:56])
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsFileError(path, "has a damaged header (__metadata__ is not a table)", _REDOWNLOAD)
    tensors = {name: _entry(path, name, value) for name, value in header.items()}
    data_start = 8 + header_len
    _check_layout(path, tensors, data_size=size - data_start, file_size=size, data_start=data_start)
    return SafetensorsHeader(path, data_start, tensors, {str(k): str(v) for k, v in metadata.items()}, size)


def _entry(path: Path, name: str, value: Any) -> TensorEntry:
    def damaged(why: str) -> SafetensorsFileError:
        return SafetensorsFileError(path, f"has a damaged header: tensor {name!r} {why}", _REDOWNLOAD)

    if not isinstance(value, dict):
        raise damaged("is not described by a table")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise damaged(f"has an unknown type {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise damaged(f"has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise damaged(f"has invalid data offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise damaged(f"claims {offsets[1] - offsets[0]} bytes but a {dtype} tensor of shape {shape} "
                      f"needs {expected}")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: Path, tensors: dict[str, TensorEntry], *, data_size: int, file_size: int,
                  data_start: int) -> None:
    needed = max((t.end for t in tensors.values()), default=0)
    if needed > data_size:
        raise SafetensorsFileError(
            path, f"ends at {human_size(file_size)}, its tensors need {human_size(data_start + needed)}: "
            "the download is incomplete", "Download the file again and wait until it has finished")
    if needed < data_size:
        raise SafetensorsFileError(
            path, f"has {data_size - needed} bytes after its last tensor (expected {human_size(data_start + needed)}, "
            f"the file is {human_size(file_size)})", _REDOWNLOAD)
    # Overlapping tensors would make two weights share bytes: a damaged or hand-made file.
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise SafetensorsFileError(path, f"has a damaged header: tensors {a!r} and {b!r} overlap",
                                       _REDOWNLOAD)


def read_tensor_bytes(header: SafetensorsHeader, name: str) -> bytearray:
    """The raw bytes of one tensor, read exactly (a file that shrank since its header was read is an error)."""
    entry = header.tensors[name]
    buffer = bytearray(entry.end - entry.begin)
    if buffer:
        try:
            with header.path.open("rb", buffering=0) as fh:
                read_tensor_into(header, name, fh, memoryview(buffer))
        except OSError as exc:
            raise _unreadable(header.path, exc) from exc
    return buffer


def read_tensor_into(header: SafetensorsHeader, name: str, fh: BinaryIO, out: memoryview) -> None:
    """Fill ``out`` (exactly the tensor's size) with the bytes of tensor ``name`` from the open file ``fh``.

    For readers that keep the file open and choose their buffers (no zero-filled copy per tensor);
    the same errors as read_tensor_bytes.
    """
    entry = header.tensors[name]
    size = entry.end - entry.begin
    if out.nbytes != size:
        raise ValueError(f"buffer of {out.nbytes} bytes for tensor {name!r} of {size}")
    out = out.cast("B")
    got = 0
    try:
        fh.seek(header.data_start + entry.begin)
        while got < size:  # an unbuffered read may return fewer bytes than asked for
            n = fh.readinto(out[got:])
            if not n:
                break
            got += n
    except OSError as exc:
        raise _unreadable(header.path, exc) from exc
    if got != size:
        raise SafetensorsFileError(
            header.path, f"ended while reading tensor {name!r} ({got} of {size} bytes): it changed or "
            "was truncated while in use", _REDOWNLOAD)


def _unreadable(path: Path, exc: OSError) -> SafetensorsFileError:
    return SafetensorsFileError(path, f"cannot be read ({exc.strerror or exc})",
                                "Check that the file is still there and readable")
