"""Resumable checkpoints: LoRA weights, optimizer, LR schedule, RNG and position in the data.

A checkpoint is a folder ``checkpoints/step_000123`` written under a temporary name and renamed
into place, so a run killed mid-save never leaves a checkpoint that looks complete. Tensors are
safetensors; optimizer/scheduler state is read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
TENSORS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LORA_FILE = "lora.safetensors"


def signature_hash(signature: dict[str, Any], dataset_fingerprint: str) -> str:
    blob = json.dumps({"config": signature, "data": dataset_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    path: Path
    step: int
    signature: str


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    found = []
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    for child in root.iterdir():
        state = child / STATE_FILE
        if child.is_dir() and child.name.startswith("step_") and state.is_file():
            try:
                data = json.loads(state.read_text(encoding="utf-8"))
                found.append(Checkpoint(child, int(data["step"]), str(data["signature"])))
            except (OSError, ValueError, KeyError):
                logger.warning("ignoring unreadable checkpoint %s", child)
    return sorted(found, key=lambda c: c.step)


def save_checkpoint(output_dir: Path, *, step: int, signature: str, trainable: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], scheduler_state: dict[str, Any],
                    lora_tensors: dict[str, torch.Tensor], lora_metadata: dict[str, str],
                    keep: int, data_position: dict[str, int]) -> Path:
    """``data_position`` is informational (it follows from the step and the seed, which is what
    makes resume exact); it is recorded so a person can see where in the data the run was."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / TENSORS_FILE))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "torch_rng": torch.get_rng_state()},
               tmp / OPTIMIZER_FILE)
    save_file(lora_tensors, str(tmp / LORA_FILE), metadata=lora_metadata)
    state = {"step": step, "signature": signature, "data_position": data_position}
    (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _rotate(output_dir, keep)
    return final


def _rotate(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    trainable = load_file(str(path / TENSORS_FILE))
    extra = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return int(state["step"]), trainable, extra


def find_resume_checkpoint(output_dir: Path, resume: str, signature: str) -> Checkpoint | None:
    """The checkpoint to continue from, or None. Raises ValueError for an explicit bad path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"'{resume}' is not a checkpoint folder (no {STATE_FILE})")
        data = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if data.get("signature") != signature:
            raise ValueError(f"checkpoint '{resume}' was trained with different settings or data")
        return Checkpoint(path, int(data["step"]), signature)
    matching = [c for c in list_checkpoints(output_dir) if c.signature == signature]
    others = [c for c in list_checkpoints(output_dir) if c.signature != signature]
    if others and not matching:
        logger.warning("not resuming: the %d checkpoint(s) in %s were made with other settings or data",
                       len(others), checkpoint_root(output_dir))
    return matching[-1] if matching else None
