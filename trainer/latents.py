"""The VAE side of training: each image's latent posterior, encoded once (or on demand) and drawn from
per step. Knows nothing of the run: it gets the pixels and the encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import buckets as bucketing


class LatentCache:
    """VAE posteriors (mean, std) of images (and their mirrors, with random_flip).

    With ``keep``, ``fill()`` encodes everything once, in batches of one size each (aspect buckets
    give images of several sizes), so the VAE can be freed before the first step and never shares
    memory with training; without it (``cache_latents`` off), ``get()`` encodes on demand every time.
    ``recrop(index, bucket)``: the image cut to another bucket (prior preservation's square class
    images in an instance batch's bucket); entries are kept per bucket.
    """

    def __init__(self, pixels: list[torch.Tensor], encode: Any, *, keep: bool, flips: bool,
                 recrop: Callable[[int, bucketing.Bucket], torch.Tensor] | None = None) -> None:
        self.pixels = pixels
        self._encode = encode
        self.keep = keep
        self.flips = flips
        self.recrop = recrop
        self.entries: dict[tuple[int, bool, bucketing.Bucket], tuple[torch.Tensor, torch.Tensor]] = {}

    def bucket_of(self, index: int) -> bucketing.Bucket:
        return self.pixels[index].shape[-1], self.pixels[index].shape[-2]

    def _pixels(self, index: int, bucket: bucketing.Bucket) -> torch.Tensor:
        if bucket == self.bucket_of(index):
            return self.pixels[index]
        if self.recrop is None:
            raise ValueError(f"image {index} is {self.bucket_of(index)}, not {bucket}, and cannot be cut again")
        return self.recrop(index, bucket)

    def get(self, index: int, flip: bool, bucket: bucketing.Bucket | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, flip, bucket or self.bucket_of(index))
        if key in self.entries:
            return self.entries[key]
        pixels = self._pixels(index, key[2])
        mean, std = self._encode([pixels.flip(-1) if flip else pixels])
        entry = (mean[0], std[0])
        if self.keep:
            self.entries[key] = entry
        return entry

    def fill(self, buckets: Sequence[bucketing.Bucket] | None = None) -> None:
        """Encode every image at its own size, or (``buckets``) cut to each of those buckets."""
        groups: dict[bucketing.Bucket, list[int]] = {}
        if buckets is None:
            for i in range(len(self.pixels)):
                groups.setdefault(self.bucket_of(i), []).append(i)
        else:
            groups = {b: list(range(len(self.pixels))) for b in buckets}
        for bucket, indices in groups.items():
            pixels = [self._pixels(i, bucket) for i in indices]
            for flip in (False, True) if self.flips else (False,):
                mean, std = self._encode([p.flip(-1) if flip else p for p in pixels])
                for row, i in enumerate(indices):
                    self.entries[(i, flip, bucket)] = (mean[row], std[row])

    def sample(self, indices: Sequence[int], flips: Sequence[bool], gen: torch.Generator,
               bucket: bucketing.Bucket | None = None) -> torch.Tensor:
        """A latent drawn from each image's posterior (mean + std * noise from ``gen``), stacked."""
        rows = [self.get(i, flip, bucket) for i, flip in zip(indices, flips, strict=True)]
        return draw(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), gen)


def draw(mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A latent from each posterior: ``mean + std * noise``, the noise drawn on the CPU from ``gen``
    (the same numbers on every device)."""
    return mean + std * torch.randn(mean.shape, generator=gen).to(mean.device, mean.dtype)
