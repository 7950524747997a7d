"""How a prompt becomes the UNet's conditioning, for every family: the one place that knows how many
text encoders a model has and which of their outputs it reads.

- SD1.x: CLIP-L's last hidden state.
- SD2.x: OpenCLIP ViT-H's penultimate hidden state (the loaded encoder already ends there).
- SDXL: CLIP-L's and OpenCLIP bigG's penultimate hidden states side by side (768 + 1280 = 2048 wide), the
  pooled bigG embedding (end token through ``text_projection``), and per image six numbers: original
  size, crop top-left and target size (``size_ids``), as diffusers' SDXL pipeline and kohya pass them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .families import Family


@dataclass
class Conditioning:
    hidden: torch.Tensor  # (batch, 77, width): the cross-attention context
    pooled: torch.Tensor | None = None  # (batch, 1280) for SDXL

    def row(self, index: int) -> Conditioning:
        """One prompt's conditioning (no batch dimension), for a cache keyed by prompt."""
        return Conditioning(self.hidden[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def stack(rows: Sequence[Conditioning]) -> Conditioning:
        pooled = [r.pooled for r in rows]
        return Conditioning(torch.stack([r.hidden for r in rows]),
                            None if any(p is None for p in pooled) else torch.stack(pooled))  # type: ignore[misc]


def token_ids(tokenizers: Sequence[Any], prompt: str) -> tuple[torch.Tensor, ...]:
    """The prompt as each encoder reads it: one (77,) id tensor per tokenizer, padded, truncated."""
    return tuple(
        tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids[0]
        for tok in tokenizers
    )


def encode_prompts(spec: Family, encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]) -> Conditioning:
    """Conditioning of a batch: ``ids[i]`` is the (batch, 77) token ids for ``encoders[i]``."""
    if len(encoders) != spec.text_encoder_count or len(ids) != len(encoders):
        raise ValueError(f"{spec.label} has {spec.text_encoder_count} text encoder(s), got {len(encoders)} "
                         f"encoders and {len(ids)} id tensors")
    if spec.text_encoder_count == 1:
        return Conditioning(encoders[0](ids[0])[0])
    first = encoders[0](ids[0], output_hidden_states=True)
    second = encoders[1](ids[1], output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].dtype)], dim=-1)
    return Conditioning(hidden, second.text_embeds)


def size_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning of one image: (orig h, orig w, crop top, crop left, target h, target w)."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


def unet_kwargs(spec: Family, cond: Conditioning, time_ids: torch.Tensor | None) -> dict[str, Any]:
    """The keyword arguments the UNet takes besides latents and timesteps."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": cond.hidden}
    if spec.size_conditioning:
        if cond.pooled is None or time_ids is None:
            raise ValueError("SDXL needs the pooled prompt embedding and the size ids of every image")
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.hidden.device,
                                                                                            cond.hidden.dtype)}
    return kwargs
