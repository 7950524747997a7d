"""The CLIP tokenizer of SD1.x/2.x, read from the files the pack ships: the one place it is built.

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
    """The CLIP tokenizer for ``family`` ("sd1" or "sd2"); read once per process (49k BPE merges)."""
    from transformers import CLIPTokenizer

    # SD2's OpenCLIP pads with "!" (token 0) where SD1's CLIP pads with the end token.
    extra = {"pad_token": "!"} if family == "sd2" else {}
    # from_pretrained on the shipped folder works with transformers 4 (the Python tokenizer) and
    # 5 (backed by the tokenizers library); each version's own rules are what the encoder sees.
    return CLIPTokenizer.from_pretrained(
        str(TOKENIZER_DIR), model_max_length=CLIP_MAX_LENGTH, local_files_only=True, **extra
    )
