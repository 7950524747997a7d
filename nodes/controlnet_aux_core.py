"""ControlNet hint preprocessors without ComfyUI: numpy/PIL/torch plus a lazily imported controlnet_aux.

The node module (`controlnet.py`) only resolves folders and converts sockets; everything that can
be tested without a server lives here. This module is loaded on its own by the unit tests, so it
imports nothing from the pack and nothing from ComfyUI.

Weights are never downloaded. Each detector names the files it needs, spelled as in the
`lllyasviel/Annotators` model repository; they are looked up in the folders the caller passes
(ComfyUI's `annotators` model folder), checked to be plain tensors, and handed to controlnet_aux
as local paths, which keeps controlnet_aux away from the hub (it downloads only when it is given
a repository id instead of an existing folder).
"""

from __future__ import annotations

import inspect
import logging
import math
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ANNOTATORS_FOLDER = "annotators"
WEIGHTS_SOURCE = "the lllyasviel/Annotators model repository on Hugging Face"
NO_PREPROCESSOR = "none (image is a hint)"

# controlnet_aux snaps both sides of the image it analyses to multiples of 64, which distorts the
# aspect ratio (96x64 becomes 128x64). Padding to that multiple first, and cropping the pad off
# the result, lets every detector see undistorted content.
_SNAP = 64
_CACHE_SIZE = 2


@dataclass(frozen=True)
class DetectorSpec:
    """One entry of the preprocessor dropdown."""

    name: str
    summary: str
    loader: str
    files: tuple[str, ...] = ()
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)


_SPECS: tuple[DetectorSpec, ...] = (
    DetectorSpec("canny", "Canny edges (OpenCV)", "canny"),
    DetectorSpec("depth_midas", "MiDaS DPT-Hybrid depth", "midas", ("dpt_hybrid-midas-501f0c75.pt",)),
    DetectorSpec("openpose", "OpenPose body skeleton", "openpose_body", ("body_pose_model.pth",),
                 {"include_body": True, "include_hand": False, "include_face": False}),
    DetectorSpec("openpose_full", "OpenPose body, hands and face", "openpose_full",
                 ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
                 {"include_body": True, "include_hand": True, "include_face": True}),
    DetectorSpec("lineart_realistic", "line art (informative-drawings model)", "lineart",
                 ("sk_model.pth", "sk_model2.pth"), {"coarse": False}),
    DetectorSpec("lineart_coarse", "coarse line art (informative-drawings model)", "lineart",
                 ("sk_model.pth", "sk_model2.pth"), {"coarse": True}),
    DetectorSpec("lineart_standard", "line art from a difference of Gaussians", "lineart_standard"),
    DetectorSpec("softedge_hed", "HED soft edges", "hed", ("ControlNetHED.pth",), {"scribble": False}),
    DetectorSpec("softedge_pidinet", "PiDiNet soft edges", "pidi", ("table5_pidinet.pth",),
                 {"scribble": False}),
    DetectorSpec("scribble_hed", "scribble from HED edges", "hed", ("ControlNetHED.pth",), {"scribble": True}),
    DetectorSpec("scribble_pidinet", "scribble from PiDiNet edges", "pidi", ("table5_pidinet.pth",),
                 {"scribble": True}),
    DetectorSpec("scribble_xdog", "scribble from an XDoG filter", "xdog"),
    DetectorSpec("mlsd", "M-LSD straight lines", "mlsd", ("mlsd_large_512_fp32.pth",)),
    DetectorSpec("normal_bae", "BAE surface normals", "normalbae", ("scannet.pt",)),
    DetectorSpec("shuffle", "content shuffle (random warp, uses the seed)", "shuffle"),
    DetectorSpec("tile", "tile: the image blurred by down- and up-sampling", "tile"),
)

DETECTORS: dict[str, DetectorSpec] = {spec.name: spec for spec in _SPECS}
DETECTOR_NAMES: tuple[str, ...] = tuple(DETECTORS)


class AnnotatorError(RuntimeError):
    """Base class of the errors a user can fix by putting the right file in the right place."""


class MissingAnnotatorWeights(AnnotatorError, FileNotFoundError):
    """A detector's weights file is in none of the annotator folders."""


class UnsafeWeightsFile(AnnotatorError, ValueError):
    """A weights file is a pickle that holds more than tensors (or cannot be read at all)."""


@dataclass(frozen=True)
class DetectOptions:
    """Knobs that only some detectors read; the others ignore them."""

    canny_low: int = 100
    canny_high: int = 200
    seed: int = 0  # shuffle is the only random detector
    xdog_threshold: int = 32
    tile_levels: int = 3


def weights_table() -> list[tuple[str, tuple[str, ...]]]:
    """(detector, files) for every detector, in dropdown order; an empty tuple needs no file."""
    return [(spec.name, spec.files) for spec in _SPECS]


# --------------------------------------------------------------------------- IMAGE <-> numpy


def image_to_numpy(image: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE ([B,H,W,C] or [H,W,C] float in 0..1) -> uint8 RGB array [B,H,W,3]."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE tensor [batch, height, width, channels], got shape {tuple(image.shape)}")
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"expected 1, 3 or 4 image channels, got {channels}")
    pixels = image.detach().to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0).numpy()
    # Round, not truncate: LoadImage stores v/255, and truncation could turn it into v-1.
    return np.ascontiguousarray(np.rint(pixels * 255.0).astype(np.uint8))


def numpy_to_image(pixels: np.ndarray) -> torch.Tensor:
    """uint8 array [B,H,W,3] (or [H,W,3]) -> ComfyUI IMAGE float32 tensor [B,H,W,3] in 0..1."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32) / 255.0


# --------------------------------------------------------------------------- weights


def resolve_weights(detector: str, search_dirs: Sequence[Path | str]) -> list[Path]:
    """The detector's weights files, each from the first folder that holds it.

    Raises MissingAnnotatorWeights naming the file, the detector and the folder to put it in.
    """
    spec = _spec(detector)
    dirs = [Path(d) for d in search_dirs]
    found: list[Path] = []
    for filename in spec.files:
        path = next((d / filename for d in dirs if (d / filename).is_file()), None)
        if path is None:
            target = dirs[0] if dirs else Path(ANNOTATORS_FOLDER)
            searched = ", ".join(str(d) for d in dirs) or "(no folder registered)"
            others = [f for f in spec.files if f != filename]
            also = f" This preprocessor also needs {', '.join(others)}." if others else ""
            raise MissingAnnotatorWeights(
                f"Preprocessor '{detector}' needs the weights file '{filename}', which is in none of "
                f"the annotator folders.\n"
                f"Put it into: {target}\n"
                f"It is published under that name in {WEIGHTS_SOURCE}; nothing is downloaded "
                f"automatically.{also}\n"
                f"Searched: {searched}. More folders can be listed under '{ANNOTATORS_FOLDER}:' in "
                f"extra_model_paths.yaml."
            )
        found.append(path)
    return found


def verify_weights_file(path: Path | str) -> None:
    """Refuse a .pth/.pt file unless it unpickles with `weights_only=True`.

    controlnet_aux calls plain `torch.load(path)`; on torch older than 2.6 that runs arbitrary
    code from the pickle, so a file must pass the restricted unpickler here first.
    """
    path = Path(path)
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsFile(
            f"Refusing {path}: it is not a plain weights file (a pickle holding only tensors and "
            f"plain containers), so loading it could run code stored in it. Replace it with the "
            f"original file of that name from {WEIGHTS_SOURCE}. The restricted unpickler said: "
            f"{_unpickler_detail(exc)}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UnsafeWeightsFile(
            f"Cannot read {path} as a torch weights file (truncated or corrupt download?): {exc}. "
            f"Download it again from {WEIGHTS_SOURCE}."
        ) from exc


def _unpickler_detail(exc: BaseException) -> str:
    # torch wraps the useful line ("Unsupported global: GLOBAL pkg.Class ...") in advice about
    # weights_only=False, which is exactly what must not be done here.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail = match.group(1) if match else text.strip().splitlines()[0]
    return detail.split(" Please use ")[0].strip()


# --------------------------------------------------------------------------- detectors


def _spec(detector: str) -> DetectorSpec:
    try:
        return DETECTORS[detector]
    except KeyError:
        raise ValueError(f"unknown preprocessor {detector!r}; expected one of {', '.join(DETECTOR_NAMES)}") from None


def _from_local(cls: Any, paths: list[Path], **names: str) -> Any:
    # os.path.join(folder, absolute) is the absolute path, so every file may sit in a different
    # annotator folder while controlnet_aux still sees an existing folder and stays off the hub.
    return cls.from_pretrained(str(paths[0].parent), **names)


def _build(spec: DetectorSpec, paths: list[Path]) -> Any:
    """Instantiate a controlnet_aux detector (or one of ours) from local files only."""
    kind = spec.loader
    if kind == "canny":
        from controlnet_aux.canny import CannyDetector

        return CannyDetector()
    if kind == "shuffle":
        from controlnet_aux.shuffle import ContentShuffleDetector

        return ContentShuffleDetector()
    if kind == "lineart_standard":
        from controlnet_aux.lineart_standard import LineartStandardDetector

        return LineartStandardDetector()
    if kind == "xdog":
        return _xdog
    if kind == "tile":
        return _tile
    p = [str(x) for x in paths]
    if kind == "midas":
        from controlnet_aux.midas import MidasDetector

        return _from_local(MidasDetector, paths, filename=p[0])
    if kind == "openpose_body":
        # from_pretrained insists on the hand and face models too; the body skeleton needs only this.
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body

        return OpenposeDetector(Body(p[0]))
    if kind == "openpose_full":
        from controlnet_aux.open_pose import OpenposeDetector

        return _from_local(OpenposeDetector, paths, filename=p[0], hand_filename=p[1], face_filename=p[2])
    if kind == "lineart":
        from controlnet_aux.lineart import LineartDetector

        return _from_local(LineartDetector, paths, filename=p[0], coarse_filename=p[1])
    if kind == "hed":
        from controlnet_aux.hed import HEDdetector

        return _from_local(HEDdetector, paths, filename=p[0])
    if kind == "pidi":
        from controlnet_aux.pidi import PidiNetDetector

        return _from_local(PidiNetDetector, paths, filename=p[0])
    if kind == "mlsd":
        from controlnet_aux.mlsd import MLSDdetector

        return _from_local(MLSDdetector, paths, filename=p[0])
    if kind == "normalbae":
        from controlnet_aux.normalbae import NormalBaeDetector

        return _from_local(NormalBaeDetector, paths, filename=p[0])
    raise AssertionError(f"no builder for {kind!r}")


_cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_cache_lock = threading.Lock()


def load_detector(detector: str, search_dirs: Sequence[Path | str]) -> Any:
    """A ready detector, reused while its weights files are unchanged (path, mtime, size)."""
    spec = _spec(detector)
    paths = resolve_weights(detector, search_dirs)
    stamps = []
    for path in paths:
        st = path.stat()
        stamps.append((str(path.resolve()), st.st_mtime_ns, st.st_size))
    key = (spec.loader, tuple(stamps))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        for path in paths:
            verify_weights_file(path)
        logger.info("loading preprocessor %s from %s", detector, ", ".join(str(p) for p in paths) or "(no weights)")
        instance = _build(spec, paths)
        _cache[key] = instance
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return instance


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _to_device(instance: Any, device: torch.device | str) -> None:
    # OpenposeDetector.to() also moves the hand/face models, which are None for the body-only one.
    parts = [getattr(instance, a, None) for a in ("body_estimation", "hand_estimation", "face_estimation")]
    if any(part is not None for part in parts):
        for part in parts:
            if part is not None:
                part.to(device)
    elif hasattr(instance, "to"):
        instance.to(device)


# --------------------------------------------------------------------------- geometry


def detection_size(height: int, width: int, detect_resolution: int) -> tuple[int, int]:
    """(h, w) with the short side at `detect_resolution` and the aspect ratio kept."""
    if detect_resolution < 1:
        raise ValueError(f"detect_resolution must be at least 1, got {detect_resolution}")
    k = detect_resolution / min(height, width)
    return max(1, round(height * k)), max(1, round(width * k))


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    if pixels.shape[:2] == (height, width):
        return pixels
    shrinking = height * width < pixels.shape[0] * pixels.shape[1]
    out = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    return out[..., None] if out.ndim == 2 else out


def _pad_to_snap(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[:2]
    ph, pw = (-h) % _SNAP, (-w) % _SNAP
    if not ph and not pw:
        return pixels
    return np.pad(pixels, ((0, ph), (0, pw), (0, 0)), mode="edge")


def _as_rgb(detected: Any) -> np.ndarray:
    out = np.asarray(detected)
    if out.dtype != np.uint8:
        out = np.clip(out, 0, 255).astype(np.uint8)
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out[..., :3]


def _call(instance: Any, pixels: np.ndarray, kwargs: dict[str, Any]) -> Any:
    # The detectors disagree on keywords (lineart_standard has no image_resolution and no
    # **kwargs): pass only what each one declares.
    params = inspect.signature(instance).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return instance(pixels, **kwargs)


def _xdog(input_image: np.ndarray, threshold: int = 32, **_: Any) -> np.ndarray:
    """Scribble from an extended difference of Gaussians (ControlNet 1.1's weight-free scribble)."""
    import cv2

    x = input_image.astype(np.float32)
    g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros(input_image.shape[:2], dtype=np.uint8)
    out[2 * (255 - dog.astype(np.int32)) > threshold] = 255
    return out


def _tile(input_image: np.ndarray, levels: int = 3, **_: Any) -> np.ndarray:
    """The image with detail removed: shrunk by 2**levels and brought back with pyramid upsampling."""
    import cv2

    h, w = input_image.shape[:2]
    small = cv2.resize(input_image, (max(1, w >> levels), max(1, h >> levels)), interpolation=cv2.INTER_AREA)
    for _ in range(levels):
        small = cv2.pyrUp(small)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _detect_one(instance: Any, spec: DetectorSpec, pixels: np.ndarray, detect_resolution: int,
                options: DetectOptions, seed: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    dh, dw = detection_size(height, width, detect_resolution)
    resized = _resize(pixels, dh, dw)
    if spec.loader == "xdog":
        detected = _xdog(resized, threshold=options.xdog_threshold)
    elif spec.loader == "tile":
        detected = _tile(resized, levels=options.tile_levels)
    else:
        padded = _pad_to_snap(resized)
        ph, pw = padded.shape[:2]
        kwargs: dict[str, Any] = {"detect_resolution": min(ph, pw), "image_resolution": min(ph, pw),
                                  "output_type": "np", **spec.call_kwargs}
        if spec.loader == "canny":
            kwargs.update(low_threshold=options.canny_low, high_threshold=options.canny_high)
        state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            with torch.inference_mode():
                detected = _call(instance, padded, kwargs)
        finally:
            np.random.set_state(state)
        detected = _as_rgb(detected)
        if detected.shape[:2] != (ph, pw):
            detected = _resize(detected, ph, pw)
        detected = detected[:dh, :dw]
    return _resize(_as_rgb(detected), height, width)


def detect(
    images: np.ndarray,
    detector: str,
    search_dirs: Sequence[Path | str],
    *,
    detect_resolution: int = 512,
    options: DetectOptions | None = None,
    device: torch.device | str = "cpu",
    before_each: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Run `detector` on every image of a uint8 batch [B,H,W,3]; return hints of the same shape.

    Each image is analysed with its short side at `detect_resolution` and the aspect ratio kept;
    the hint is resized back to the image's own size, so it lines up pixel for pixel.
    `before_each(index, total)` runs before every image (progress, interruption checks).
    """
    options = options or DetectOptions()
    if images.ndim == 3:
        images = images[None]
    spec = _spec(detector)
    instance = load_detector(detector, search_dirs)
    if spec.files:
        _to_device(instance, device)
    try:
        hints = []
        for index, pixels in enumerate(images):
            if before_each is not None:
                before_each(index, len(images))
            hints.append(_detect_one(instance, spec, pixels, detect_resolution, options, options.seed + index))
    finally:
        if spec.files and str(device) != "cpu":
            # ComfyUI's memory manager does not know these models: do not keep them in VRAM.
            _to_device(instance, "cpu")
    return np.stack(hints)


def hint_size(image_height: int, image_width: int, width: int = 0, height: int = 0, multiple: int = 8) -> tuple[int, int]:
    """(width, height) to generate at: 0 takes the size from the image, keeping its aspect ratio.

    Both sides are rounded to a multiple of `multiple` (the latent is 1/8 of the image).
    """

    def snap(value: float) -> int:
        # Half up, not Python's half-to-even: 100 -> 104 and 60 -> 64, as a user would expect.
        return max(multiple, math.floor(value / multiple + 0.5) * multiple)

    if width < 0 or height < 0:
        raise ValueError(f"width and height must be 0 (from the image) or positive, got {width}x{height}")
    aspect = image_width / image_height
    if width and height:
        return snap(width), snap(height)
    if width:
        return snap(width), snap(width / aspect)
    if height:
        return snap(height * aspect), snap(height)
    return snap(image_width), snap(image_height)

