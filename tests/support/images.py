"""Test pictures: a real subject photo when the DreamBench folder is there, a synthetic scene if not."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .paths import DREAMBENCH_DIR

DOG_DIR = DREAMBENCH_DIR / "dog"


def photo(width: int, height: int) -> np.ndarray:
    """A DreamBench dog photo (read in place) as uint8 RGB at width x height, or a synthetic scene
    with hard and soft edges when the dataset is not beside the checkout (e.g. a bare clone)."""
    photos = sorted(DOG_DIR.glob("*.jpg")) if DOG_DIR.is_dir() else []
    if photos:
        with Image.open(photos[0]) as img:
            return np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)).copy()
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1),
                    np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    out[(xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 3) ** 2] = (240, 230, 20)
    out[height // 5: height // 3, width // 8: width // 2] = (10, 10, 200)
    return out
