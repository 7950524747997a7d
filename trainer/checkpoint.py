"""Resumable checkpoints: LoRA weights, optimizer, LR schedule, RNG and position in the data.

A checkpoint is a folder ``checkpoints/step_000123`` written under a temporary name and renamed
into place, so a run killed mid-save never leaves a checkpoint that looks complete. Tensors are
safetensors; optimizer/scheduler state is read back with ``weights_only=True``. Its ``state.json``
records the training's identity (``identity.TrainingIdentity``): whether a checkpoint may continue a
run is decided there, not here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fileio import (
    DiskFullError,
    FileInUseError,
    ensure_free_space,
    free_bytes,
    is_disk_full,
    long_path,
    replace_with_retry,
)
from .identity import TrainingIdentity

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
TENSORS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LORA_FILE = "lora.safetensors"


@dataclass
class Checkpoint:
    path: Path
    step: int
    signature: str
    identity: TrainingIdentity | None = None  # None: written by a version that did not record it
    identity_error: str = ""  # why the recorded identity could not be read


@dataclass
class ResumeChoice:
    checkpoint: Checkpoint | None
    # Why the newest checkpoint(s) that were not taken cannot continue this training, for the user.
    passed_over: list[tuple[Checkpoint, str]]


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
                found.append(_read_state(child))
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning("ignoring unreadable checkpoint %s", child)
    return sorted(found, key=lambda c: c.step)


def _read_state(folder: Path) -> Checkpoint:
    data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    checkpoint = Checkpoint(folder, int(data["step"]), str(data.get("signature", "")))
    if "identity" in data:
        try:
            checkpoint.identity = TrainingIdentity.from_dict(data["identity"])
        except ValueError as exc:
            checkpoint.identity_error = str(exc)
    return checkpoint


def resume_problem(checkpoint: Checkpoint, identity: TrainingIdentity) -> str | None:
    """Why ``checkpoint`` cannot continue the training ``identity``; None when it can."""
    if checkpoint.identity is None:
        if checkpoint.identity_error:
            return f"its record of what it trained cannot be read ({checkpoint.identity_error})"
        return "it was saved by an older version of the trainer, which did not record what it trained"
    return identity.resume_problem(checkpoint.identity, checkpoint.step)


def capture_rng_state() -> dict[str, Any]:
    """The global generators a resumed run must continue: the CPU one and, once CUDA is in use, every
    GPU's (LoRA dropout on a GPU draws from the GPU generator)."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(extra: dict[str, Any], *, cuda_device_count: int | None = None,
                      set_cuda_state: Callable[[int, torch.Tensor], None] | None = None) -> list[str]:
    """Put back what ``capture_rng_state`` saved; returns warnings for states that cannot be restored.

    ``cuda_device_count`` and ``set_cuda_state(index, state)`` default to this machine's CUDA; tests
    pass their own to check the GPU branch on a CPU.
    """
    torch.set_rng_state(extra["torch_rng"])
    saved = extra.get("cuda_rng") or []
    if not saved:
        return []
    if cuda_device_count is None:
        cuda_device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if set_cuda_state is None:
        set_cuda_state = _set_cuda_rng_state
    if cuda_device_count == 0:
        return ["the checkpoint was made on a GPU and is resumed without one: training continues, but not "
                "bit-for-bit as the GPU run would have"]
    for index, state in enumerate(saved[:cuda_device_count]):
        set_cuda_state(index, state)
    if len(saved) != cuda_device_count:
        return [f"the checkpoint saved {len(saved)} GPU generator(s), this machine has {cuda_device_count}: "
                "the shared ones are restored"]
    return []


def _set_cuda_rng_state(index: int, state: torch.Tensor) -> None:
    torch.cuda.set_rng_state(state, device=index)


def restore_training_state(extra: dict[str, Any], *, optimizer: Any, scheduler: Any, scaler: Any | None) -> list[str]:
    """Optimizer, LR schedule, fp16 loss scale and generators from ``load_checkpoint``'s extra dict;
    returns warnings to show. The loss scale matters: starting it over at 65536 after a resume
    skips steps (inf gradients) that the uninterrupted run took."""
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    warnings = []
    saved_scaler = extra.get("grad_scaler")
    if scaler is not None and saved_scaler:
        scaler.load_state_dict(saved_scaler)
    elif scaler is not None:
        warnings.append("the checkpoint has no fp16 loss scale (it was not trained in fp16): loss scaling starts over")
    return warnings + restore_rng_state(extra)


def save_checkpoint(output_dir: Path, *, step: int, signature: str, trainable: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], scheduler_state: dict[str, Any],
                    lora_tensors: dict[str, torch.Tensor] | None, lora_metadata: dict[str, str],
                    keep: int, data_position: dict[str, int], scaler_state: dict[str, Any] | None = None,
                    rng_state: dict[str, Any] | None = None, identity: TrainingIdentity | None = None) -> Path:
    """``data_position`` is informational (it follows from the step and the seed, which is what
    makes resume exact); it is recorded so a person can see where in the data the run was.
    ``rng_state`` defaults to ``capture_rng_state()`` now. ``identity`` is what a later run compares
    with to decide whether this checkpoint continues it; without it the checkpoint is never resumed."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.{os.getpid()}.tmp"
    shutil.rmtree(long_path(tmp), ignore_errors=True)
    needed = _tensor_bytes(trainable) + _tensor_bytes(optimizer_state) + _tensor_bytes(lora_tensors)
    try:
        ensure_free_space(root, needed, f"the checkpoint of step {step}")
    except DiskFullError:
        # The checkpoints the rotation deletes after this save, deleted first: a disk that holds `keep`
        # checkpoints but not one more would otherwise skip every checkpoint from here on. Only while
        # a newer one of this training stays, should this save fail after all.
        victims, kept = _rotation(output_dir, keep, final, identity)
        if not victims or not kept:
            raise
        for old in victims:
            logger.info("removing %s before saving step %d, to make room (the rotation removes it after)",
                        old.path.name, step)
            shutil.rmtree(long_path(old.path), ignore_errors=True)
        ensure_free_space(root, needed, f"the checkpoint of step {step}")
    Path(long_path(tmp)).mkdir(parents=True)
    filled_up: str | None = None
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, long_path(tmp / TENSORS_FILE))
        extra: dict[str, Any] = {"optimizer": optimizer_state, "scheduler": scheduler_state,
                                 **(rng_state if rng_state is not None else capture_rng_state())}
        if scaler_state:
            extra["grad_scaler"] = scaler_state
        torch.save(extra, long_path(tmp / OPTIMIZER_FILE))
        if lora_tensors is not None:  # None: a full fine-tune, whose weights are all in TENSORS_FILE
            save_file(lora_tensors, long_path(tmp / LORA_FILE), metadata=lora_metadata)
        state: dict[str, Any] = {"step": step, "signature": signature, "data_position": data_position}
        if identity is not None:
            state["identity"] = identity.to_dict()
        Path(long_path(tmp / STATE_FILE)).write_text(json.dumps(state), encoding="utf-8")
    except BaseException as exc:
        # torch.save on a full disk says only "unexpected pos ..." or "file write failed": the free
        # space tells (the half-written file, still open, holds what there was).
        unnamed_full_disk = (isinstance(exc, Exception) and not is_disk_full(exc)
                             and free_bytes(root) < FULL_BELOW_BYTES)
        if not unnamed_full_disk:
            # A half-written checkpoint is never resumed (it has no state file); on a full disk its
            # gigabytes are what the user must get back, so it goes at once.
            shutil.rmtree(long_path(tmp), ignore_errors=True)
            raise
        filled_up = str(exc)
    if filled_up is not None:
        # Out here the failed save's traceback is gone, and with it torch's writer and its open file:
        # only now does removing the file give its space back (and Windows allow removing it at all).
        shutil.rmtree(long_path(tmp), ignore_errors=True)
        raise DiskFullError(errno.ENOSPC, f"the disk holding {root} filled up while the checkpoint of step {step} "
                            f"was saved ({filled_up}); the half-written checkpoint was removed", str(root))
    if final.exists():
        _move_aside(final, root / f".old_step_{step:06d}.{os.getpid()}.tmp")
    replace_with_retry(tmp, final)
    _rotate(output_dir, keep, final, identity)
    return final


# Free space below which a failed write is taken for a full disk: a few file-system blocks and buffers.
FULL_BELOW_BYTES = 16 << 20


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) state dict: what saving it writes, give or take headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _move_aside(folder: Path, trash: Path) -> None:
    """Get an earlier save of the same step out of the way. Windows refuses while another program
    holds one of its files open (e.g. its LoRA loaded in ComfyUI): retried, then a clear error."""
    try:
        replace_with_retry(folder, trash, replace=os.rename)
    except FileInUseError as exc:
        raise FileInUseError(exc.errno, f"cannot replace the checkpoint {folder}: another program holds a file "
                             "in it open (ComfyUI with its LoRA loaded, a file browser preview, a sync or antivirus "
                             "tool); close it and save again", str(folder)) from exc
    shutil.rmtree(long_path(trash), ignore_errors=True)


def _rotate(output_dir: Path, keep: int, saved: Path, identity: TrainingIdentity | None) -> None:
    """Keep the checkpoint just saved and the newest ``keep - 1`` others of the same training.

    Checkpoints of other trainings in the folder (other settings, or a schedule laid out for another
    step count) are not this run's to delete: going back to those settings still resumes. And the one
    just saved never goes, even when a longer earlier run left checkpoints at higher steps.
    """
    for old in _rotation(output_dir, keep, saved, identity)[0]:
        shutil.rmtree(old.path, ignore_errors=True)


def _rotation(output_dir: Path, keep: int, saved: Path,
              identity: TrainingIdentity | None) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """(what ``_rotate`` deletes once ``saved`` is written, the others of this training it keeps)."""
    if keep <= 0:
        return [], []

    def same(c: Checkpoint) -> bool:
        if identity is None or c.identity is None:
            return identity is None and c.identity is None
        return identity.same_trajectory(c.identity)

    others = [c for c in list_checkpoints(output_dir) if c.path != saved and same(c)]
    cut = max(0, len(others) - (keep - 1))
    return others[:cut], others[cut:]


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    trainable = load_file(long_path(path / TENSORS_FILE))
    extra = torch.load(long_path(path / OPTIMIZER_FILE), map_location="cpu", weights_only=True)
    return int(state["step"]), trainable, extra


def find_resume_checkpoint(output_dir: Path, resume: str, identity: TrainingIdentity) -> ResumeChoice:
    """The newest checkpoint that continues the training ``identity`` (``resume`` 'auto'), the one
    named by ``resume``, or none; with the reasons the newer ones were passed over.

    Raises ValueError when an explicitly named checkpoint cannot be read or cannot continue it.
    """
    if resume == "none":
        return ResumeChoice(None, [])
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"'{resume}' is not a checkpoint folder (no {STATE_FILE})")
        try:
            named = _read_state(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint '{resume}' cannot be read ({exc})") from exc
        problem = resume_problem(named, identity)
        if problem:
            raise ValueError(f"checkpoint '{resume}' cannot continue this training: {problem}")
        return ResumeChoice(named, [])
    passed_over: list[tuple[Checkpoint, str]] = []
    for candidate in reversed(list_checkpoints(output_dir)):
        problem = resume_problem(candidate, identity)
        if problem is None:
            return ResumeChoice(candidate, passed_over)
        passed_over.append((candidate, problem))
    return ResumeChoice(None, passed_over)
