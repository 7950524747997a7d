"""Aspect-ratio buckets and crop geometry: which size each photo trains at, and where it is cut.

ComfyUI-free and pure arithmetic (Pillow only for the resize itself), so the dataset node's preview
and the trainer cut exactly the same pixels.

A bucket is a (width, height) in pixels. ``bucket_sizes(resolution)`` lists them, each side a multiple
of ``bucket_step(resolution)``, each between half and twice the resolution, with at most
``resolution**2`` pixels (a bucket never costs more memory than the square). Every photo trains in the
bucket whose aspect ratio is nearest its own, so a 768x1024 portrait at 512 trains at 448x576 instead
of losing its head and feet to a 512 square.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

Bucket = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class CropGeometry:
    """Where a training image came from, in the convention of SDXL's size conditioning (kohya, diffusers).

    ``original_size``: (height, width) of the photo after EXIF orientation. ``crop_top_left``: (top, left)
    of the crop in the photo resized so that it just covers the target. ``target_size``: (height, width)
    of the trained image (the bucket, or the square).
    """

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def resized_size(self) -> tuple[int, int]:
        """(height, width) of the photo resized to cover the target."""
        oh, ow = self.original_size
        th, tw = self.target_size
        scale = max(th / oh, tw / ow)
        return max(th, round(oh * scale)), max(tw, round(ow * scale))

    def flipped(self) -> CropGeometry:
        """The geometry of the mirrored crop (random_flip): the crop's left edge seen from the right."""
        _rh, rw = self.resized_size()
        top, left = self.crop_top_left
        return CropGeometry(self.original_size, (top, rw - left - self.target_size[1]), self.target_size)


def bucket_step(resolution: int) -> int:
    """Side granularity in pixels: 64 (kohya's, the UNet's downsampling of 8 latent pixels) from 512 px; below,
    resolution/8 rounded down to 8 px, so small resolutions still get several buckets."""
    if resolution >= 512:
        return 64
    return max(8, (resolution // 8) // 8 * 8)


def bucket_sizes(resolution: int) -> list[Bucket]:
    """Every bucket for ``resolution``, sorted from the tallest to the widest. A square is always one: the
    resolution itself when it is a multiple of the step, else the largest square of whole steps."""
    if int(resolution) != resolution or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
    step = bucket_step(resolution)
    area = resolution * resolution
    shortest = max(step, math.ceil(resolution / 2 / step) * step)
    longest = 2 * resolution
    found: set[Bucket] = set()
    for short in range(shortest, resolution // step * step + 1, step):
        long = min(longest, area // short) // step * step
        if long < short:
            continue
        found.add((short, long))
        found.add((long, short))
    return sorted(found, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (in log space: 2:1 and 1:2 are equally far from
    square); on a tie the first in ``buckets``."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = math.log(width / height)
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - aspect))


def square(resolution: int) -> Bucket:
    return (resolution, resolution)


# --------------------------------------------------------------------------------------------- cropping


def crop_box(width: int, height: int, target: Bucket, *, crop: str, rng: random.Random | None = None,
             face: tuple[int, int, int, int] | None = None) -> tuple[tuple[float, float, float, float], CropGeometry]:
    """The source box (left, top, right, bottom) that ``target`` is resampled from, and its geometry.

    The box has the target's aspect and covers the image's full extent on the side that limits it.
    'center' centres it, 'random' draws its offset from ``rng`` in whole source pixels, 'face' centres
    it on ``face`` (left, top, right, bottom), kept inside the image. For a square target this is the
    box the square-only trainer always cut (same floats, same random draws).
    """
    tw, th = target
    if width * th <= height * tw:  # the image is narrower than the target: its full width is used
        cw, ch = float(width), th * width / tw
    else:
        cw, ch = tw * height / th, float(height)
    if crop == "center" or (crop == "face" and face is None):
        left, top = (width - cw) / 2, (height - ch) / 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs rng=random.Random(seed) so the crop is reproducible")
        left, top = rng.randint(0, int(width - cw)), rng.randint(0, int(height - ch))
    elif crop == "face":
        assert face is not None
        cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
        left = min(max(cx - cw / 2, 0.0), width - cw)
        top = min(max(cy - ch / 2, 0.0), height - ch)
    else:
        raise ValueError(f"crop must be 'center', 'random' or 'face', got {crop!r}")
    scale = tw / cw
    geometry = CropGeometry(original_size=(height, width), crop_top_left=(round(top * scale), round(left * scale)),
                            target_size=(th, tw))
    return (left, top, left + cw, top + ch), geometry


def cut(image: Image.Image, target: Bucket, box: tuple[float, float, float, float]) -> Image.Image:
    """Resample ``box`` of ``image`` to ``target`` in one Lanczos pass (nothing thrown away is resampled).

    reducing_gap: a box-filter pre-reduction for big downscales, then Lanczos; visually identical and
    several times faster on 12-megapixel phone photos.
    """
    return image.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


# --------------------------------------------------------------------------------------------- ordering


def _rng(seed: int, epoch: int) -> random.Random:
    digest = hashlib.sha256(f"dreambooth-buckets:{int(seed)}:{int(epoch)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _permute(items: list[int], rng: random.Random) -> list[int]:
    # Fisher-Yates over random(): its sequence is stable across Python versions, shuffle()'s is not.
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


def epoch_length(item_buckets: Sequence[Bucket], batch_size: int) -> int:
    """Samples per bucketed epoch: each bucket's items rounded up to whole batches."""
    counts: dict[Bucket, int] = {}
    for b in item_buckets:
        counts[b] = counts.get(b, 0) + 1
    return sum(math.ceil(n / batch_size) * batch_size for n in counts.values())


def bucketed_epoch_order(item_buckets: Sequence[Bucket], batch_size: int, epoch: int, seed: int,
                         shuffle: bool = True) -> list[int]:
    """One epoch's item indices, ``epoch_length`` long, where every aligned run of ``batch_size`` items
    shares one bucket.

    Each bucket's items are shuffled and cut into batches; a bucket's last, short batch is filled with
    its own first items again (every micro-batch keeps the configured size, so the loss's instance and
    prior halves stay where they are); then the batches are shuffled. The length is the same every
    epoch, so a stream position maps to (epoch, offset) by division, as without buckets.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = _rng(seed, epoch)
    by_bucket: dict[Bucket, list[int]] = {}
    for index, b in enumerate(item_buckets):
        by_bucket.setdefault(b, []).append(index)
    batches: list[list[int]] = []
    for b in sorted(by_bucket):
        members = _permute(by_bucket[b], rng) if shuffle else by_bucket[b]
        padded = members + [members[i % len(members)] for i in range(-len(members) % batch_size)]
        batches += [padded[i:i + batch_size] for i in range(0, len(padded), batch_size)]
    order = _permute(list(range(len(batches))), rng) if shuffle else list(range(len(batches)))
    return [i for k in order for i in batches[k]]


def bucketed_stream(item_buckets: Sequence[Bucket], batch_size: int, seed: int, start: int, count: int,
                    shuffle: bool = True) -> list[int]:
    """Items [start, start + count) of bucketed_epoch_order(0) ++ bucketed_epoch_order(1) ++ ...

    A run resumed at sample ``start`` reads exactly what an uninterrupted run would have read there.
    """
    if count < 0 or start < 0:
        raise ValueError(f"start and count must be >= 0, got {start}, {count}")
    length = epoch_length(item_buckets, batch_size)
    if length < 1:
        raise ValueError("no items to draw from")
    epoch, offset = divmod(start, length)
    out: list[int] = []
    while len(out) < count:
        order = bucketed_epoch_order(item_buckets, batch_size, epoch, seed, shuffle)
        out.extend(order[offset:offset + count - len(out)])
        epoch, offset = epoch + 1, 0
    return out
