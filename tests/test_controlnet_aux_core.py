"""Unit tests of the ComfyUI-free preprocessor core (`nodes/controlnet_aux_core.py`).

The module is loaded from its file on its own: importing it as part of the pack would run
`nodes/__init__.py`, which imports ComfyUI, and these tests must run without it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from dreambooth_test_support.images import photo

REPO_ROOT = Path(__file__).resolve().parents[1]
CORE_PATH = REPO_ROOT / "nodes" / "controlnet_aux_core.py"


def _load_core() -> ModuleType:
    name = "dreambooth_controlnet_aux_core"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CORE_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


core = _load_core()


def documented_canny(img: np.ndarray, detect_resolution: int, low: int = 100, high: int = 200) -> np.ndarray:
    """What the core promises for canny, rebuilt from OpenCV and controlnet_aux independently:
    resize (short side = detect_resolution), edge-pad to a multiple of 64, CannyDetector,
    crop the pad, resize back to the image size (INTER_AREA shrinking, INTER_CUBIC enlarging)."""
    import cv2
    from controlnet_aux.canny import CannyDetector

    h, w = img.shape[:2]
    k = detect_resolution / min(h, w)
    dh, dw = round(h * k), round(w * k)
    resized = img
    if (dh, dw) != (h, w):
        resized = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_AREA if dh * dw < h * w else cv2.INTER_CUBIC)
    padded = np.pad(resized, ((0, -dh % 64), (0, -dw % 64), (0, 0)), mode="edge")
    side = min(padded.shape[:2])
    edges = CannyDetector()(padded, low, high, detect_resolution=side, image_resolution=side, output_type="np")
    edges = edges[:dh, :dw]
    if (dh, dw) != (h, w):
        edges = cv2.resize(edges, (w, h), interpolation=cv2.INTER_AREA if h * w < dh * dw else cv2.INTER_CUBIC)
    return edges


# --------------------------------------------------------------------------- boundaries


def test_core_imports_nothing_from_comfyui() -> None:
    tree = ast.parse(CORE_PATH.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the core is loaded standalone: no relative imports"
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution"}
    # controlnet_aux is heavy (timm, cv2, mediapipe probes): only inside functions.
    top_level = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_level |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not any(name and name.startswith(("controlnet_aux", "cv2")) for name in top_level)


def test_detector_set_and_weights_table() -> None:
    names = set(core.DETECTOR_NAMES)
    for required in ("canny", "depth_midas", "openpose", "lineart_realistic", "softedge_hed",
                     "softedge_pidinet", "mlsd", "normal_bae", "scribble_xdog", "shuffle", "tile"):
        assert required in names
    table = dict(core.weights_table())
    assert table["openpose"] == ("body_pose_model.pth",)
    assert table["lineart_realistic"] == ("sk_model.pth", "sk_model2.pth")
    assert table["depth_midas"] == ("dpt_hybrid-midas-501f0c75.pt",)
    for free in ("canny", "shuffle", "tile", "scribble_xdog", "lineart_standard"):
        assert table[free] == ()
    assert core.NO_PREPROCESSOR not in names


# --------------------------------------------------------------------------- conversions and sizes


def test_image_numpy_roundtrip_is_exact() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    # What LoadImage produces from a PNG: float32 v / 255.
    image = torch.from_numpy(values.astype(np.float32) / 255.0)
    back = core.image_to_numpy(image)
    assert back.dtype == np.uint8 and back.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(back, values)
    np.testing.assert_array_equal(core.numpy_to_image(back).numpy(), image.numpy())


def test_image_to_numpy_channels_and_shapes() -> None:
    gray = torch.rand(2, 5, 7, 1)
    assert core.image_to_numpy(gray).shape == (2, 5, 7, 3)
    rgba = torch.rand(5, 7, 4)
    assert core.image_to_numpy(rgba).shape == (1, 5, 7, 3)
    assert core.image_to_numpy(torch.full((1, 2, 2, 3), 2.0)).max() == 255
    with pytest.raises(ValueError, match="channels"):
        core.image_to_numpy(torch.rand(1, 4, 4, 2))
    with pytest.raises(ValueError, match="uint8"):
        core.numpy_to_image(np.zeros((1, 2, 2, 3), dtype=np.float32))


def test_detection_size_keeps_aspect() -> None:
    assert core.detection_size(64, 96, 512) == (512, 768)
    assert core.detection_size(480, 640, 240) == (240, 320)
    assert core.detection_size(1000, 250, 100) == (400, 100)


@pytest.mark.parametrize(
    ("image_hw", "requested_wh", "expected_wh"),
    [
        ((64, 96), (0, 0), (96, 64)),
        ((480, 640), (0, 0), (640, 480)),
        ((480, 640), (320, 0), (320, 240)),
        ((480, 640), (0, 120), (160, 120)),
        ((100, 150), (0, 0), (152, 104)),  # rounded to multiples of 8
        ((64, 96), (100, 60), (104, 64)),
    ],
)
def test_hint_size(image_hw: tuple[int, int], requested_wh: tuple[int, int], expected_wh: tuple[int, int]) -> None:
    assert core.hint_size(*image_hw, *requested_wh) == expected_wh


def test_hint_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="width and height"):
        core.hint_size(64, 64, -8, 0)


# --------------------------------------------------------------------------- weight-free detectors


def test_canny_equals_controlnet_aux_when_no_resizing_is_needed() -> None:
    from controlnet_aux.canny import CannyDetector

    img = photo(128, 64)  # both sides already multiples of 64 at detect_resolution 64
    hint = core.detect(img, "canny", [], detect_resolution=64)
    expected = CannyDetector()(img, 100, 200, detect_resolution=64, image_resolution=64, output_type="np")
    assert hint.shape == (1, 64, 128, 3)
    np.testing.assert_array_equal(hint[0], expected)
    assert 0 < (hint > 0).mean() < 0.5, "a photo has some edges, not everywhere"


@pytest.mark.parametrize(("size", "detect_resolution"), [((96, 64), 64), ((96, 64), 128), ((70, 100), 96)])
def test_canny_follows_documented_transformation_and_keeps_size(size: tuple[int, int], detect_resolution: int) -> None:
    img = photo(*size)
    options = core.DetectOptions(canny_low=50, canny_high=150)
    hint = core.detect(img, "canny", [], detect_resolution=detect_resolution, options=options)
    assert hint.shape == (1, size[1], size[0], 3)
    np.testing.assert_array_equal(hint[0], documented_canny(img, detect_resolution, 50, 150))


def test_batch_is_processed_image_by_image() -> None:
    a, b = photo(96, 64), photo(96, 64)[::-1].copy()
    seen: list[tuple[int, int]] = []
    hints = core.detect(np.stack([a, b]), "canny", [], detect_resolution=64,
                        before_each=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 2), (1, 2)]
    np.testing.assert_array_equal(hints[0], core.detect(a, "canny", [], detect_resolution=64)[0])
    np.testing.assert_array_equal(hints[1], core.detect(b, "canny", [], detect_resolution=64)[0])
    assert not np.array_equal(hints[0], hints[1])


@pytest.mark.parametrize("name", ["lineart_standard", "scribble_xdog", "shuffle", "tile"])
def test_weight_free_detectors_keep_size(name: str) -> None:
    img = photo(96, 64)
    hint = core.detect(img, name, [], detect_resolution=64)
    assert hint.shape == (1, 64, 96, 3) and hint.dtype == np.uint8
    assert hint.std() > 0, f"{name} produced a constant image"


def test_shuffle_is_seeded_and_leaves_global_rng_alone() -> None:
    img = photo(96, 64)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    one = core.detect(img, "shuffle", [], detect_resolution=64, options=core.DetectOptions(seed=1))
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    again = core.detect(img, "shuffle", [], detect_resolution=64, options=core.DetectOptions(seed=1))
    other = core.detect(img, "shuffle", [], detect_resolution=64, options=core.DetectOptions(seed=2))
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)


def test_tile_is_a_blurred_image() -> None:
    img = photo(128, 128)
    hint = core.detect(img, "tile", [], detect_resolution=128)[0].astype(np.float32)
    # Close to the image in colour, but with far less high-frequency detail.
    assert np.abs(hint.mean(axis=(0, 1)) - img.mean(axis=(0, 1))).max() < 8
    detail = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
    assert detail(hint) < 0.5 * detail(img.astype(np.float32))


def test_unknown_detector() -> None:
    with pytest.raises(ValueError, match="unknown preprocessor 'nope'"):
        core.detect(photo(64, 64), "nope", [])


# --------------------------------------------------------------------------- weights


def test_missing_weights_name_file_detector_and_folder(tmp_path: Path) -> None:
    first, second = tmp_path / "annotators", tmp_path / "more annotators"
    with pytest.raises(core.MissingAnnotatorWeights) as info:
        core.detect(photo(64, 64), "openpose", [first, second])
    message = str(info.value)
    assert "'openpose'" in message and "body_pose_model.pth" in message
    assert f"Put it into: {first}\n" in message
    assert str(second) in message and "lllyasviel/Annotators" in message


def test_missing_second_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "sk_model.pth").write_bytes(b"")
    with pytest.raises(core.MissingAnnotatorWeights, match="sk_model2.pth"):
        core.resolve_weights("lineart_realistic", [tmp_path])


def _random_lineart_weights(folder: Path, seed: int = 0) -> None:
    from controlnet_aux.lineart import Generator

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    for name in ("sk_model.pth", "sk_model2.pth"):
        torch.save(Generator(3, 1, 3).state_dict(), folder / name)


def test_random_lineart_weights_load_from_local_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import controlnet_aux.lineart

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"hub access attempted: {args} {kwargs}")

    monkeypatch.setattr(controlnet_aux.lineart, "hf_hub_download", no_hub)
    # Files split over two folders: each is found where it is.
    a, b = tmp_path / "a", tmp_path / "b"
    _random_lineart_weights(a)
    b.mkdir()
    (a / "sk_model2.pth").rename(b / "sk_model2.pth")
    assert core.resolve_weights("lineart_realistic", [a, b]) == [a / "sk_model.pth", b / "sk_model2.pth"]

    core.clear_cache()
    img = photo(96, 64)
    hint = core.detect(img, "lineart_realistic", [a, b], detect_resolution=64)
    assert hint.shape == (1, 64, 96, 3)
    assert hint.std() > 0
    coarse = core.detect(img, "lineart_coarse", [a, b], detect_resolution=64)
    assert coarse.shape == hint.shape


def test_detector_cache_follows_file_changes(tmp_path: Path) -> None:
    _random_lineart_weights(tmp_path, seed=0)
    core.clear_cache()
    first = core.load_detector("lineart_realistic", [tmp_path])
    assert core.load_detector("lineart_realistic", [tmp_path]) is first
    assert core.load_detector("lineart_coarse", [tmp_path]) is first  # same files, same networks
    later = time.time() + 5
    os.utime(tmp_path / "sk_model.pth", (later, later))
    assert core.load_detector("lineart_realistic", [tmp_path]) is not first


class _Payload:
    """Unpickling this would create `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


class _Custom:
    def __init__(self) -> None:
        self.weights = torch.zeros(2)


def test_code_carrying_pickle_is_refused_before_controlnet_aux_sees_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"state": _Payload(marker)}, tmp_path / "ControlNetHED.pth")
    core.clear_cache()
    with pytest.raises(core.UnsafeWeightsFile, match="not a plain weights file") as info:
        core.detect(photo(64, 64), "softedge_hed", [tmp_path])
    assert "ControlNetHED.pth" in str(info.value)
    assert not marker.exists(), "the pickle's code ran"


def test_custom_class_pickle_and_corrupt_file_are_refused(tmp_path: Path) -> None:
    torch.save(_Custom(), tmp_path / "custom.pth")
    with pytest.raises(core.UnsafeWeightsFile, match="not a plain weights file") as info:
        core.verify_weights_file(tmp_path / "custom.pth")
    assert "_Custom" in str(info.value) and "\x1b" not in str(info.value)
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(core.UnsafeWeightsFile, match="garbage.pth"):
        core.verify_weights_file(tmp_path / "garbage.pth")
    torch.save({"w": torch.ones(3)}, tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:100])
    with pytest.raises(core.UnsafeWeightsFile, match="Cannot read .*truncated"):
        core.verify_weights_file(tmp_path / "truncated.pth")
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pth")
    core.verify_weights_file(tmp_path / "plain.pth")
