"""Where the trainer runs: Windows file rules, stopping (commands and Ctrl-C) and captions.

Windows and FAT/network-share behaviour cannot run on this Linux machine: the file helpers take the
operation they wrap as a parameter, and these tests inject the failures those systems produce
(a sharing violation on replace, EPERM/ENOTSUP/EXDEV from ``os.link``). Stopping is tested on the
real engine with the tiny checkpoint: a stop during class-image generation and SIGINT mid-training.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_dreambooth_lora.trainer import data, fileio, lora, protocol
from comfyui_dreambooth_lora.trainer.config import TrainConfig
from dreambooth_test_support.paths import child_env
from dreambooth_test_support.training import copy_dog_photos
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


# --- hashing ------------------------------------------------------------------------------------
def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    blob = os.urandom((1 << 20) * 2 + 12345)  # two full chunks and a partial one
    path = tmp_path / "model file.bin"
    path.write_bytes(blob)
    assert fileio.sha256_file(path) == hashlib.sha256(blob).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert fileio.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_no_trainer_module_uses_python_311_only_file_digest() -> None:
    offenders = [p.name for p in (REPO / "trainer").glob("*.py") if "file_digest(" in p.read_text(encoding="utf-8")]
    assert offenders == [], f"hashlib.file_digest is Python 3.11+ only; use fileio.sha256_file in {offenders}"


# --- long paths ---------------------------------------------------------------------------------
def test_long_path_is_a_no_op_off_windows() -> None:
    long = "/data/" + "x" * 300 + "/lora.safetensors"
    assert fileio.long_path(long, windows=False) == long
    assert fileio.long_path(Path(long), windows=False) == long
    if sys.platform != "win32":
        assert fileio.long_path(long) == long  # the running OS decides by default


def test_long_path_prefixes_long_windows_paths_only() -> None:
    short = "C:\\ComfyUI\\models\\loras\\dog.safetensors"
    assert fileio.long_path(short, windows=True) == short
    deep = "C:\\ComfyUI\\output\\" + "\\".join(["folder"] * 40) + "\\lora.safetensors"
    assert len(deep) >= fileio.WINDOWS_MAX_PATH
    assert fileio.long_path(deep, windows=True) == "\\\\?\\" + deep
    # The prefix turns off Windows' own normalisation, so separators and '..' are resolved first.
    messy = "C:/ComfyUI/output/" + "/".join(["folder"] * 40) + "/../lora.safetensors"
    expected = "\\\\?\\C:\\ComfyUI\\output\\" + "\\".join(["folder"] * 39) + "\\lora.safetensors"
    assert fileio.long_path(messy, windows=True) == expected
    unc = "\\\\nas\\share\\" + "\\".join(["folder"] * 40) + "\\lora.safetensors"
    assert fileio.long_path(unc, windows=True) == "\\\\?\\UNC\\nas\\share\\" + unc[len("\\\\nas\\share\\"):]
    already = "\\\\?\\" + deep
    assert fileio.long_path(already, windows=True) == already
    relative = "\\".join(["folder"] * 50)
    assert fileio.long_path(relative, windows=True) == relative  # cannot carry the prefix


# --- replacing a file another program holds open ------------------------------------------------
class FlakyReplace:
    """os.replace that fails with a Windows sharing violation ``failures`` times, then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, src: str, dst: str) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise PermissionError(errno.EACCES, "The process cannot access the file because it is being used "
                                  "by another process", dst)
        os.replace(src, dst)


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"lora_unet_x.lora_down.weight": torch.full((2, 2), value)}


def test_lora_replace_retries_while_the_file_is_held_open(tmp_path: Path) -> None:
    target = tmp_path / "my lora.safetensors"
    lora.write_safetensors_atomic(_tensors(1.0), target, {}, overwrite=False)
    flaky = FlakyReplace(failures=3)
    lora.write_safetensors_atomic(_tensors(2.0), target, {}, overwrite=True, replace=flaky, replace_attempts=5,
                                  replace_delay_s=0.0)
    assert flaky.calls == 4
    assert torch.equal(load_file(str(target))["lora_unet_x.lora_down.weight"], torch.full((2, 2), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my lora.safetensors"]  # no temp file left


def test_lora_replace_gives_up_with_a_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    target = tmp_path / "my lora.safetensors"
    lora.write_safetensors_atomic(_tensors(1.0), target, {}, overwrite=False)
    old_bytes = target.read_bytes()
    flaky = FlakyReplace(failures=100)
    sleeps: list[float] = []
    with pytest.raises(fileio.FileInUseError) as info:
        fileio.replace_with_retry(tmp_path / "missing", target, replace=flaky, attempts=4, delay_s=0.25,
                                  sleep=sleeps.append)
    assert flaky.calls == 4 and sleeps == [0.25, 0.25, 0.25]  # bounded: no sleep after the last try
    with pytest.raises(fileio.FileInUseError) as info:
        lora.write_safetensors_atomic(_tensors(2.0), target, {}, overwrite=True, replace=FlakyReplace(100),
                                      replace_attempts=3, replace_delay_s=0.0)
    message = str(info.value)
    assert str(target) in message and "another program" in message and "ComfyUI" in message
    assert target.read_bytes() == old_bytes, "the old LoRA must be unchanged"
    kept = [p for p in tmp_path.iterdir() if p.name != target.name]
    assert len(kept) == 1 and str(kept[0]) in message, "the new LoRA must survive and be named"
    assert torch.equal(load_file(str(kept[0]))["lora_unet_x.lora_down.weight"], torch.full((2, 2), 2.0))


def test_a_permission_error_that_is_not_transient_is_not_mistaken_for_success(tmp_path: Path) -> None:
    def refuse(src: str, dst: str) -> None:
        raise IsADirectoryError(errno.EISDIR, "Is a directory", dst)

    with pytest.raises(IsADirectoryError):  # only PermissionError is retried; other errors surface at once
        fileio.replace_with_retry(tmp_path / "a", tmp_path / "b", replace=refuse, attempts=3, delay_s=0.0)


# --- the no-clobber save where hard links do not exist -----------------------------------------
@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EACCES])
def test_no_clobber_falls_back_to_an_exclusive_create(tmp_path: Path, code: int) -> None:
    calls = []

    def no_links(src: str, dst: str) -> None:  # what FAT/exFAT, some SMB shares and cross-device paths say
        calls.append(dst)
        raise OSError(code, os.strerror(code), src, None, dst)

    target = tmp_path / "new lora.safetensors"
    lora.write_safetensors_atomic(_tensors(3.0), target, {"k": "v"}, overwrite=False, link=no_links)
    assert calls, "the hard link is tried first"
    assert torch.equal(load_file(str(target))["lora_unet_x.lora_down.weight"], torch.full((2, 2), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new lora.safetensors"]
    # The fallback still never replaces an existing file.
    before = target.read_bytes()
    with pytest.raises(FileExistsError):
        lora.write_safetensors_atomic(_tensors(4.0), target, {}, overwrite=False, link=no_links)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new lora.safetensors"]


def test_no_clobber_link_refusing_an_existing_file_is_not_retried_as_a_copy(tmp_path: Path) -> None:
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"precious")
    src = tmp_path / "src"
    src.write_bytes(b"new")
    with pytest.raises(FileExistsError):
        fileio.create_no_clobber(src, target)  # the real os.link
    assert target.read_bytes() == b"precious"


def test_no_clobber_copy_that_fails_half_way_removes_its_partial_file(tmp_path: Path) -> None:
    def no_links(src: str, dst: str) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    target = tmp_path / "lora.safetensors"
    with pytest.raises(FileNotFoundError):
        fileio.create_no_clobber(tmp_path / "missing source", target, link=no_links)
    assert not target.exists()


# --- captions written on Windows ----------------------------------------------------------------
def test_captions_with_bom_and_crlf_read_like_unix_ones(tmp_path: Path) -> None:
    unix, windows, old_mac = tmp_path / "unix", tmp_path / "windows", tmp_path / "old mac"
    for folder in (unix, windows, old_mac):
        folder.mkdir()
        Image.new("RGB", (32, 32), (120, 30, 200)).save(folder / "a.png")
    (unix / "a.txt").write_bytes(b"a photo of sks dog\nsitting on grass\n")
    (windows / "a.txt").write_bytes("\ufeffa photo of sks dog\r\nsitting on grass\r\n".encode())
    (old_mac / "a.txt").write_bytes(b"a photo of sks dog\rsitting on grass\r")
    captions = [data.scan_image_folder(f)[0].caption for f in (unix, windows, old_mac)]
    assert captions == ["a photo of sks dog\nsitting on grass"] * 3
    fingerprints = {data.dataset_fingerprint(data.scan_image_folder(f)) for f in (unix, windows, old_mac)}
    assert len(fingerprints) == 1, "the same caption saved by another OS is the same dataset"


# --- stopping -----------------------------------------------------------------------------------
def test_interrupt_handler_first_stops_second_aborts() -> None:
    saved = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGINT", "SIGBREAK") if hasattr(signal, name)}
    commands = protocol.Commands()
    try:
        assert protocol.install_interrupt_handler(commands)
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler)
        handler(signal.SIGINT, None)
        assert commands.stop.is_set(), "the first Ctrl-C asks for a graceful stop"
        commands.take("stop")  # the loop took it and is saving
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    finally:
        for name, previous in saved.items():
            signal.signal(getattr(signal, name), previous)


def test_interrupt_handler_is_not_installed_off_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGINT)
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(protocol.install_interrupt_handler(protocol.Commands())))
    thread.start()
    thread.join()
    assert results == [False] and signal.getsignal(signal.SIGINT) is before


def test_check_stop_raises_and_leaves_the_flag_for_the_loop() -> None:
    commands = protocol.Commands()
    commands.check_stop()  # nothing pending: no error
    commands.stop.set()
    with pytest.raises(protocol.StopRequested):
        commands.check_stop()
    assert commands.stop.is_set()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_dog_photos(tmp_path_factory.mktemp("dog photos"))


def _spawn(values: dict[str, Any], tmp_path: Path) -> subprocess.Popen[str]:
    config = TrainConfig.from_dict(values)
    path = tmp_path / "run config.json"
    path.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(path)], cwd=REPO, env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8")


def _base_values(ckpt: Path, photos: Path, out: Path) -> dict[str, Any]:
    return {"pretrained_model": str(ckpt), "instance_data_dir": str(photos), "instance_prompt": "a photo of qzx dog",
            "output_dir": str(out), "resolution": 64, "rank": 4, "alpha": 2, "train_text_encoder": False,
            "cache_dir": str(out / "cache"), "save_precision": "fp32"}


def test_stop_during_class_image_generation_ends_promptly(tiny_checkpoint: Path, photos: Path,
                                                          tmp_path: Path) -> None:
    values = _base_values(tiny_checkpoint, photos, tmp_path / "run")
    # Enough class images to take minutes: the stop must not wait for them.
    values.update(with_prior_preservation=True, class_prompt="a photo of dog", num_class_images=200,
                  class_generation_steps=20, max_train_steps=5)
    proc = _spawn(values, tmp_path)
    assert proc.stdout is not None and proc.stdin is not None
    events = []
    stopped_at = None
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["type"] == "progress" and events[-1].get("phase") == "class_images":
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            stopped_at = time.monotonic()
            break
    assert stopped_at is not None, f"no class-image progress: {events[-3:]} {proc.stderr.read()[-2000:] if proc.stderr else ''}"
    rest = [json.loads(line) for line in proc.stdout]
    code = proc.wait(timeout=60)
    elapsed = time.monotonic() - stopped_at
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == protocol.EXIT_STOPPED, stderr[-3000:]
    assert elapsed < 10, f"stop took {elapsed:.1f} s"
    assert "Traceback" not in stderr, stderr[-3000:]
    done = rest[-1]
    assert done["type"] == "done" and done["status"] == "stopped" and done["step"] == 0
    made = [e for e in events + rest if e["type"] == "progress" and e.get("phase") == "class_images"]
    assert made and made[-1]["step"] < 10, "generation went on after the stop"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal delivery; Windows consoles send CTRL_C_EVENT")
def test_ctrl_c_mid_training_saves_a_checkpoint(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    values = _base_values(tiny_checkpoint, photos, tmp_path / "run")
    values.update(max_train_steps=500)
    proc = _spawn(values, tmp_path)
    assert proc.stdout is not None
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["type"] == "metrics" and events[-1]["step"] >= 2:
            proc.send_signal(signal.SIGINT)
            break
    rest = [json.loads(line) for line in proc.stdout]
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == protocol.EXIT_STOPPED, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupt received" in stderr, stderr[-3000:]
    done = rest[-1]
    assert done["type"] == "done" and done["status"] == "stopped" and 2 <= done["step"] < 500
    checkpoint = Path(done["lora_path"]).parent
    assert checkpoint.parent.name == "checkpoints" and (checkpoint / "state.json").is_file()
    assert json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))["step"] == done["step"]
    assert any(k.startswith("lora_unet_") for k in load_file(str(checkpoint / "lora.safetensors")))
