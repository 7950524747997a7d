"""Small real disks for the full-disk tests: a tmpfs mounted for the test (Linux, as root, which CI is).

Elsewhere the tests that need one are reported as skipped, with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from comfyui_dreambooth_lora.trainer import fileio


def mount_small_disk(path: Path, size_mb: int) -> None:
    """Mount a ``size_mb`` MB tmpfs at ``path`` (made if missing); skip the test where that cannot be done."""
    path.mkdir(parents=True, exist_ok=True)
    why = "mounting a tmpfs needs Linux and root"
    if sys.platform.startswith("linux") and hasattr(os, "geteuid") and os.geteuid() == 0:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        why = f"mount -t tmpfs failed: {proc.stderr.strip()}"
    pytest.skip(f"no small disk to fill ({why}); the full-disk checks did not run")


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """A file that leaves ``leave_bytes`` free on ``disk`` beyond the margin the trainer keeps free."""
    filler = disk / "filler.bin"
    size = fileio.free_bytes(disk) - fileio.disk_margin(disk) - leave_bytes
    with open(filler, "wb") as handle:
        handle.write(b"\0" * size)
    return filler
