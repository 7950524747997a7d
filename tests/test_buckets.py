"""Aspect-ratio buckets: the bucket list, assignment, crop geometry, bucketed batch order, face crop."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_dreambooth_lora.trainer import buckets, data
from comfyui_dreambooth_lora.trainer.buckets import CropGeometry
from dreambooth_test_support.paths import DREAMBENCH_DIR
from PIL import Image


@pytest.mark.parametrize("resolution", [64, 128, 256, 512, 768, 1024])
def test_bucket_list_properties(resolution: int) -> None:
    sizes = buckets.bucket_sizes(resolution)
    step = buckets.bucket_step(resolution)
    assert sizes == buckets.bucket_sizes(resolution), "deterministic"
    assert len(sizes) == len(set(sizes)) >= 5
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert resolution / 2 <= min(w, h) and max(w, h) <= 2 * resolution
        assert w * h <= resolution * resolution
        assert w * h >= 0.75 * resolution * resolution, (w, h)  # about the square's pixel count
        assert (h, w) in sizes, "portrait and landscape alike"
    aspects = [w / h for w, h in sizes]
    assert aspects == sorted(aspects)


def test_bucket_list_examples() -> None:
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (640, 384)} <= set(buckets.bucket_sizes(512))
    assert {(1024, 1024), (896, 1152), (1152, 896)} <= set(buckets.bucket_sizes(1024))
    assert buckets.bucket_step(512) == buckets.bucket_step(1024) == 64
    # A resolution that is not a multiple of the step: the largest square of whole steps, never more pixels.
    odd = buckets.bucket_sizes(520)
    assert (512, 512) in odd and all(w * h <= 520 * 520 and w % 64 == h % 64 == 0 for w, h in odd)


def test_each_image_goes_to_the_nearest_aspect() -> None:
    sizes = buckets.bucket_sizes(512)
    assert buckets.nearest_bucket(768, 1024, sizes) == (448, 576)
    assert buckets.nearest_bucket(1024, 768, sizes) == (576, 448)
    assert buckets.nearest_bucket(3000, 3000, sizes) == (512, 512)
    assert buckets.nearest_bucket(4000, 1000, sizes) == (1024, 256)
    for w, h in ((640, 480), (333, 1000), (1920, 1080)):
        chosen = buckets.nearest_bucket(w, h, sizes)
        gap = abs(math.log(chosen[0] / chosen[1]) - math.log(w / h))
        assert all(gap <= abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in sizes)


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), mode="RGB")


def _legacy_square(image: Image.Image, resolution: int, crop: str, rng: random.Random | None) -> Image.Image:
    """The square-only trainer's crop, as it was before buckets existed."""
    width, height = image.size
    side = min(width, height)
    if crop == "center":
        left, top = (width - side) / 2, (height - side) / 2
    else:
        assert rng is not None
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side),
                        reducing_gap=3.0)


@pytest.mark.parametrize("size", [(300, 100), (101, 257), (640, 480), (77, 77)])
def test_square_path_is_unchanged(size: tuple[int, int]) -> None:
    image = _gradient(*size)
    for crop in ("center", "random"):
        ours = data.resize_and_crop(image, 48, crop=crop, rng=random.Random(5) if crop == "random" else None)
        old = _legacy_square(image, 48, crop, random.Random(5) if crop == "random" else None)
        assert np.array_equal(np.asarray(ours), np.asarray(old)), crop


def test_square_preparation_is_unchanged_when_buckets_are_off(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    _gradient(300, 120).save(path)
    record = data.ImageRecord(path, None, 1)
    (item,) = data.prepare_images([record], 64)
    old = _legacy_square(data.load_image(path), 64, "center", None)
    assert torch.equal(item.pixels, data.image_to_tensor(old))
    assert item.bucket == (64, 64)
    assert item.geometry == CropGeometry(original_size=(120, 300), crop_top_left=(0, 48), target_size=(64, 64))


def test_bucket_crop_keeps_the_aspect_and_reports_geometry(tmp_path: Path) -> None:
    path = tmp_path / "portrait.png"
    _gradient(768, 1024).save(path)
    (item,) = data.prepare_images([data.ImageRecord(path, None, 1)], 512, buckets=True)
    assert item.bucket == (448, 576) and tuple(item.pixels.shape) == (3, 576, 448)
    g = item.geometry
    assert g.original_size == (1024, 768) and g.target_size == (576, 448)
    # Resized to cover 448x576: 448x597 (width limits), centred: 10 or 11 rows cut off above.
    assert g.resized_size() == (597, 448)
    assert g.crop_top_left == (round((1024 - 576 * 768 / 448) / 2 * 448 / 768), 0)
    left, top, right, bottom = item.crop_box()
    assert (left, right) == (0, 768) and abs(top - (1024 - bottom)) <= 3  # from rounded resized pixels
    # Flipped: the left edge seen from the right edge (0 here, the full width is kept).
    assert g.flipped().crop_top_left == g.crop_top_left


def test_random_and_face_crops_in_a_bucket() -> None:
    image = _gradient(400, 100)
    target = (128, 64)
    a, ga = data.crop_image(image, target, crop="random", rng=random.Random(1))
    b, gb = data.crop_image(image, target, crop="random", rng=random.Random(1))
    assert a.size == target and np.array_equal(np.asarray(a), np.asarray(b)) and ga == gb
    lefts = {data.crop_image(image, target, crop="random", rng=random.Random(s))[1].crop_top_left[1] for s in range(8)}
    assert len(lefts) > 2 and all(0 <= x <= 400 * 64 // 100 - 128 for x in lefts)
    # Face at the far right: the crop is pushed against the right edge; in the middle: centred on it.
    _, right = data.crop_image(image, target, crop="face", face=(380, 40, 398, 60))
    assert right.crop_top_left == (0, 256 - 128)
    _, mid = data.crop_image(image, target, crop="face", face=(190, 10, 230, 50))
    assert mid.crop_top_left == (0, round((210 - 100) * 64 / 100))
    _, none = data.crop_image(image, target, crop="face", face=None)
    assert none == data.crop_image(image, target, crop="center")[1]


def _item_buckets() -> list[tuple[int, int]]:
    return [(1, 1)] * 5 + [(2, 1)] * 3 + [(1, 2)] * 1


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_bucketed_batches_never_mix_buckets_and_cover_every_item(batch_size: int) -> None:
    items = _item_buckets()
    length = buckets.epoch_length(items, batch_size)
    assert length % batch_size == 0
    for epoch in range(3):
        order = buckets.bucketed_epoch_order(items, batch_size, epoch, seed=9)
        assert len(order) == length and set(order) == set(range(len(items)))
        for k in range(0, length, batch_size):
            assert len({items[i] for i in order[k:k + batch_size]}) == 1
    assert buckets.bucketed_epoch_order(items, batch_size, 0, 9) == buckets.bucketed_epoch_order(items, batch_size, 0, 9)
    if batch_size > 1:
        assert buckets.bucketed_epoch_order(items, batch_size, 0, 9) != buckets.bucketed_epoch_order(items, batch_size, 1, 9)


def test_bucketed_stream_resumes_exactly() -> None:
    items, bs = _item_buckets(), 2
    total = 4 * buckets.epoch_length(items, bs) + 3
    full = buckets.bucketed_stream(items, bs, 3, 0, total)
    for cut in range(0, total, bs):
        assert buckets.bucketed_stream(items, bs, 3, 0, cut) + buckets.bucketed_stream(items, bs, 3, cut, total - cut) \
            == full


def test_face_crop_centres_on_the_face_and_falls_back_with_a_warning(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    from comfyui_dreambooth_lora.trainer import faces

    if faces.detector_problem():
        pytest.skip(faces.detector_problem() or "")
    # The astronaut at the right end of a wide grey photo: a centre crop would miss her face.
    wide = Image.new("RGB", (1536, 512), (128, 128, 128))
    wide.paste(Image.fromarray(skimage_data.astronaut()), (1024, 0))
    wide.save(tmp_path / "astronaut.png")
    dog = tmp_path / "dog.jpg"
    dog.write_bytes((DREAMBENCH_DIR / "dog" / "00.jpg").read_bytes())
    records = [data.ImageRecord(tmp_path / "astronaut.png", None, 1), data.ImageRecord(dog, None, 1)]
    with caplog.at_level("WARNING"):
        person, plain = data.prepare_images(records, 256, crop="face")
    box = faces.find_face(wide)
    assert box is not None
    left, top, right, bottom = person.crop_box()
    assert left <= box[0] and box[2] <= right and top <= box[1] and box[3] <= bottom, (person.crop_box(), box)
    assert left > 1536 // 2, "not the centre crop"
    assert plain.geometry == data.prepare_images(records[1:], 256)[0].geometry  # no face: the centre crop
    assert any(str(dog) in w and "no face" in w for w in plain.warnings)
    assert not any("no face" in w for w in person.warnings)
    # Buckets and face crop together: the wide photo's bucket, still around the face.
    (bucketed,) = data.prepare_images(records[:1], 256, crop="face", buckets=True)
    assert bucketed.bucket == (384, 160)
    left, top, right, bottom = bucketed.crop_box()
    assert left <= box[0] and box[2] <= right
