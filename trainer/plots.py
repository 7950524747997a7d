"""The loss curve as a picture, drawn with Pillow alone (no plotting library to install)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

_BG = (250, 250, 250)
_GRID = (222, 222, 222)
_AXIS = (90, 90, 90)
_RAW = (170, 190, 215)
_SMOOTH = (25, 90, 200)
_TEXT = (40, 40, 40)


def smooth(values: Sequence[float], strength: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (what TensorBoard's smoothing slider shows).

    Diffusion losses depend mostly on the random timestep of each step, so the raw curve is noise;
    the trend is only visible smoothed.
    """
    out: list[float] = []
    avg = 0.0
    for i, value in enumerate(values, start=1):
        avg = strength * avg + (1 - strength) * value
        out.append(avg / (1 - strength**i))
    return out


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def render_loss_curve(points: Sequence[tuple[int, float]], *, total_steps: int | None = None,
                      width: int = 512, height: int = 256, title: str = "loss") -> Image.Image:
    """An RGB image of loss over steps: raw values faint, their moving average bold.

    Non-finite losses are left out (and counted in the title); with no points the image says so.
    """
    image = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    finite = sorted((int(s), float(v)) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v))
    dropped = len(points) - len(finite)
    left, right, top, bottom = 52, width - 12, 24, height - 26
    if not finite:
        draw.text((left, height // 2 - 6), "no loss values recorded yet", fill=_TEXT, font=font)
        return image
    steps = [s for s, _ in finite]
    raw = [v for _, v in finite]
    avg = smooth(raw)
    x0, x1 = min(steps), max(max(steps), total_steps or 0)
    if x1 <= x0:
        x1 = x0 + 1
    # Scale to the bulk of the values: one early spike must not flatten the rest of the curve.
    ordered = sorted(raw)
    y_lo = min(ordered[0], min(avg))
    y_hi = max(ordered[min(len(ordered) - 1, int(0.98 * (len(ordered) - 1)))], max(avg))
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def xy(step: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step - x0) / (x1 - x0)
        y = bottom - (bottom - top) * (min(max(value, y_lo), y_hi) - y_lo) / (y_hi - y_lo)
        return x, y

    for i in range(5):
        frac = i / 4
        y = bottom - (bottom - top) * frac
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((4, y - 6), _fmt(y_lo + frac * (y_hi - y_lo)), fill=_AXIS, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS)
    draw.text((left, bottom + 6), str(x0), fill=_AXIS, font=font)
    end_label = str(x1)
    draw.text((right - 6 * len(end_label), bottom + 6), end_label, fill=_AXIS, font=font)
    draw.text(((left + right) // 2 - 12, bottom + 6), "step", fill=_AXIS, font=font)

    if len(finite) == 1:
        x, y = xy(*finite[0])
        draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=_SMOOTH)
    else:
        draw.line([xy(s, v) for s, v in finite], fill=_RAW, width=1)
        draw.line([xy(s, v) for s, v in zip(steps, avg, strict=True)], fill=_SMOOTH, width=2)
    label = f"{title}: step {steps[-1]}" + (f"/{total_steps}" if total_steps else "")
    label += f", last {_fmt(raw[-1])}, smoothed {_fmt(avg[-1])}"
    if dropped:
        label += f", {dropped} non-finite left out"
    draw.text((left, 6), label, fill=_TEXT, font=font)
    return image
