"""File operations that behave the same on Linux, macOS and Windows: hashing, long paths, the
no-clobber create, replacing a file another program holds open, and room on the disk for a file.

Standard library only (no torch), so every module of the engine can import it. The platform-specific
parts take the operation they wrap as a parameter: tests on Linux inject the failures Windows,
FAT/exFAT drives and network shares produce, instead of patching ``os`` globally.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import ntpath
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20

# Windows' classic path limit (MAX_PATH) is 260 characters including the terminating NUL; paths
# longer than that only open with the extended-length prefix unless the user enabled long paths.
WINDOWS_MAX_PATH = 260
_EXTENDED_PREFIX = "\\\\?\\"

# Replacing a file ComfyUI (or a viewer, an antivirus scan, a sync client) holds open fails on
# Windows with a sharing violation, reported as PermissionError; such holds are usually brief.
REPLACE_ATTEMPTS = 10
REPLACE_DELAY_S = 0.5


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (hashlib.file_digest is Python 3.11+ only)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def long_path(path: str | os.PathLike[str], *, windows: bool | None = None) -> str:
    """``path`` in a form the OS opens even when it is longer than Windows' MAX_PATH.

    On Windows, an absolute path of MAX_PATH characters or more gets the extended-length prefix
    (``\\\\?\\C:\\...`` or ``\\\\?\\UNC\\server\\share\\...``); that prefix turns off Windows' own
    normalisation, so the path is normalised here first (separators, ``.`` and ``..``). Short,
    relative or already-prefixed paths are returned unchanged, and everywhere else this is a no-op.
    ``windows`` defaults to the running OS; tests pass it to check the Windows rules on any OS.
    """
    text = os.fspath(path)
    if windows is None:
        windows = sys.platform == "win32"
    if not windows or len(text) < WINDOWS_MAX_PATH or text.startswith(_EXTENDED_PREFIX):
        return text
    if not ntpath.isabs(text):
        return text  # relative paths cannot carry the prefix; the caller resolves them first
    normal = ntpath.normpath(text)
    if normal.startswith("\\\\"):  # UNC: \\server\share\... -> \\?\UNC\server\share\...
        return _EXTENDED_PREFIX + "UNC\\" + normal[2:]
    return _EXTENDED_PREFIX + normal


# Room left free beyond the file itself: the file system's own bookkeeping, and the machine (ComfyUI's
# outputs, the OS) must keep working after the trainer has written. 2% of a small disk at most.
DISK_MARGIN_BYTES = 256 << 20
DISK_MARGIN_FRACTION = 0.02

# What a full disk looks like where the failing code gives no errno: safetensors' Rust writer
# ("I/O error: No space left on device (os error 28)") and Windows ("There is not enough space on the disk").
_DISK_FULL_WORDS = ("no space left on device", "os error 28", "not enough space on the disk")

DISK_FULL_ADVICE = ("free space on that disk and queue the training again: it resumes from its last checkpoint. "
                    "Checkpoints of earlier trainings (the checkpoints folder beside each LoRA's run) can go; "
                    "checkpoints_total_limit keeps fewer of them")


class DiskFullError(OSError):
    """The disk has no room for a file the run must write. ``strerror`` says what and where; str()
    adds what to do."""

    def __str__(self) -> str:
        return f"{self.strerror}; {DISK_FULL_ADVICE}"  # no "[Errno 28]" prefix


def disk_full_reason(exc: BaseException) -> str:
    """What a full-disk error says happened, without advice (for messages that give their own)."""
    return str(exc.strerror) if isinstance(exc, DiskFullError) else str(exc)


def size_text(size: float) -> str:
    """'9.80 GB' / '12 MB' / '340 KB': sizes as messages give them."""
    if size >= 2**30:
        return f"{size / 2**30:.2f} GB"
    return f"{size / 2**20:.0f} MB" if size >= 2**20 else f"{size / 2**10:.0f} KB"


def free_bytes(folder: str | os.PathLike[str], *, disk_usage: Callable[[str], Any] = shutil.disk_usage) -> int:
    """Free bytes on the disk that holds ``folder``; it need not exist yet (its nearest existing parent
    tells which disk)."""
    return int(_usage(folder, disk_usage).free)


def disk_margin(folder: str | os.PathLike[str], *, disk_usage: Callable[[str], Any] = shutil.disk_usage) -> int:
    """The room ``ensure_free_space`` keeps free on the disk that holds ``folder``."""
    return _margin(_usage(folder, disk_usage).total)


def _margin(disk_total: int) -> int:
    return min(DISK_MARGIN_BYTES, int(DISK_MARGIN_FRACTION * disk_total))


def _usage(folder: str | os.PathLike[str], disk_usage: Callable[[str], Any]) -> Any:
    probe = Path(os.path.abspath(folder))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return disk_usage(long_path(probe))


def ensure_free_space(folder: str | os.PathLike[str], needed_bytes: int, what: str, *,
                      disk_usage: Callable[[str], Any] = shutil.disk_usage) -> None:
    """Raise DiskFullError unless the disk holding ``folder`` has room for ``needed_bytes`` and a margin.

    Checked before a write, so a full disk is a clear message instead of a half-written file (and a
    crash that leaves gigabytes of temp files behind). ``folder`` need not exist yet: the nearest
    existing parent tells which disk. ``disk_usage`` is injectable for tests.
    """
    usage = _usage(folder, disk_usage)
    free, margin = int(usage.free), _margin(usage.total)
    if free >= needed_bytes + margin:
        return
    raise DiskFullError(
        errno.ENOSPC,
        f"not enough disk space to save {what} in {os.fspath(folder)}: it needs {size_text(needed_bytes)} (and "
        f"{size_text(margin)} kept free) but the disk has {size_text(free)} free. Nothing was written",
        os.fspath(folder),
    )


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk or an exhausted quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        if isinstance(exc, OSError) and getattr(exc, "winerror", None) in (39, 112):  # ERROR_HANDLE_DISK_FULL, ERROR_DISK_FULL
            return True
        if any(words in str(exc).lower() for words in _DISK_FULL_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class FileInUseError(PermissionError):
    """The destination stayed locked by another program through every retry."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message already names the file; no "[Errno 13]" prefix


def replace_with_retry(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                       replace: Callable[[str, str], None] = os.replace, attempts: int = REPLACE_ATTEMPTS,
                       delay_s: float = REPLACE_DELAY_S, sleep: Callable[[float], None] = time.sleep) -> None:
    """``os.replace(src, dst)``, retried while ``dst`` is held open by another program.

    Either the new file lands whole or nothing changes: ``dst`` keeps its old content and ``src``
    is left where it is, so the caller can point the user at it. After the last attempt this raises
    FileInUseError naming both files.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    src_s, dst_s = long_path(src), long_path(dst)
    for attempt in range(1, attempts + 1):
        try:
            replace(src_s, dst_s)
            if attempt > 1:
                logger.info("replaced %s on attempt %d", dst, attempt)
            return
        except PermissionError as exc:
            last = exc
            if attempt < attempts:
                logger.warning("%s is in use (%s); retrying in %.1f s (%d/%d)", dst, exc.strerror or exc,
                               delay_s, attempt, attempts)
                sleep(delay_s)
    raise FileInUseError(
        errno.EACCES,
        f"cannot replace {os.fspath(dst)}: another program holds it open or it is read-only "
        f"(tried {attempts} times over {delay_s * (attempts - 1):.0f} s; {last.strerror or last}). "
        "Close whatever uses it (ComfyUI with the LoRA loaded in a workflow, an image viewer, a sync or "
        f"antivirus tool), or choose another LoRA name. The old file is unchanged; the new one is kept "
        f"at {os.fspath(src)}",
        os.fspath(dst),
    ) from last


def create_no_clobber(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                      link: Callable[[str, str], None] = os.link) -> None:
    """Put a copy of finished file ``src`` at ``dst``, failing with FileExistsError if ``dst`` exists.

    A hard link is atomic: ``dst`` appears whole or not at all. FAT/exFAT drives, some network
    shares and cross-device paths refuse links (EPERM, ENOTSUP, EXDEV, ...); there an exclusive
    create (``O_EXCL``, which never replaces a file) plus a copy takes its place, and a copy that
    fails half-way removes the file it created.
    """
    src_s, dst_s = long_path(src), long_path(dst)
    try:
        link(src_s, dst_s)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        logger.info("hard links unavailable for %s (%s); writing it with an exclusive create instead",
                    dst, exc.strerror or exc)
    created = False
    try:
        with open(src_s, "rb") as source, open(dst_s, "xb") as target:
            created = True
            _copy_and_sync(source, target)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # must not hide the failure itself
                os.unlink(dst_s)
        raise


def _copy_and_sync(source: BinaryIO, target: BinaryIO) -> None:
    shutil.copyfileobj(source, target, _CHUNK)
    target.flush()
    os.fsync(target.fileno())

