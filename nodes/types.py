"""Custom ComfyUI socket types shared by the pack's nodes (one place for each concept)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_api.latest import io

# A trained LoRA travelling from the train node to the loader without a round-trip through the
# LoRA dropdown (which only refreshes when the page reloads).
LoraFile = io.Custom("DREAMBOOTH_LORA")


@dataclass(frozen=True)
class TrainedLora:
    """Payload of a DREAMBOOTH_LORA socket: where the file is and what the trainer wrote into it."""

    path: Path
    name: str  # relative to models/loras, as LoraLoader's dropdown shows it
    metadata: dict[str, Any] = field(default_factory=dict)
