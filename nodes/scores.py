"""Node that scores generated images the way the DreamBooth paper does: CLIP-I, CLIP-T and DINO.

The scoring itself is ``trainer/scores.py``; this module picks the model folders, converts IMAGE
batches, pairs prompts with images, keeps the loaded models between runs and writes the report.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import comfy.model_management
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image
from typing_extensions import override

from ..trainer import scores

logger = logging.getLogger(__name__)

CATEGORY = "DreamBooth/evaluate"
SCORES_FOLDER = "dreambooth_scores"  # models/dreambooth_scores/<name>/, as trainer.scores.SCORES_MODELS_DIR says
NO_MODEL = "none"


# --------------------------------------------------------------------------------------------- model folders


def score_model_dirs() -> list[Path]:
    """The `dreambooth_scores` model folders, registering `<models_dir>/dreambooth_scores` on first use.

    Folders added under `dreambooth_scores:` in extra_model_paths.yaml keep their place in front.
    """
    default = os.path.join(folder_paths.models_dir, SCORES_FOLDER)
    if SCORES_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(SCORES_FOLDER, default, is_default=True)
    elif default not in folder_paths.get_folder_paths(SCORES_FOLDER):
        folder_paths.add_model_folder_path(SCORES_FOLDER, default)
    return [Path(p) for p in folder_paths.get_folder_paths(SCORES_FOLDER)]


def model_names() -> list[str]:
    """Sub-folder names of every `dreambooth_scores` folder (get_filename_list lists files, not folders)."""
    names: list[str] = []
    for base in score_model_dirs():
        try:
            found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:  # a folder not created yet
            continue
        names.extend(n for n in found if n not in names)
    return names


def _default(names: list[str], hint: str) -> str:
    return next((n for n in names if hint in n.lower()), NO_MODEL)


def resolve_model(input_name: str, name: str) -> Path | None:
    """The folder a combo value names, None for "none"; a ValueError naming the input if it is gone."""
    if name == NO_MODEL:
        return None
    dirs = score_model_dirs()
    for base in dirs:
        if (base / name).is_dir():
            return base / name
    upstream = scores.CLIP_UPSTREAM if input_name == "clip_model" else scores.DINO_UPSTREAM
    raise ValueError(
        f"{input_name}: no folder {name!r} in {', '.join(str(d) for d in dirs)}. Download {upstream} in "
        f"transformers format and put its files in ComfyUI's {scores.SCORES_MODELS_DIR}/{name}/, or pick "
        f"another {input_name} (or '{NO_MODEL}' to skip its scores)."
    )


def _stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What identifies a folder's contents cheaply: its files' names, sizes and mtimes."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


# --------------------------------------------------------------------------------------------- model cache


class _ModelSlot:
    """One loaded model of a kind, kept between runs while its folder and files stay the same.

    Lifetime: a model stays on ComfyUI's device until another folder (or changed files) is asked
    for, or its input is set to "none"; then it is dropped before anything new loads, so at most
    one CLIP and one DINO model are held at a time.
    """

    def __init__(self, input_name: str, loader: Any) -> None:
        self.input_name, self.loader = input_name, loader
        self.key: tuple[Any, ...] | None = None
        self.model: Any = None
        self.lock = threading.Lock()

    def get(self, folder: Path | None) -> Any:
        with self.lock:
            if folder is None:
                self.release()
                return None
            device = comfy.model_management.get_torch_device()
            key = (str(folder.resolve()), _stamp(folder), str(device))
            if key == self.key:
                return self.model
            self.release()
            try:
                self.model = self.loader(folder, device)
            except scores.ScoreModelError as exc:
                raise ValueError(f"{self.input_name}: {exc}") from exc
            self.key = key
            logger.info("%s: loaded %s on %s", self.input_name, folder, device)
            return self.model

    def release(self) -> None:
        if self.model is not None:
            logger.info("%s: released %s", self.input_name, self.key[0] if self.key else "")
            self.model, self.key = None, None
            comfy.model_management.soft_empty_cache()


_CLIP = _ModelSlot("clip_model", scores.ClipScorer.load)
_DINO = _ModelSlot("dino_model", scores.DinoScorer.load)


def cached_models(clip_model: str, dino_model: str) -> scores.ScoreModels:
    """The models two combo values name, loaded through the cache the score node uses ("none": absent).

    Shared with the other nodes that score, so one CLIP and one DINO model stay loaded between them.
    """
    return scores.ScoreModels(clip_model=_CLIP.get(resolve_model("clip_model", clip_model)),
                              dino_model=_DINO.get(resolve_model("dino_model", dino_model)))


# --------------------------------------------------------------------------------------------- inputs


def to_pil(images: torch.Tensor, input_name: str) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C) floats in 0-1 -> PIL images (RGB, or L / RGBA for 1 / 4 channels)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{input_name} must be an IMAGE batch (B, H, W, C), got {shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{input_name} is an empty batch: connect at least one image")
    pixels = (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = []
    for frame in pixels:
        frame = np.ascontiguousarray(frame)
        out.append(Image.fromarray(frame[..., 0], mode="L") if frame.shape[-1] == 1
                   else Image.fromarray(frame, mode="RGB" if frame.shape[-1] == 3 else "RGBA"))
    return out


def split_prompts(prompt: str, count: int) -> list[str]:
    """One prompt per generated image: one non-empty line each, or a single line for all; [] if empty."""
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    if not lines:
        return []
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(
            f"prompt has {len(lines)} lines for {count} generated images: give one line per image, "
            "in batch order, or a single line used for all of them."
        )
    return lines


# --------------------------------------------------------------------------------------------- report


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.4f}"


def format_report(cells: list[scores.CellScores], clip_prompts: list[str], n_reference: int,
                  clip_name: str, dino_name: str, notes: list[str]) -> str:
    lines = [
        f"DreamBooth scores: {len(cells)} generated image(s) against {n_reference} reference image(s)",
        f"clip_model: {clip_name}   dino_model: {dino_name}",
        "",
        f"{'image':>5}  {'CLIP-I':>6}  {'CLIP-T':>6}  {'DINO':>6}  prompt for CLIP-T",
    ]
    for i, cell in enumerate(cells):
        text = clip_prompts[i] if clip_prompts else ""
        lines.append(f"{i + 1:>5}  {_fmt(cell.clip_i)}  {_fmt(cell.clip_t)}  {_fmt(cell.dino)}  {text}".rstrip())
    means = [_mean([getattr(c, k) for c in cells]) for k in ("clip_i", "clip_t", "dino")]
    lines.append(f"{'mean':>5}  {_fmt(means[0])}  {_fmt(means[1])}  {_fmt(means[2])}")
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)


def _mean(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return sum(real) / len(real) if real else None


# --------------------------------------------------------------------------------------------- node


class DreamBoothScore(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        names = model_names()
        where = f"ComfyUI's {scores.SCORES_MODELS_DIR}/<name>/ folder"
        return io.Schema(
            node_id="DreamBoothScore",
            display_name="DreamBooth Score",
            category=CATEGORY,
            description=(
                "Scores generated images as the DreamBooth paper does: CLIP-I and DINO (how much they look "
                "like the subject photos) and CLIP-T (how well they follow their prompt). Connect 'report' "
                "to Preview as Text to see the per-image table."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The generated images to score."),
                io.Image.Input(
                    "reference",
                    tooltip="Real photos of the subject (e.g. the dataset node's preview or a Load Image batch); "
                            "CLIP-I and DINO compare every generated image with every one of them.",
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip="The prompt of each generated image, one line per image in batch order, or one line "
                            "for all. Empty: CLIP-T is not computed.",
                ),
                io.String.Input(
                    "identifier",
                    default="",
                    tooltip="The subject's rare-token identifier, removed from the prompts for CLIP-T (as in "
                            "the paper: the text model does not know it). Empty: prompts are used as they are.",
                ),
                io.Combo.Input(
                    "clip_model",
                    options=[NO_MODEL, *names],
                    default=_default(names, "clip"),
                    tooltip=f"A CLIP model folder in {where} ({scores.CLIP_UPSTREAM}, transformers format) "
                            "for CLIP-I and CLIP-T; 'none' skips both.",
                ),
                io.Combo.Input(
                    "dino_model",
                    options=[NO_MODEL, *names],
                    default=_default(names, "dino"),
                    tooltip=f"A DINO ViT folder in {where} ({scores.DINO_UPSTREAM}, transformers format) for "
                            "DINO; 'none' skips it.",
                ),
            ],
            outputs=[
                io.Float.Output("clip_i", display_name="clip_i",
                                tooltip="Mean CLIP-I over all generated x reference pairs; 0.0 when skipped."),
                io.Float.Output("clip_t", display_name="clip_t",
                                tooltip="Mean CLIP-T over the generated images; 0.0 when skipped."),
                io.Float.Output("dino", display_name="dino",
                                tooltip="Mean DINO over all generated x reference pairs; 0.0 when skipped."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per-image table, the means, and which scores were skipped and why."),
            ],
        )

    @classmethod
    @override
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        # Re-run when a chosen model folder's files change, even if no widget changed.
        stamps = []
        for key in ("clip_model", "dino_model"):
            name = kwargs.get(key)
            folder = next((d / name for d in score_model_dirs() if isinstance(name, str) and name != NO_MODEL
                           and (d / name).is_dir()), None)
            stamps.append(None if folder is None else _stamp(folder))
        return tuple(stamps)

    @classmethod
    @override
    def execute(cls, images: torch.Tensor, reference: torch.Tensor, prompt: str, identifier: str,
                clip_model: str, dino_model: str) -> io.NodeOutput:
        if clip_model == NO_MODEL and dino_model == NO_MODEL:
            raise ValueError(
                f"clip_model and dino_model are both '{NO_MODEL}': nothing to score. Put {scores.CLIP_UPSTREAM} "
                f"and/or {scores.DINO_UPSTREAM} (transformers format) in ComfyUI's {scores.SCORES_MODELS_DIR}/"
                "<name>/ folders and pick them."
            )
        generated = to_pil(images, "images")
        ref = to_pil(reference, "reference")
        prompts = split_prompts(prompt, len(generated))
        ident = identifier.strip()
        clip_prompts = [scores.remove_identifier(p, ident) for p in prompts] if ident else prompts

        notes = []
        if ident and prompts and all(c == " ".join(p.split()) for c, p in zip(clip_prompts, prompts, strict=True)):
            notes.append(f"Note: identifier {ident!r} does not occur in any prompt.")
        clip = _CLIP.get(resolve_model("clip_model", clip_model))
        dino = _DINO.get(resolve_model("dino_model", dino_model))
        if clip is None:
            notes.append(f"CLIP-I and CLIP-T not computed: clip_model is '{NO_MODEL}' (outputs 0.0).")
        elif not prompts:
            notes.append("CLIP-T not computed: prompt is empty (output 0.0).")
        if dino is None:
            notes.append(f"DINO not computed: dino_model is '{NO_MODEL}' (output 0.0).")

        cells = scores.ScoreModels(clip_model=clip, dino_model=dino).score_cells(
            generated, reference=ref, prompts=clip_prompts or None)
        report = format_report(cells, clip_prompts, len(ref), clip_model, dino_model, notes)
        logger.info("DreamBooth scores:\n%s", report)
        means = [_mean([getattr(c, k) for c in cells]) for k in ("clip_i", "clip_t", "dino")]
        return io.NodeOutput(*[0.0 if m is None else float(m) for m in means], report)


score_model_dirs()  # registered at import, so extra_model_paths.yaml entries and /object_info agree

NODES: list[type[io.ComfyNode]] = [DreamBoothScore]
