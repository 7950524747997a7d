"""The CLIP tokenizers of SD1.x/2.x/XL, read from the files the pack ships: the one place they are built.

Every family's encoders share CLIP's BPE vocabulary; they differ only in padding (SD1's CLIP pads with
the end token, OpenCLIP with "!"). SDXL has one of each, in that order.

Training (``models.py``) and the identifier checks (``identifiers.py``) share this tokenizer, so an
identifier is judged by exactly the token ids the text encoder will see. transformers is imported
on first use, not at import time: the node layer imports ``identifiers`` when ComfyUI loads the pack.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
# The shipped folder has no tokenizer_config.json, and without one transformers reports a
# model_max_length of 8192 (or "very large"): CLIP's context is 77 tokens.
CLIP_MAX_LENGTH = 77


@functools.cache
def load_tokenizer(family: str = "sd1") -> Any:
    """The CLIP tokenizer padding as ``family``'s encoder does ("sd1": CLIP-L, "sd2": OpenCLIP); read once
    per process (49k BPE merges)."""
    from transformers import CLIPTokenizer

    # SD2's OpenCLIP pads with "!" (token 0) where SD1's CLIP pads with the end token.
    extra = {"pad_token": "!"} if family == "sd2" else {}
    # from_pretrained on the shipped folder works with transformers 4 (the Python tokenizer) and
    # 5 (backed by the tokenizers library); each version's own rules are what the encoder sees.
    return CLIPTokenizer.from_pretrained(
        str(TOKENIZER_DIR), model_max_length=CLIP_MAX_LENGTH, local_files_only=True, **extra
    )


def tokenizers_for(family: str) -> list[Any]:
    """One tokenizer per text encoder of ``family`` ("sd1", "sd2", "sdxl"), in the model's order."""
    return [load_tokenizer("sd1"), load_tokenizer("sd2")] if family == "sdxl" else [load_tokenizer(family)]
