"""The dataset node's preview with aspect-ratio buckets, inside a real ComfyUI server."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from dreambooth_test_support.comfyui import ComfyServer
from dreambooth_test_support.paths import DREAMBENCH_DIR
from PIL import Image

pytestmark = pytest.mark.comfy

# Landscape, portrait, square and landscape cuts of the DreamBench dogs: buckets 72x56, 48x80, 64x64 at 64 px.
BOXES = {"00": (0, 32, 256, 224), "01": (48, 0, 208, 256), "02": (0, 0, 256, 256), "03": (0, 40, 256, 216)}
BUCKETS = {"00": (72, 56), "01": (48, 80), "02": (64, 64), "03": (72, 56)}


def test_preview_shows_each_bucket_crop_on_a_grey_canvas(comfy_server: ComfyServer) -> None:
    folder = f"buckets_{uuid.uuid4().hex[:8]}"
    target = comfy_server.input_dir / folder
    target.mkdir(parents=True)
    for name, box in BOXES.items():
        with Image.open(DREAMBENCH_DIR / "dog" / f"{name}.jpg") as photo:
            photo.convert("RGB").crop(box).save(target / f"{name}.png")
    prompt = {
        "1": {"class_type": "DreamBoothDataset", "inputs": {
            "folder": folder, "instance_prompt": "a photo of fac dog", "use_captions": True, "resolution": 64,
            "crop": "center", "aspect_buckets": True}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": f"{folder}_preview"}},
    }
    result = comfy_server.run_prompt(prompt, timeout=120).raise_for_status()
    lines = result.outputs["1"]["text"]
    assert [line.split(":")[0] for line in lines] == [f"{n}.png" for n in BOXES]
    for line, (name, (w, h)) in zip(lines, BUCKETS.items(), strict=True):
        assert f": {w}x{h} bucket, crop box (" in line, (name, line)
    files = comfy_server.output_files(result, node_id="2")
    assert len(files) == 4
    for path, (w, h) in zip(sorted(files), BUCKETS.values(), strict=True):
        with Image.open(path) as img:
            assert img.size == (72, 80), "one canvas: the widest and the tallest bucket"
            pixels = np.asarray(img.convert("RGB")).astype(int)
        top, left = (80 - h) // 2, (72 - w) // 2
        border = np.ones((80, 72), bool)
        border[top:top + h, left:left + w] = False
        if border.any():
            assert np.abs(pixels[border] - 128).max() <= 1, "neutral grey around the crop"
        inner = pixels[top:top + h, left:left + w]
        assert inner.std() > 10, "the photo itself fills the bucket"
        assert np.abs(inner[[0, -1]] - 128).mean() > 5 and np.abs(inner[:, [0, -1]] - 128).mean() > 5


def test_face_crop_is_centred_on_the_face_and_a_faceless_photo_is_named(comfy_server: ComfyServer) -> None:
    """crop 'face' through the node: the astronaut photo (scikit-image's bundled sample, a real face) placed
    at the right of a wide canvas is cut around her face, not at the canvas center; a dog photo without a
    face falls back to the center and the warning names it."""
    from skimage import data as skimage_data

    folder = f"faces_{uuid.uuid4().hex[:8]}"
    target = comfy_server.input_dir / folder
    target.mkdir(parents=True)
    canvas = Image.new("RGB", (1536, 512), (40, 90, 40))
    canvas.paste(Image.fromarray(skimage_data.astronaut()), (1024, 0))  # her face near x 1024+150..260
    canvas.save(target / "astronaut.png")
    with Image.open(DREAMBENCH_DIR / "dog" / "00.jpg") as photo:
        photo.convert("RGB").save(target / "dog.png")
    prompt = {
        "1": {"class_type": "DreamBoothDataset", "inputs": {
            "folder": folder, "instance_prompt": "a photo of fac woman", "use_captions": True, "resolution": 64,
            "crop": "face", "aspect_buckets": False}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": f"{folder}_preview"}},
    }
    result = comfy_server.run_prompt(prompt, timeout=120).raise_for_status()
    lines = result.outputs["1"]["text"]
    astronaut = next(line for line in lines if line.startswith("astronaut.png"))
    box = [int(v) for v in astronaut.split("crop box (")[1].split(")")[0].split(",")]
    left, _top, right, _bottom = box
    assert right - left == 512 and 1024 <= (left + right) / 2 <= 1024 + 300, astronaut
    fallback = [line for line in comfy_server.log_text().splitlines() if "dog.png" in line and "face" in line]
    assert fallback, "the photo without a face is named in a warning"
