"""An embedded sample subject: a few deterministic "photos" of a made-up toy, drawn with Pillow.

Real photos cannot ship with the pack, but the main job must run on a fresh machine with no
user data. The toy (a striped ball with a face and a blue hat) is shown from several angles,
sizes and backgrounds, like a small DreamBooth set, so training has a consistent subject to learn.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

BACKGROUNDS = [(196, 222, 240), (236, 226, 205), (205, 232, 205), (240, 210, 215), (222, 222, 222), (250, 240, 200)]


def _toy(size: int, rng: random.Random) -> Image.Image:
    toy = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(toy)
    pad = size // 10
    box = (pad, pad + size // 6, size - pad, size - pad)
    draw.ellipse(box, fill=(220, 40, 40, 255))
    stripe_h = (box[3] - box[1]) // 7
    for i in range(1, 7, 2):
        top = box[1] + i * stripe_h
        draw.rectangle((box[0], top, box[2], top + stripe_h), fill=(250, 200, 40, 255))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    toy.putalpha(Image.composite(toy.getchannel("A"), mask, mask))
    draw = ImageDraw.Draw(toy)
    cx, cy = size // 2, (box[1] + box[3]) // 2
    eye = size // 16
    for dx in (-size // 7, size // 7):
        draw.ellipse((cx + dx - eye, cy - eye * 2, cx + dx + eye, cy), fill=(255, 255, 255, 255))
        draw.ellipse((cx + dx - eye // 2, cy - eye * 3 // 2, cx + dx + eye // 2, cy - eye // 2), fill=(20, 20, 20, 255))
    draw.arc((cx - size // 6, cy, cx + size // 6, cy + size // 6), 20, 160, fill=(20, 20, 20, 255), width=max(2, size // 40))
    hat = [(cx - size // 5, box[1] + size // 20), (cx + size // 5, box[1] + size // 20), (cx, pad // 2)]
    draw.polygon(hat, fill=(40, 80, 200, 255))
    return toy.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC, expand=False)


def write_sample_subject(folder: Path, count: int = 6, size: int = 256, seed: int = 0) -> list[Path]:
    """Write ``count`` PNGs (and a caption-free layout) into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        bg = Image.new("RGB", (size, size), BACKGROUNDS[i % len(BACKGROUNDS)])
        floor = ImageDraw.Draw(bg)
        floor.rectangle((0, int(size * rng.uniform(0.6, 0.8)), size, size), fill=tuple(c - 40 for c in bg.getpixel((0, 0))))
        toy_size = int(size * rng.uniform(0.5, 0.8))
        toy = _toy(toy_size, rng)
        x = rng.randint(0, size - toy_size)
        y = rng.randint(size // 8, size - toy_size)
        bg.paste(toy, (x, y), toy)
        path = folder / f"toy_{i:02d}.png"
        bg.filter(ImageFilter.SMOOTH).save(path)
        paths.append(path)
    return paths
