"""A full disk: a save with no room is refused before anything is written, a disk that fills up mid-save
leaves no half-written files behind, and the messages name the folder, the sizes and what to do, never
a bare "unexpected pos 576 vs 534". In a training, a checkpoint with no room is skipped with a warning
and the LoRA waits for room (the training is not thrown away); stopping while it waits ends the run
with its own exit code, the earlier LoRA untouched.

Real full disks: a small tmpfs mounted for the test (``dreambooth_test_support.disks``). The sizes the
checks compare are the real ones: tmpfs reports its own free space.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from comfyui_dreambooth_lora.trainer import checkpoint, fileio, lora, protocol
from comfyui_dreambooth_lora.trainer.__main__ import _error_kind
from dreambooth_test_support import disks
from dreambooth_test_support.paths import REPO_ROOT
from dreambooth_test_support.training import copy_dog_photos, make_config
from safetensors.torch import load_file, save_file


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB disk (tmpfs), unmounted after the test."""
    path = tmp_path / "small disk"
    disks.mount_small_disk(path, 2)
    yield path
    disks.unmount(path)


def _tensors(megabytes: float) -> dict[str, torch.Tensor]:
    return {"lora_unet_x.lora_down.weight": torch.ones(int(megabytes * 2**20 / 4))}


def test_no_room_is_refused_before_writing_naming_the_folder_and_sizes(tmp_path: Path) -> None:
    usage = SimpleNamespace(free=fileio.DISK_MARGIN_BYTES + 3 * 2**20, total=100 * 2**30)
    fileio.ensure_free_space(tmp_path, 3 * 2**20, "x", disk_usage=lambda _p: usage)  # fits exactly
    with pytest.raises(fileio.DiskFullError) as info:
        fileio.ensure_free_space(tmp_path / "not yet" / "made", 5 * 2**30, "the LoRA dog.safetensors",
                                 disk_usage=lambda _p: usage)
    message = str(info.value)
    assert message.startswith("not enough disk space to save the LoRA dog.safetensors in ")
    assert str(tmp_path / "not yet" / "made") in message
    assert "it needs 5.00 GB (and 256 MB kept free) but the disk has 259 MB free. Nothing was written" in message
    assert "resumes from its last checkpoint" in message and "checkpoints_total_limit" in message
    assert fileio.disk_full_reason(info.value).endswith("Nothing was written")  # the message, without advice
    assert info.value.errno == errno.ENOSPC and fileio.is_disk_full(info.value)
    assert not (tmp_path / "not yet").exists()


def test_a_small_disk_keeps_a_smaller_margin(tmp_path: Path) -> None:
    small = SimpleNamespace(free=10 * 2**20, total=100 * 2**20)
    assert fileio.disk_margin(tmp_path, disk_usage=lambda _p: small) == 2 * 2**20  # 2% of 100 MB
    fileio.ensure_free_space(tmp_path, 8 * 2**20, "x", disk_usage=lambda _p: small)
    with pytest.raises(fileio.DiskFullError, match=r"it needs 9 MB \(and 2 MB kept free\) but the disk has 10 MB"):
        fileio.ensure_free_space(tmp_path, 9 * 2**20, "x", disk_usage=lambda _p: small)


def test_free_space_of_a_folder_not_made_yet_is_its_disks(tmp_path: Path) -> None:
    asked: list[str] = []

    def usage(path: str) -> SimpleNamespace:
        asked.append(path)
        return SimpleNamespace(free=123)

    assert fileio.free_bytes(tmp_path / "a" / "b", disk_usage=usage) == 123
    assert asked == [str(tmp_path)]


def test_what_counts_as_a_full_disk() -> None:
    assert fileio.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert fileio.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert fileio.is_disk_full(outer)
    assert not fileio.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not fileio.is_disk_full(RuntimeError("unexpected pos 576 vs 534"))
    assert not fileio.is_disk_full(None)


def test_real_full_disk_errors_are_recognised_and_reported_as_disk(small_disk: Path) -> None:
    with pytest.raises(Exception) as from_safetensors:  # noqa: PT011 - safetensors' own error class
        save_file(_tensors(4), str(small_disk / "big.safetensors"))
    with pytest.raises(OSError) as from_python:
        (small_disk / "big.bin").write_bytes(b"x" * (4 * 2**20))
    for exc in (from_safetensors.value, from_python.value):
        assert fileio.is_disk_full(exc), repr(exc)
        kind, message, advice = _error_kind(exc)
        assert kind == "disk" and message.startswith("the disk is full") and "resumes from its last checkpoint" in advice
    assert protocol.ERROR_KINDS["disk"] == protocol.EXIT_DISK_FULL


def test_a_lora_that_does_not_fit_leaves_the_old_one_and_no_temp_file(small_disk: Path) -> None:
    good = small_disk / "dog.safetensors"
    save_file(_tensors(0.25), str(good))
    before = good.read_bytes()
    with pytest.raises(fileio.DiskFullError, match="not enough disk space to save dog.safetensors in "):
        lora.write_safetensors_atomic(_tensors(1.9), good, {}, overwrite=True)
    assert good.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["dog.safetensors"]


def test_a_checkpoint_that_fills_the_disk_is_removed_and_named(small_disk: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The optimizer state's Python lists are not tensors: the size check does not see them, so the save
    # starts and fills the disk for real, in torch.save, whose own error says nothing about disks.
    monkeypatch.setattr(fileio, "DISK_MARGIN_BYTES", 0)
    optimizer_state = {"state": {}, "param_groups": [{"lr": 1e-4, "history": list(range(400_000))}]}
    with pytest.raises(fileio.DiskFullError) as info:
        checkpoint.save_checkpoint(small_disk, step=7, signature="s", trainable=_tensors(0.25),
                                   optimizer_state=optimizer_state, scheduler_state={},
                                   lora_tensors=_tensors(0.25), lora_metadata={}, keep=2, data_position={})
    message = str(info.value)
    assert "filled up while the checkpoint of step 7 was saved" in message
    assert "the half-written checkpoint was removed" in message
    root = checkpoint.checkpoint_root(small_disk)
    assert [p for p in root.rglob("*") if p.is_file()] == [], "a half-written checkpoint stayed"
    assert fileio.free_bytes(small_disk) > 1.5 * 2**20  # its space is back


def _events_until(proc: subprocess.Popen[str], wanted: Callable[[dict[str, Any]], bool],
                  seen: list[dict[str, Any]]) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if wanted(event):
            return event
    raise AssertionError(f"the trainer ended without the awaited event; last events: {seen[-5:]}")


def _waiting(event: dict[str, Any]) -> bool:
    return event["type"] == "status" and event["message"].startswith("waiting for disk space: ")


@pytest.mark.parametrize("then", ["free space", "stop"])
def test_a_training_on_a_full_disk_skips_checkpoints_and_waits_to_save_its_lora(
        tiny_checkpoint: Path, tmp_path: Path, then: str) -> None:
    """A real training on a 64 MB disk (tmpfs) filled up to 4 KB short of the room the trainer keeps
    free. Its checkpoints are skipped with a warning; the LoRA waits. Freeing space lets it land; a
    stop instead ends the run with the disk exit code and the earlier LoRA untouched."""
    disk = tmp_path / "full disk"
    disks.mount_small_disk(disk, 64)
    proc: subprocess.Popen[str] | None = None
    try:
        config = make_config(tiny_checkpoint, copy_dog_photos(tmp_path / "photos"), disk / "run",
                             max_train_steps=2, checkpointing_steps=1, overwrite=True,
                             cache_dir=str(tmp_path / "cache"))
        lora_path = Path(config.output_path)
        lora_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(_tensors(0.01), str(lora_path))  # an earlier training's LoRA, kept if this one gives up
        before = lora_path.read_bytes()
        filler = disks.fill(disk, 4096)
        config_file = tmp_path / "run.json"
        config_file.write_text(json.dumps(config.to_dict()), encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(config_file)], cwd=REPO_ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                encoding="utf-8")
        assert proc.stdin is not None
        seen: list[dict[str, Any]] = []
        waiting = _events_until(proc, _waiting, seen)
        assert str(disk) in waiting["message"] and waiting["level"] == "warning" and waiting["waiting"] == "disk"
        assert "Nothing was written" in waiting["message"] and "stop the training to give up" in waiting["message"]
        # Said before the first step, not first when it happens.
        early = [i for i, e in enumerate(seen) if e["type"] == "status" and e["message"].startswith("the disk holding ")]
        first_step = next(i for i, e in enumerate(seen) if e["type"] == "metrics")
        assert len(early) == 2 and early[-1] < first_step, [e for e in seen if e["type"] == "status"]
        checkpoints, result = (seen[i]["message"] for i in early)
        assert checkpoints.startswith(f"the disk holding {disk / 'run' / 'checkpoints'} has ")
        assert "each checkpoint of this training needs about" in checkpoints and "cannot resume" in checkpoints
        assert f"and the LoRA {lora_path.name} of this training needs about " in result
        assert "it will wait for room when the training ends" in result
        skipped = [e["message"] for e in seen if e["type"] == "status" and " was skipped: " in e["message"]]
        assert [m.split(" was skipped")[0] for m in skipped] == ["the checkpoint of step 1", "the checkpoint of step 2"]
        assert all("cannot resume from this step" in m for m in skipped)
        assert not [e for e in seen if e["type"] == "checkpoint"]
        assert lora_path.read_bytes() == before  # nothing written while it waits
        if then == "free space":
            filler.unlink()
            done = _events_until(proc, lambda e: e["type"] in ("done", "error"), seen)
            assert proc.wait(timeout=60) == protocol.EXIT_OK and done["type"] == "done", done
            assert any(e["type"] == "status" and e["message"] == f"the LoRA {lora_path.name}: saved (the disk had "
                       "room again)" for e in seen)
            assert lora_path.read_bytes() != before and any(
                k.startswith("lora_unet_") for k in load_file(str(lora_path)))
        else:
            proc.stdin.write(json.dumps({"command": "stop"}) + "\n")
            proc.stdin.flush()
            error = _events_until(proc, lambda e: e["type"] in ("done", "error"), seen)
            assert proc.wait(timeout=60) == protocol.EXIT_DISK_FULL
            assert error["type"] == "error" and error["kind"] == "disk", error
            assert error["message"].startswith(f"not enough disk space to save {lora_path.name} in "), error
            assert "resumes from its last checkpoint" in error["message"]
            assert lora_path.read_bytes() == before
        leftovers = [p.name for p in disk.rglob("*") if p.is_file() and p.suffix == ".tmp"]
        assert leftovers == [], leftovers
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        disks.unmount(disk)


def test_the_node_says_the_trainer_ran_out_of_disk_space() -> None:
    from comfyui_dreambooth_lora.trainer.launcher import describe_exit

    error = {"kind": "disk", "message": "not enough disk space to save dog.safetensors in /x: ...", "advice": ""}
    assert describe_exit(protocol.EXIT_DISK_FULL, error, "log tail").startswith(
        "the trainer ran out of disk space: not enough disk space to save dog.safetensors in /x")


def _save(disk: Path, step: int, megabytes: float, keep: int) -> Path:
    return checkpoint.save_checkpoint(disk, step=step, signature="s", trainable=_tensors(megabytes),
                                      optimizer_state={}, scheduler_state={}, lora_tensors=_tensors(megabytes),
                                      lora_metadata={}, keep=keep, data_position={})


def _steps(disk: Path) -> list[int]:
    return [c.step for c in checkpoint.list_checkpoints(disk)]


def test_a_disk_that_holds_the_kept_checkpoints_but_not_one_more_keeps_rolling(small_disk: Path) -> None:
    """2 MB disk, checkpoints of ~0.7 MB, keep 2: the third fits only once the one the rotation drops
    anyway is gone, so it goes first."""
    _save(small_disk, 1, 0.35, keep=2)
    _save(small_disk, 2, 0.35, keep=2)
    assert _steps(small_disk) == [1, 2]
    _save(small_disk, 3, 0.35, keep=2)
    assert _steps(small_disk) == [2, 3]
    _save(small_disk, 4, 0.35, keep=2)
    assert _steps(small_disk) == [3, 4]


def test_the_only_checkpoint_is_never_removed_to_make_room(small_disk: Path) -> None:
    """keep 1: removing the one checkpoint first would leave none if the new save failed."""
    _save(small_disk, 1, 0.6, keep=1)
    with pytest.raises(fileio.DiskFullError, match="not enough disk space to save the checkpoint of step 2"):
        _save(small_disk, 2, 0.6, keep=1)
    assert _steps(small_disk) == [1]
