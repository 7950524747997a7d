"""Training images: find them, decode them safely, crop them, and order them reproducibly.

ComfyUI-free (Pillow, numpy, torch and the engine's own file helpers). Every problem with the user's files is
raised as `DataError`, whose message names the file and says how to fix it, so the node can show it
as is.

Folder layout (kohya-compatible):

    photos/
        a.jpg            repeats 1
        a.txt            caption of a.jpg (UTF-8, optional)
        10_dog/b.png     repeats 10 (folder name "N_name", N >= 1)
        extra/c.jpg      repeats 1 (subfolders not named "N_name" are still scanned)

Repeats come from the first-level subfolder only; deeper folders inherit it. Hidden files and
folders (".DS_Store", "._a.jpg" AppleDouble files, ".git/") are skipped, because macOS and zip tools
scatter them with image-looking names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from . import buckets as bucketing
from .buckets import Bucket, CropGeometry
from .fileio import sha256_file

logger = logging.getLogger(__name__)

# GIF is read like every multi-frame format (animated PNG/WebP, multi-page TIFF): its first frame, with a
# warning that says so.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# Files that normally sit beside training images and need no comment.
_QUIET_EXTENSIONS: frozenset[str] = frozenset({".txt", ".json", ".caption", ".md", ".toml", ".yaml", ".yml"})
_QUIET_NAMES: frozenset[str] = frozenset({"thumbs.db", "desktop.ini", "__macosx"})

_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")
# A folder such as "2023_holiday" also matches the kohya pattern; above this we say so.
_SUSPICIOUS_REPEATS = 100
_CROP_MODES = ("center", "random")
CROP_MODES = ("center", "random", "face")  # what the config and the dataset node offer
_SUPPORTED = ", ".join(sorted(IMAGE_EXTENSIONS))


class DataError(ValueError):
    """Bad user data; the message names the file and the fix."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str | None
    repeats: int


@dataclass
class PreparedImage:
    record: ImageRecord
    pixels: torch.Tensor  # CHW float32 in [-1, 1], the bucket's size (resolution x resolution without buckets)
    width: int  # original size, after EXIF orientation
    height: int
    geometry: CropGeometry  # where the crop came from (SDXL's size conditioning)
    warnings: list[str] = field(default_factory=list)

    @property
    def bucket(self) -> Bucket:
        """(width, height) the image trains at."""
        return self.geometry.target_size[1], self.geometry.target_size[0]

    def crop_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop in the original photo's pixels, rounded."""
        rh, rw = self.geometry.resized_size()
        top, left = self.geometry.crop_top_left
        th, tw = self.geometry.target_size
        sx, sy = self.width / rw, self.height / rh
        return round(left * sx), round(top * sy), round((left + tw) * sx), round((top + th) * sy)


# --------------------------------------------------------------------------------------------- scanning


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _QUIET_NAMES


def _read_caption(image_path: Path) -> str | None:
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file():
        return None
    try:
        # utf-8-sig: Windows Notepad writes a BOM that would otherwise start the caption. read_text
        # reads with universal newlines, so \r\n (Windows) and \r (old Mac) captions equal \n ones.
        text = caption_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"Caption file {caption_path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8 text.",
            caption_path,
        ) from exc
    except OSError as exc:
        raise DataError(f"Caption file {caption_path} cannot be read ({exc}); check its permissions.",
                        caption_path) from exc
    text = text.strip()
    return text or None


def _repeats_for(folder_name: str, folder: Path) -> int:
    match = _REPEATS_DIR.match(folder_name)
    if not match:
        return 1
    repeats = int(match.group(1))
    if repeats < 1:
        raise DataError(
            f"Folder {folder} asks for {repeats} repeats (kohya naming 'N_name'); N must be at least 1. "
            "Rename it, e.g. to '1_" + match.group(2) + "', or move it out of the images folder.",
            folder,
        )
    if repeats > _SUSPICIOUS_REPEATS:
        logger.warning(
            "Folder %s gives each of its images %d repeats (kohya naming 'N_name'); rename it if that "
            "number is part of its name rather than a repeat count.", folder, repeats)
    return repeats


def _empty_file_error(path: Path) -> DataError | None:
    try:
        empty = path.stat().st_size == 0
    except OSError:
        return None  # the open that follows names the real problem
    if not empty:
        return None
    return DataError(f"{path} is an empty file (0 bytes): the copy or download did not finish; copy the photo "
                     "again, or remove it.", path)


def _probe_image(path: Path, role: str) -> DataError | None:
    """Why a file whose name says image is not one (checked before any training starts), or None."""
    empty = _empty_file_error(path)
    if empty is not None:
        return empty
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                pass  # the header parsed: enough here; load_image does the full decode
    except Image.DecompressionBombError:
        return None  # a real image; load_image explains why it is refused
    except UnidentifiedImageError:
        return DataError(
            f"{path} has an image file name but is not an image that can be read; re-save it as JPEG or "
            f"PNG, or remove it from the {role} images folder.",
            path,
        )
    except OSError as exc:
        return DataError(f"{path} cannot be read ({exc}); check that it exists and is readable.", path)
    return None


@dataclass
class FolderScan:
    """What a folder holds: usable-looking images in training order, every file that is not usable
    (each with its cause), and the files skipped because they are not images at all."""

    folder: Path
    role: str
    records: list[ImageRecord]
    problems: list[DataError]
    skipped: list[str]  # paths relative to the folder, sorted

    def skipped_message(self) -> str | None:
        """One warning naming every skipped file, or None."""
        if not self.skipped:
            return None
        shown = ", ".join(self.skipped[:10]) + (f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10
                                                 else "")
        return (f"Ignoring {len(self.skipped)} file(s) in the {self.role} images folder {self.folder} that are not "
                f"images (supported: {_SUPPORTED}): {shown}")

    def raise_problems(self) -> None:
        if self.problems:
            raise combine_errors(self.problems, self.folder, self.role)


def combine_errors(errors: Sequence[DataError], folder: Path, role: str) -> DataError:
    """One DataError that names every unusable file with its cause (one error is returned as it is)."""
    if len(errors) == 1:
        return errors[0]
    ordered = sorted(errors, key=lambda e: str(e.path or ""))
    listing = "\n".join(f"- {exc}" for exc in ordered)
    return DataError(f"{len(errors)} images in the {role} images folder {folder} cannot be used; fix or remove "
                     f"all of them:\n{listing}", folder)


def scan_image_folder(folder: Path, *, role: str = "instance", limit: int | None = None) -> list[ImageRecord]:
    """All images under `folder`, sorted by relative path (same order on every OS and run).

    Top-level images get repeats 1; images in a first-level subfolder named "N_name" get repeats N;
    other subfolders are scanned with repeats 1. Captions come from a sidecar "<stem>.txt".
    Captions, JSON and hidden files are ignored silently; other unknown files with a warning.
    Every file that is not a usable image is named in one DataError. ``limit``: only the first N images.
    """
    scan = scan_folder(folder, role=role, limit=limit)
    message = scan.skipped_message()
    if message:
        logger.warning("%s", message)
    scan.raise_problems()
    return scan.records


def scan_folder(folder: Path, *, role: str = "instance", limit: int | None = None) -> FolderScan:
    """Like ``scan_image_folder``, but per-file problems and skipped files are returned, not raised or
    logged, so a caller can report them together with decoding problems. A missing folder or one
    without any image file is still raised."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"The {role} images folder {folder} does not exist; check the path.", folder)
    if not folder.is_dir():
        raise DataError(
            f"The {role} images path {folder} is a file, not a folder; give the folder that holds the images.",
            folder,
        )

    found: list[tuple[str, Path, int]] = []
    unknown: list[str] = []
    repeats_by_top: dict[str, int] = {}
    # os.walk without followlinks: a symlink loop must not hang the scan.
    for dirpath, dirnames, filenames in os.walk(folder, onerror=None, followlinks=False):
        current = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = current.relative_to(folder)
        repeats = 1
        if rel_dir.parts:
            top = rel_dir.parts[0]
            if top not in repeats_by_top:
                repeats_by_top[top] = _repeats_for(top, folder / top)
            repeats = repeats_by_top[top]
        for name in filenames:
            if _is_hidden(name):
                continue
            path = current / name
            suffix = path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                found.append(((rel_dir / name).as_posix(), path, repeats))
            elif suffix not in _QUIET_EXTENSIONS:
                unknown.append((rel_dir / name).as_posix())

    if not found:
        raise DataError(
            f"The {role} images folder {folder} contains no images; supported: {_SUPPORTED}. "
            "Put the photos directly in it or in subfolders.",
            folder,
        )

    found.sort(key=lambda item: item[0])
    if limit is not None:
        found = found[:limit]
    records: list[ImageRecord] = []
    problems: list[DataError] = []
    for _rel, path, repeats in found:
        problem = _probe_image(path, role)
        if problem is None:
            try:
                records.append(ImageRecord(path=path, caption=_read_caption(path), repeats=repeats))
            except DataError as exc:
                problem = exc
        if problem is not None:
            problems.append(problem)
    return FolderScan(folder=folder, role=role, records=records, problems=problems, skipped=sorted(unknown))


def read_images(scan: FolderScan, resolution: int, *, crop: str = "center",
                background: tuple[int, int, int] = (255, 255, 255), seed: int = 0,
                buckets: bool = False) -> list[PreparedImage]:
    """Decode, crop and convert every image of ``scan``. Raises one DataError naming every unusable
    file of the folder, from the scan (not an image, empty, unreadable caption) and from decoding
    (truncated, corrupt, too large), so one run tells the user about all of them. ``buckets``: each
    image is cut at its aspect-ratio bucket (``buckets.bucket_sizes``) instead of the square."""
    prepared, errors = _prepare(scan.records, resolution, crop=crop, background=background, seed=seed,
                                buckets=buckets)
    problems = [*scan.problems, *errors]
    if problems:
        raise combine_errors(problems, scan.folder, scan.role)
    return prepared


# --------------------------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Refuse truncated files and decompression bombs, whatever other code set globally.

    ComfyUI and some libraries set ImageFile.LOAD_TRUNCATED_IMAGES = True process-wide, which would let
    a half-downloaded photo train as a grey smear.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _bomb_error(path: Path, exc: Exception) -> DataError:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    limit = Image.MAX_IMAGE_PIXELS
    limit_text = f" (limit {limit:,})" if limit else ""
    return DataError(
        f"{path} has {pixels}{limit_text}; images this large are refused for safety (a decompression bomb "
        "can exhaust memory). Downscale it, e.g. to 2048 px on the long side, and retry.",
        path,
    )


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """High-bit-depth and float grayscale -> 8-bit, scaled by the mode's real range instead of clipping."""
    values = np.asarray(image).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") and not image.mode.startswith("I;16S"):
        scaled = values * (255.0 / 65535.0)
    elif image.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif image.mode == "F" and lo >= 0.0 and hi <= 255.0:
        scaled = values
    elif image.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        # Pillow decodes 16-bit PNG/TIFF grayscale into "I" on some versions: treat it as 16-bit.
        scaled = values * (255.0 / 65535.0)
    else:
        # No natural full scale (signed or out-of-range data): stretch what is there.
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        return _composite(image, background)
    if mode == "P":
        if "transparency" in image.info:
            return _composite(image, background)
        return image.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _to_8bit_gray(image).convert("RGB")
    # "1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX": Pillow knows the way to RGB.
    return image.convert("RGB")


def load_image(path: Path, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open and fully decode `path` to 8-bit RGB, upright per its EXIF orientation.

    Transparent pixels are composited on `background`. Raises DataError for missing, empty, unreadable,
    truncated or oversized files. A multi-frame file (animated GIF/PNG/WebP) gives its first frame.
    """
    image, notes = _load_image(Path(path), background)
    for note in notes:
        logger.warning("%s", note)
    return image


def _load_image(path: Path, background: tuple[int, int, int]) -> tuple[Image.Image, list[str]]:
    """load_image's work; returns the image and warnings for the user (e.g. "only the first frame")."""
    notes: list[str] = []
    empty = _empty_file_error(path)
    if empty is not None:
        raise empty
    try:
        with _strict_decoding(), Image.open(path) as opened:
            # load() forces the full decode: Image.open only reads the header, so truncation would
            # otherwise surface later, inside the training loop.
            opened.load()
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                notes.append(f"{path} is animated or has several frames ({frames}): only its first frame is "
                             "trained; save the frame you want as PNG or JPEG to train another one.")
            try:
                image = ImageOps.exif_transpose(opened)
            except Exception as exc:  # broken EXIF must not cost the user a photo
                logger.warning("%s: ignoring unreadable EXIF orientation (%s).", path, exc)
                image = opened.copy()
            rgb = _to_rgb(image, background)
            if rgb is opened:
                rgb = opened.copy()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"Image {path} does not exist; check the path or rescan the folder.", path) from exc
    except PermissionError as exc:
        raise DataError(f"Image {path} cannot be read (permission denied); fix its permissions.", path) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(path, exc) from exc
    except UnidentifiedImageError as exc:
        raise DataError(
            f"{path} is not an image that can be read; re-save it as JPEG or PNG, or remove it.", path
        ) from exc
    except Exception as exc:  # malformed files raise anything, from OSError to IndexError
        raise DataError(
            f"{path} is truncated or corrupt and cannot be decoded ({type(exc).__name__}: {exc}); "
            "re-copy or re-export the original photo, or remove it.",
            path,
        ) from exc
    return rgb, notes


# --------------------------------------------------------------------------------------------- geometry


def resize_and_crop(image: Image.Image, resolution: int, *, crop: str = "center",
                    rng: random.Random | None = None) -> Image.Image:
    """Scale so the short side is `resolution` and cut a `resolution` square (center or random).

    The crop box is chosen in source coordinates and resampled in one Lanczos pass, which gives the
    same result as resize-then-crop without resampling pixels that are thrown away. Small images are
    upscaled; prepare_images warns about them.
    """
    if int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if crop not in _CROP_MODES:
        raise ValueError(f"crop must be one of {_CROP_MODES}, got {crop!r}")
    return crop_image(image, bucketing.square(resolution), crop=crop, rng=rng)[0]


def crop_image(image: Image.Image, target: Bucket, *, crop: str = "center", rng: random.Random | None = None,
               face: tuple[int, int, int, int] | None = None) -> tuple[Image.Image, CropGeometry]:
    """Cut ``target`` (width, height) from ``image`` at the target's aspect ('center', 'random' with
    ``rng``, or 'face' centred on ``face``; see ``buckets.crop_box``) and say where it came from."""
    box, geometry = bucketing.crop_box(image.width, image.height, target, crop=crop, rng=rng, face=face)
    return bucketing.cut(image, target, box), geometry


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CHW tensor in [-1, 1] (the range the SD VAE expects)."""
    if image.mode != "RGB":
        raise ValueError(f"image_to_tensor needs an RGB image, got mode {image.mode!r}; use load_image()")
    array = np.array(image, dtype=np.uint8, copy=True)
    tensor = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32)
    return tensor.div_(127.5).sub_(1.0).contiguous()


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """CHW (or 1xCHW) tensor in [-1, 1] -> RGB PIL image; values outside the range are clipped."""
    t = t.detach().to("cpu", torch.float32)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"tensor_to_image needs a CHW tensor with 1 or 3 channels, got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    array = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _size_warnings(path: Path, width: int, height: int, resolution: int, target: Bucket | None = None) -> list[str]:
    tw, th = target or bucketing.square(resolution)
    # The square keeps the words the square-only trainer always used; a bucket names its size.
    square = tw == th == resolution
    found = []
    if width < tw or height < th:
        smaller, wanted = ((f"the training resolution {resolution}", f"{resolution} px on the short side") if square
                           else (f"its {tw}x{th} bucket", f"{tw}x{th}"))
        found.append(
            f"{path} is {width}x{height}, smaller than {smaller}: it will be upscaled (blurry training data); use "
            f"images of at least {wanted}."
        )
    ratio = max(width * th, height * tw) / max(1, min(width * th, height * tw))
    if ratio > 2.0:
        kept = "the square crop" if square else f"its {tw}x{th} bucket crop"
        found.append(
            f"{path} is {width}x{height}: {kept} keeps only {100.0 / ratio:.0f}% of it; crop it yourself around "
            "the subject so it is not cut off."
        )
    return found


def prepare_images(records: Sequence[ImageRecord], resolution: int, *, crop: str = "center",
                   background: tuple[int, int, int] = (255, 255, 255), seed: int = 0,
                   buckets: bool = False) -> list[PreparedImage]:
    """Load, crop and convert every record. All unreadable files are reported together in one DataError."""
    prepared, errors = _prepare(records, resolution, crop=crop, background=background, seed=seed, buckets=buckets)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        listing = "\n".join(f"- {exc}" for exc in errors)
        raise DataError(f"{len(errors)} images cannot be used:\n{listing}", errors[0].path)
    return prepared


def face_detector() -> tuple[Any, str | None]:
    """(find_face, None) when faces can be detected, else (None, why not: shown as a warning)."""
    try:
        from . import faces
    except ImportError as exc:
        return None, f"crop 'face': the face detector cannot be loaded ({exc}); every image is cropped at the center"
    problem = faces.detector_problem()
    if problem:
        return None, f"crop 'face': {problem}; every image is cropped at the center"
    return faces.find_face, None


def _prepare(records: Sequence[ImageRecord], resolution: int, *, crop: str, background: tuple[int, int, int],
             seed: int, buckets: bool = False) -> tuple[list[PreparedImage], list[DataError]]:
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    rng = random.Random(seed) if crop == "random" else None
    sizes = bucketing.bucket_sizes(resolution) if buckets else [bucketing.square(resolution)]
    find_face, face_problem = face_detector() if crop == "face" and records else (None, None)
    prepared: list[PreparedImage] = []
    errors: list[DataError] = []
    for index, record in enumerate(records):
        try:
            image, notes = _load_image(Path(record.path), background)
        except DataError as exc:
            errors.append(exc)
            continue
        width, height = image.size
        target = bucketing.nearest_bucket(width, height, sizes)
        notes += _size_warnings(record.path, width, height, resolution, target)
        if face_problem and index == 0:
            notes.append(face_problem)  # once: it is the same for every image
        face = find_face(image) if find_face is not None else None
        if find_face is not None and face is None:
            notes.append(f"{record.path}: no face found for crop 'face'; it is cropped at the center")
        for note in notes:
            logger.warning("%s", note)
        cropped, geometry = crop_image(image, target, crop=crop, rng=rng, face=face)
        prepared.append(PreparedImage(record=record, pixels=image_to_tensor(cropped), width=width, height=height,
                                      geometry=geometry, warnings=notes))
    return prepared, errors


# --------------------------------------------------------------------------------------------- ordering


def expand_repeats(records: Sequence[ImageRecord]) -> list[int]:
    """Indices into `records`, each repeated `repeats` times: one epoch's sample list, unshuffled."""
    return [index for index, record in enumerate(records) for _ in range(record.repeats)]


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    # Hash (seed, epoch) so negative seeds and neighbouring epochs give unrelated streams; int seeding of
    # random.Random is stable across Python versions.
    digest = hashlib.sha256(f"dreambooth-epoch:{int(seed)}:{int(epoch)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def epoch_order(num_items: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """Deterministic permutation of range(num_items) for `epoch`, independent of any global RNG.

    Fisher-Yates over rng.random() instead of random.shuffle: Python guarantees random()'s sequence
    across versions but not shuffle's algorithm, and a resumed run must read the same order.
    """
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    order = list(range(num_items))
    if not shuffle:
        return order
    rng = _epoch_rng(seed, epoch)
    for i in range(num_items - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def stream_position(num_items: int, index: int) -> tuple[int, int]:
    """(epoch, offset within the epoch) of item `index` of the sample stream."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return divmod(index, num_items)


def sample_stream(num_items: int, seed: int, start: int, count: int, shuffle: bool = True) -> list[int]:
    """Items [start, start + count) of epoch_order(0) ++ epoch_order(1) ++ ...

    A run resumed at sample `start` reads exactly what an uninterrupted run would have read there.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count == 0:
        return []
    epoch, offset = stream_position(num_items, start)
    out: list[int] = []
    while len(out) < count:
        order = epoch_order(num_items, epoch, seed, shuffle)
        out.extend(order[offset:offset + count - len(out)])
        epoch, offset = epoch + 1, 0
    return out


# --------------------------------------------------------------------------------------------- identity


def _file_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise DataError(f"Image {path} cannot be read ({exc}); check that it still exists.", path) from exc


def dataset_fingerprint(records: Sequence[ImageRecord]) -> str:
    """sha256 of the dataset as training sees it: each file's content hash, caption and repeats, in order.

    Paths and timestamps are left out, so moving the folder or touching files keeps the fingerprint,
    while editing, adding, removing or reordering images, captions or repeats changes it.
    """
    content: dict[Path, str] = {}
    entries = []
    for record in records:
        key = Path(record.path).resolve()
        if key not in content:
            content[key] = _file_sha256(key)
        entries.append([content[key], record.caption, record.repeats])
    payload = json.dumps({"version": 1, "images": entries}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- preview


def preview_canvas(prepared: Sequence[PreparedImage], fill: float = 0.0) -> torch.Tensor:
    """Every crop centred on one canvas as wide as the widest and as tall as the tallest, ``fill`` (neutral
    grey: 0 in [-1, 1]) around it: (B, 3, H, W), one size for an image batch. Squares alone fill it."""
    if not prepared:
        raise ValueError("no images to preview")
    width = max(p.pixels.shape[-1] for p in prepared)
    height = max(p.pixels.shape[-2] for p in prepared)
    canvas = torch.full((len(prepared), 3, height, width), fill, dtype=torch.float32)
    for i, item in enumerate(prepared):
        h, w = item.pixels.shape[-2:]
        top, left = (height - h) // 2, (width - w) // 2
        canvas[i, :, top:top + h, left:left + w] = item.pixels
    return canvas


def crop_summary(item: PreparedImage, folder: Path | None = None) -> str:
    """'name: WxH bucket, crop box (left, top, right, bottom)' in the photo's pixels, for the user."""
    path = Path(item.record.path)
    name = path.relative_to(folder).as_posix() if folder is not None and path.is_relative_to(folder) else path.name
    w, h = item.bucket
    return f"{name}: {w}x{h} bucket, crop box {item.crop_box()} of {item.width}x{item.height}"
