"""Names of the files a run writes into its folder that others read back (the node's outputs, the live
view's gallery after a resume): one definition, next to nothing heavy, so the ComfyUI layer can import it
at start-up."""

from __future__ import annotations

import re
from pathlib import Path

SAMPLES_DIR = "samples"  # under the run folder
_SAMPLE_NAME = re.compile(r"^step_(\d+)_(\d+)\.png$")


def sample_path(output_dir: Path, step: int, index: int) -> Path:
    """Where the validation sample of prompt ``index`` at ``step`` is saved."""
    return output_dir / SAMPLES_DIR / f"step_{step:06d}_{index}.png"


def saved_samples(output_dir: Path, up_to: int | None = None) -> list[tuple[int, int, Path]]:
    """(step, prompt index, path) of the validation samples in a run folder, oldest first."""
    found = []
    for path in (output_dir / SAMPLES_DIR).glob("step_*.png"):
        match = _SAMPLE_NAME.match(path.name)
        if match and (up_to is None or int(match.group(1)) <= up_to):
            found.append((int(match.group(1)), int(match.group(2)), path))
    return sorted(found)
