"""A labelled comparison grid: prompts as columns, base model, fine-tuned checkpoints and LoRA settings as rows.

Every cell is sampled with the same seed and settings except the row's model, LoRA, strengths and CFG,
so the differences between cells are the differences the settings make. LoRAs are applied with
the loader node's `apply_lora` (same fit checks, clones per row so no patch leaks into the next
row), checkpoints are loaded as CheckpointLoaderSimple loads them (one at a time, released after
their rows), conditioning goes through core's CLIPTextEncode and ControlNetApplyAdvanced, sampling
through `comfy.sample` as core's KSampler does.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import math
import os
import textwrap
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont
from typing_extensions import override

import nodes as core_nodes

from ..trainer import scores
from . import scores as score_node
from .lora_loader import apply_lora, file_signature, load_tensors
from .types import CheckpointFile, LoraFile, LoraList, TrainedCheckpoint, TrainedLora

logger = logging.getLogger(__name__)

MAX_CELLS = 256
GRID_FOLDER = "dreambooth_grids"
_PROMPT_LINES = 3  # column label lines before the prompt is cut with an ellipsis
_NAME_CHARS = 32  # a LoRA or checkpoint name longer than this is shortened in its row label
# New columns go at the end, so a spreadsheet that reads older tables by position keeps working.
CSV_FIELDS = ("row", "column", "lora", "lora_path", "unet_strength", "text_encoder_strength", "cfg", "prompt",
              "negative_prompt", "seed", "steps", "sampler", "scheduler", "width", "height", "image_file",
              "clip_i", "clip_t", "dino", "type", "checkpoint", "checkpoint_path", "identifier_removed")
SCORE_KEYS = ("clip_i", "clip_t", "dino")
_SCORE_TAGS = ("I", "T", "D")  # short tags drawn under the labels: CLIP-I, CLIP-T, DINO
# (id of a text encoder, identifier removed) -> (that encoder, kept alive; (positive, negative) per column)
_Conds = dict[tuple[int, str], tuple[Any, list[tuple[Any, Any]]]]


@dataclass(frozen=True)
class _Lora:
    path: Path
    name: str  # as models/loras lists it


@dataclass(frozen=True)
class _Checkpoint:
    path: Path
    name: str  # as models/checkpoints lists it
    source: str  # the input it came from, for error messages


@dataclass(frozen=True)
class _Row:
    lora: _Lora | None  # None: the model without LoRA
    unet: float | None
    text_encoder: float | None
    cfg: float
    checkpoint: _Checkpoint | None = None  # a full fine-tune sampled instead of the model input
    drop: str = ""  # the identifier removed from every prompt of this row ("" = prompts as written)

    @property
    def kind(self) -> str:
        return "checkpoint" if self.checkpoint else "lora" if self.lora else "base"

    def label_lines(self) -> list[str]:
        if self.checkpoint is not None:
            lines = [_short_name(self.checkpoint.name), "fine-tuned checkpoint"]
        elif self.lora is None:
            lines = ["base (no LoRA)"]
        else:
            lines = [_short_name(self.lora.name), f"unet {self.unet:g} / te {self.text_encoder:g}"]
        if self.drop:
            lines.append(f"· no identifier ({_short_name(self.drop)})")
        return [*lines, f"cfg {self.cfg:g}"]

    def prompts(self, columns: list[str]) -> list[str]:
        """The prompts this row's cells use: the columns, without the identifier on a language-drift row."""
        return [scores.remove_identifier(p, self.drop) for p in columns] if self.drop else list(columns)


def _short_name(name: str) -> str:
    stem = Path(name).stem
    return stem if len(stem) <= _NAME_CHARS else stem[: _NAME_CHARS - 3] + "..."


def parse_numbers(text: str, input_name: str) -> list[float]:
    """'0, 0.5,1' -> [0.0, 0.5, 1.0]; ValueError naming the input for anything else."""
    parts = [p.strip() for p in str(text).replace("\n", ",").split(",")]
    values = []
    for part in parts:
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(
                f"{input_name}: {part!r} is not a number. Write comma-separated numbers, e.g. '0, 0.5, 1'."
            )
        values.append(value)
    if not values:
        raise ValueError(f"{input_name} is empty. Write at least one number, e.g. '1.0' (comma-separated for more).")
    return values


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not prompts:
        raise ValueError("prompts is empty. Write one prompt per line; each line becomes a column of the grid.")
    return prompts


def collect_loras(loras: tuple[TrainedLora, ...] | None, lora: TrainedLora | None, lora_names: str) -> list[_Lora]:
    """The LoRAs to compare, in order: the list (training steps), the single one, then the named files."""
    found: list[_Lora] = []
    for label, items in (("loras", list(loras or ())), ("lora", [lora] if lora is not None else [])):
        for item in items:
            path = Path(item.path)
            if not path.is_file():
                raise ValueError(
                    f"{label}: LoRA {item.name!r} points to {path}, which does not exist (deleted or moved since "
                    "training?). Re-run the train node or list the file in lora_names."
                )
            found.append(_Lora(path, item.name or path.name))
    found += [_Lora(path, name) for name, path in _named_files(lora_names, "loras", "lora_names",
                                                                "the LoRA loader's list")]
    return _once_each(found)


def collect_checkpoints(checkpoint: TrainedCheckpoint | None, checkpoint_names: str) -> list[_Checkpoint]:
    """The fine-tuned checkpoints to compare, in order: the connected one, then the named files."""
    found: list[_Checkpoint] = []
    if checkpoint is not None:
        path = Path(checkpoint.path)
        if not path.is_file():
            raise ValueError(
                f"checkpoint: {checkpoint.name!r} points to {path}, which does not exist (deleted or moved since "
                "training?). Re-run the train node or list the file in checkpoint_names."
            )
        found.append(_Checkpoint(path, checkpoint.name or path.name, "checkpoint"))
    found += [_Checkpoint(path, name, "checkpoint_names") for name, path in _named_files(
        checkpoint_names, "checkpoints", "checkpoint_names", "the Load Checkpoint node's list")]
    return _once_each(found)


def _named_files(text: str, folder: str, input_name: str, listed_by: str) -> list[tuple[str, Path]]:
    """(name, path) of each line of ``text``: a file in models/<folder> named as ``listed_by`` shows it."""
    found = []
    for name in (line.strip() for line in str(text or "").splitlines()):
        if not name:
            continue
        full = folder_paths.get_full_path(folder, name)
        if full is None:
            raise ValueError(
                f"{input_name}: {name!r} is not in models/{folder}. Write the file name as {listed_by} shows it "
                f"(with sub-folder and extension), one per line, or put the file into models/{folder}."
            )
        found.append((name, Path(full)))
    return found


_Item = TypeVar("_Item", _Lora, _Checkpoint)


def _once_each(items: list[_Item]) -> list[_Item]:
    """Each file once (the first mention wins), in order."""
    unique: dict[Path, _Item] = {}
    for item in items:
        unique.setdefault(item.path.resolve(), item)
    return list(unique.values())


def plan_rows(loras: list[_Lora], include_base: bool, unet: list[float], text_encoder: list[float],
              cfgs: list[float], checkpoints: list[_Checkpoint] | None = None, drop: str = "") -> list[_Row]:
    """Base rows, then each checkpoint's rows (one per CFG), then each LoRA's; with `drop` every checkpoint
    and LoRA row is followed by its twin without that identifier in the prompts."""
    rows = [_Row(None, None, None, cfg) for cfg in cfgs] if include_base else []
    trained = [_Row(None, None, None, c, checkpoint=ckpt) for ckpt in checkpoints or [] for c in cfgs]
    trained += [_Row(lora, u, t, c) for lora in loras for u in unet for t in text_encoder for c in cfgs]
    for row in trained:
        rows += [row, _Row(row.lora, row.unet, row.text_encoder, row.cfg, row.checkpoint, drop)] if drop else [row]
    return rows


# --------------------------------------------------------------------------- drawing


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font: Any, width: float) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font: Any, width: float, max_lines: int) -> list[str]:
    # Character count per line from the average glyph width, then each line trimmed to the pixel width.
    per_line = max(1, int(width / max(font.getlength("abcdefghij") / 10, 1)))
    lines = textwrap.wrap(text, per_line, break_long_words=True) or [""]
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + "..."]
    return [_fit(line, font, width) for line in lines]


def _score_text(value: float) -> str:
    text = f"{value:.2f}"
    return text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text


def score_parts(means: dict[str, float | None]) -> list[str]:
    """{'clip_i': 0.82, 'clip_t': None, 'dino': 0.61} -> ['I .82', 'D .61']."""
    return [f"{tag} {_score_text(means[key])}" for tag, key in zip(_SCORE_TAGS, SCORE_KEYS, strict=True)
            if means.get(key) is not None]


def _pack(parts: list[str], font: Any, width: float) -> list[str]:
    # Whole "I .82" parts per line, so a narrow cell wraps between scores instead of cutting one.
    lines: list[str] = []
    for part in parts:
        if lines and font.getlength(f"{lines[-1]}  {part}") <= width:
            lines[-1] = f"{lines[-1]}  {part}"
        else:
            lines.append(part)
    return [_fit(line, font, width) for line in lines]


def draw_grid(cells: list[np.ndarray], rows: list[list[str]], columns: list[str],
              row_scores: list[list[str]] | None = None,
              column_scores: list[list[str]] | None = None) -> tuple[Image.Image, dict[str, int]]:
    """One picture of all cells (uint8 HxWx3, row-major) with row labels left and prompts on top.

    `row_scores` / `column_scores` (from `score_parts`) go under each row / column label.
    """
    cell_h, cell_w = cells[0].shape[:2]
    font_px = max(11, min(48, round(min(cell_w, cell_h) / 20)))
    font = _font(font_px)
    pad = max(3, font_px // 3)
    line_h = font_px + max(2, font_px // 4)
    text_w = max(cell_w - 2 * pad, font_px)
    col_lines = [_wrap(text, font, text_w, _PROMPT_LINES) for text in columns]
    label_cap = max(cell_w, 12 * font_px)
    row_lines = [[_fit(line, font, label_cap) for line in lines] for lines in rows]
    if column_scores is not None:
        # Prompts padded to the same line count, so every column's scores sit on one level.
        depth = max(len(lines) for lines in col_lines)
        col_lines = [[*lines, *[""] * (depth - len(lines)), *_pack(parts, font, text_w)]
                     for lines, parts in zip(col_lines, column_scores, strict=True)]
    if row_scores is not None:
        row_lines = [[*lines, *_pack(parts, font, label_cap)] for lines, parts in zip(row_lines, row_scores,
                                                                                        strict=True)]
    left = 2 * pad + math.ceil(max(font.getlength(line) for lines in row_lines for line in lines))
    top = 2 * pad + line_h * max(len(lines) for lines in col_lines)
    grid = Image.new("RGB", (left + cell_w * len(columns), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(col_lines):
        for i, line in enumerate(lines):
            draw.text((left + c * cell_w + pad, pad + i * line_h), line, fill="black", font=font)
    for r, lines in enumerate(row_lines):
        y0 = top + r * cell_h + max(pad, (cell_h - line_h * len(lines)) // 2)
        for i, line in enumerate(lines):
            draw.text((pad, y0 + i * line_h), line, fill="black", font=font)
    for index, pixels in enumerate(cells):
        r, c = divmod(index, len(columns))
        grid.paste(Image.fromarray(pixels), (left + c * cell_w, top + r * cell_h))
    layout = {"left": left, "top": top, "cell_width": cell_w, "cell_height": cell_h, "font_px": font_px}
    return grid, layout


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- node


class DreamBoothCompareGrid(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        names = score_node.model_names()
        where = f"ComfyUI's {scores.SCORES_MODELS_DIR}/<name>/"
        return io.Schema(
            node_id="DreamBoothCompareGrid",
            display_name="DreamBooth Comparison Grid",
            category="DreamBooth/evaluate",
            description=(
                "Renders every prompt (columns) with the base model and with each LoRA at each strength and "
                "CFG (rows), all with the same seed, into one labelled grid. Saves the grid, each cell and a "
                f"JSON/CSV table of the settings under output/{GRID_FOLDER}/."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRAs were trained on."),
                io.Clip.Input("clip", tooltip="The text encoder of that model."),
                io.Vae.Input("vae", tooltip="Decodes the cells; also given to the ControlNet."),
                io.String.Input("prompts", multiline=True,
                                default="a photo of sks dog\na photo of sks dog on the beach",
                                tooltip="One prompt per line; each line is a column of the grid."),
                io.Boolean.Input("include_base", default=True,
                                 tooltip="Add a row of the model without any LoRA, for reference."),
                io.String.Input("lora_names", multiline=True, default="",
                                tooltip="LoRA files from models/loras to compare, one per line, as the LoRA "
                                        "loader's list shows them (e.g. 'my_dog.safetensors')."),
                io.String.Input("unet_strengths", default="1.0",
                                tooltip="Comma-separated UNet strengths, e.g. '0, 0.5, 1'. Every combination "
                                        "with the text-encoder strengths and CFGs is a row for each LoRA."),
                io.String.Input("text_encoder_strengths", default="1.0",
                                tooltip="Comma-separated text-encoder strengths, e.g. '0, 1'."),
                io.String.Input("cfgs", default="7.5",
                                tooltip="Comma-separated CFG scales, e.g. '5, 7.5'. Also applies to the base row."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to avoid, in every cell."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="The one seed every cell uses, so the cells differ only by their settings."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of denoising steps."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampling algorithm (as in KSampler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="How the noise level falls over the steps (as in KSampler)."),
                io.Int.Input("width", default=512, min=64, max=core_nodes.MAX_RESOLUTION, step=8,
                             tooltip="Width of each cell in pixels."),
                io.Int.Input("height", default=512, min=64, max=core_nodes.MAX_RESOLUTION, step=8,
                             tooltip="Height of each cell in pixels."),
                io.String.Input("filename_prefix", default="grid",
                                tooltip="File name start of the saved grid, table and cells in "
                                        f"output/{GRID_FOLDER}/."),
                LoraList.Input("loras", optional=True,
                               tooltip="The train node's intermediate_loras: one row group per saved step."),
                LoraFile.Input("lora", optional=True, tooltip="A LoRA from the train node (its final LoRA)."),
                io.ControlNet.Input("control_net", optional=True,
                                    tooltip="A ControlNet applied to every cell; needs the hint input."),
                io.Image.Input("hint", optional=True,
                               tooltip="The ControlNet hint image (e.g. from the preprocessor)."),
                io.Float.Input("control_strength", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="How strongly the ControlNet steers every cell."),
                # Appended after every older input: saved workflows keep widget values by position.
                io.Image.Input("reference", optional=True,
                               tooltip="Photos of the subject. With a clip_model or dino_model every cell is "
                                       "scored against them (CLIP-I, DINO) and the row/column means are drawn "
                                       "under the labels."),
                io.String.Input("identifier", default="", optional=True,
                                tooltip="The subject's rare-token identifier, removed from each prompt for CLIP-T "
                                        "(the text model does not know it). Empty: prompts are used as they are."),
                io.Combo.Input("clip_model", options=[score_node.NO_MODEL, *names], default=score_node.NO_MODEL,
                               optional=True,
                               tooltip=f"A CLIP model folder in {where} ({scores.CLIP_UPSTREAM}) for CLIP-I and "
                                       "CLIP-T of every cell; 'none' skips both."),
                io.Combo.Input("dino_model", options=[score_node.NO_MODEL, *names], default=score_node.NO_MODEL,
                               optional=True,
                               tooltip=f"A DINO ViT folder in {where} ({scores.DINO_UPSTREAM}) for DINO of every "
                                       "cell; 'none' skips it."),
                CheckpointFile.Input("checkpoint", optional=True,
                                     tooltip="A full fine-tune from the train node: its rows (one per CFG) follow "
                                             "the base rows, decoded with the vae input."),
                io.String.Input("checkpoint_names", multiline=True, default="", optional=True,
                                tooltip="Fine-tuned checkpoints from models/checkpoints to compare, one per line, "
                                        "as the Load Checkpoint node's list shows them. Each is loaded, given a "
                                        "row per CFG (strengths do not apply) and freed before the next."),
                io.Boolean.Input("rows_without_identifier", default=False, optional=True,
                                 tooltip="Follow every LoRA and checkpoint row with the same row whose prompts lack "
                                         "identifier: the DreamBooth paper's language-drift check (does the class "
                                         "word alone now draw the subject?). Needs identifier."),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid", tooltip="The labelled grid as one image."),
                io.Image.Output("images", display_name="images", tooltip="Every cell, row by row."),
                io.String.Output("table", display_name="table",
                                 tooltip="JSON: the settings of every cell and where its image was saved."),
            ],
        )

    @classmethod
    @override
    def fingerprint_inputs(cls, lora_names: str = "", checkpoint_names: str = "", **kwargs: Any) -> Any:
        # A LoRA or checkpoint retrained under the same name must give a new grid, not ComfyUI's cached
        # one; likewise a score model folder whose files changed.
        return (*_file_stamps("loras", lora_names), *_file_stamps("checkpoints", checkpoint_names),
                score_node.DreamBoothScore.fingerprint_inputs(clip_model=kwargs.get("clip_model"),
                                                              dino_model=kwargs.get("dino_model")))

    @classmethod
    @override
    def execute(cls, model: Any, clip: Any, vae: Any, prompts: str, include_base: bool, lora_names: str,
                unet_strengths: str, text_encoder_strengths: str, cfgs: str, negative_prompt: str, seed: int,
                steps: int, sampler_name: str, scheduler: str, width: int, height: int, filename_prefix: str,
                loras: tuple[TrainedLora, ...] | None = None, lora: TrainedLora | None = None,
                control_net: Any = None, hint: torch.Tensor | None = None,
                control_strength: float = 1.0, reference: torch.Tensor | None = None, identifier: str = "",
                clip_model: str = score_node.NO_MODEL, dino_model: str = score_node.NO_MODEL,
                checkpoint: TrainedCheckpoint | None = None, checkpoint_names: str = "",
                rows_without_identifier: bool = False) -> io.NodeOutput:
        columns = parse_prompts(prompts)
        unet = parse_numbers(unet_strengths, "unet_strengths")
        text_encoder = parse_numbers(text_encoder_strengths, "text_encoder_strengths")
        cfg_values = parse_numbers(cfgs, "cfgs")
        if any(c < 0 for c in cfg_values):
            raise ValueError(f"cfgs: {cfgs!r} holds a negative scale. Use values of 0 or more, e.g. '7.5'.")
        if (control_net is None) != (hint is None):
            have, missing = ("control_net", "hint") if hint is None else ("hint", "control_net")
            raise ValueError(f"{have} is connected but {missing} is not. Connect both, or neither.")
        if not str(filename_prefix).strip():
            raise ValueError("filename_prefix is empty. Give a name, e.g. 'grid'.")
        lora_list = collect_loras(loras, lora, lora_names)
        checkpoints = collect_checkpoints(checkpoint, checkpoint_names)
        if not lora_list and not checkpoints and not include_base:
            raise ValueError(
                "Nothing to compare: no LoRA or checkpoint is given and include_base is off. Connect lora, loras "
                "or checkpoint, list files in lora_names or checkpoint_names, or turn include_base on."
            )
        drop = _check_drop(rows_without_identifier, identifier, columns)
        rows = plan_rows(lora_list, include_base, unet, text_encoder, cfg_values, checkpoints, drop)
        scoring = _check_scoring(reference, clip_model, dino_model)
        total = len(rows) * len(columns)
        if total > MAX_CELLS:
            raise ValueError(
                f"The grid would have {total} cells ({len(rows)} rows x {len(columns)} prompts), more than "
                f"{MAX_CELLS}. Use fewer prompts, LoRAs, checkpoints, strengths or CFGs."
            )
        # Each LoRA came from lora_names, the lora socket or the loras list: the message names the file.
        tensors = {item.path: load_tensors(item.path, "LoRA") for item in lora_list}
        for item in lora_list:
            apply_lora(model, clip, tensors[item.path], item.name, 0.0, 0.0)  # fit check before any sampling

        (empty,) = core_nodes.EmptyLatentImage().generate(width, height, 1)
        bar = comfy.utils.ProgressBar(total)
        images: list[torch.Tensor] = []

        def render(row: _Row, row_model: Any, row_clip: Any, conds: _Conds) -> None:
            # Keyed by the clip object (kept alive in the value) and the prompts: rows that share a text
            # encoder state (base, te strength 0, other cfgs) encode each prompt once.
            key = (id(row_clip), row.drop)
            if key not in conds:
                conds[key] = (row_clip, cls._encode(row_clip, vae, row.prompts(columns), negative_prompt,
                                                    control_net, hint, control_strength))
            for positive, negative in conds[key][1]:
                comfy.model_management.throw_exception_if_processing_interrupted()
                latent = comfy.sample.fix_empty_latent_channels(row_model, empty["samples"])
                noise = comfy.sample.prepare_noise(latent, seed)
                # core's common_ksampler without its per-step progress bar, which would reset this node's
                # one-tick-per-cell bar on every cell
                samples = comfy.sample.sample(row_model, noise, steps, row.cfg, sampler_name, scheduler, positive,
                                              negative, latent, denoise=1.0, disable_pbar=True, seed=seed)
                (decoded,) = core_nodes.VAEDecode().decode(vae, {"samples": samples})
                images.append(decoded[:1])
                bar.update_absolute(len(images), total)

        def render_checkpoint_rows(group: list[_Row], ckpt_model: Any, ckpt_clip: Any) -> None:
            conds: _Conds = {}  # dropped with the checkpoint's text encoder
            for row in group:
                render(row, ckpt_model, ckpt_clip, conds)

        shared: _Conds = {}
        # plan_rows keeps each checkpoint's rows together, so each checkpoint is loaded once.
        for ckpt, group in itertools.groupby(rows, key=lambda r: r.checkpoint):
            if ckpt is not None:
                _with_checkpoint(ckpt, model, functools.partial(render_checkpoint_rows, list(group)))
                continue
            for row in group:
                row_model, row_clip = model, clip
                if row.lora is not None:
                    row_model, row_clip, _ = apply_lora(model, clip, tensors[row.lora.path], row.lora.name,
                                                        row.unet or 0.0, row.text_encoder or 0.0)
                render(row, row_model, row_clip, shared)

        pixels = [_to_uint8(image[0]) for image in images]
        cell_prompts = [p for row in rows for p in row.prompts(columns)]
        cell_scores: list[dict[str, float | None]] = [dict.fromkeys(SCORE_KEYS) for _ in pixels]
        if scoring:
            # After sampling, with the models loaded once for all cells.
            cell_scores = _score(pixels, reference, cell_prompts, identifier, clip_model, dino_model)
        n = len(columns)
        row_means = [_means(cell_scores[r * n:(r + 1) * n]) for r in range(len(rows))]
        column_means = [_means(cell_scores[c::n]) for c in range(n)]
        row_parts = [score_parts(m) for m in row_means] if scoring else None
        column_parts = [score_parts(m) for m in column_means] if scoring else None
        grid, layout = draw_grid(pixels, [row.label_lines() for row in rows], columns, row_parts, column_parts)
        settings = {"seed": seed, "steps": steps, "sampler": sampler_name, "scheduler": scheduler,
                    "width": width, "height": height, "negative_prompt": negative_prompt}
        table, preview = _save(grid, pixels, rows, columns, cell_prompts, settings, layout, filename_prefix.strip(),
                               cell_scores, {"row_means": row_means, "column_means": column_means})
        batch = torch.cat(images, dim=0).to(comfy.model_management.intermediate_device())
        grid_tensor = torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(grid_tensor, batch, json.dumps(table, indent=1), ui={"images": [preview]})

    @staticmethod
    def _encode(clip: Any, vae: Any, columns: list[str], negative_prompt: str, control_net: Any,
                hint: torch.Tensor | None, control_strength: float) -> list[tuple[Any, Any]]:
        (negative,) = core_nodes.CLIPTextEncode().encode(clip, negative_prompt)
        pairs = []
        for text in columns:
            (positive,) = core_nodes.CLIPTextEncode().encode(clip, text)
            neg = negative
            if control_net is not None:
                positive, neg = core_nodes.ControlNetApplyAdvanced().apply_controlnet(
                    positive, negative, control_net, hint, control_strength, 0.0, 1.0, vae=vae)
            pairs.append((positive, neg))
        return pairs


def _file_stamps(folder: str, names: str) -> list[Any]:
    stamps: list[Any] = []
    for name in (line.strip() for line in str(names or "").splitlines()):
        path = folder_paths.get_full_path(folder, name) if name else None
        try:
            stamps.append(file_signature(Path(path)) if path else name)
        except OSError:
            stamps.append(name)
    return stamps


def _check_drop(rows_without_identifier: bool, identifier: str, columns: list[str]) -> str:
    """The identifier the language-drift rows remove ("" when they are off)."""
    if not rows_without_identifier:
        return ""
    ident = str(identifier or "").strip()
    if not ident:
        raise ValueError(
            "rows_without_identifier is on but identifier is empty. Write the subject's identifier (e.g. 'sks') "
            "in identifier, or turn rows_without_identifier off."
        )
    if all(scores.remove_identifier(p, ident) == p for p in columns):
        raise ValueError(
            f"rows_without_identifier: identifier {ident!r} is in none of the prompts, so the rows without it "
            f"would repeat the rows with it. Check identifier's spelling or put {ident!r} into the prompts."
        )
    return ident


def _with_checkpoint(ckpt: _Checkpoint, base_model: Any, render: Callable[[Any, Any], Any]) -> None:
    """Load a fine-tuned checkpoint's MODEL and CLIP, `render(model, clip)` its rows, then free it.

    Loaded as CheckpointLoaderSimple does, without its VAE: a fine-tune leaves the VAE alone, so every row
    decodes with the grid's vae. Freed before the next checkpoint so that two full models never sit in
    memory side by side.
    """
    comfy.model_management.throw_exception_if_processing_interrupted()  # loading takes a while
    try:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(ckpt.path), output_vae=False, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
    except (RuntimeError, ValueError, OSError) as exc:
        raise ValueError(f"{ckpt.source}: {ckpt.name!r} could not be loaded as a checkpoint: {exc}") from exc
    if model is None or clip is None:
        raise ValueError(
            f"{ckpt.source}: {ckpt.name!r} holds no {'text encoder' if model is not None else 'diffusion model'}. "
            "Give a full single-file checkpoint (UNet, text encoder and VAE), as the Load Checkpoint node loads."
        )
    own, base = model.model, base_model.model
    if type(own.latent_format) is not type(base.latent_format):
        raise ValueError(
            f"{ckpt.source}: {ckpt.name!r} is a {type(own.model_config).__name__} model but the grid's model is "
            f"{type(base.model_config).__name__}, whose vae cannot decode its latents. Compare checkpoints "
            "fine-tuned from the connected model."
        )
    alive = weakref.ref(own)
    del own
    try:
        render(model, clip)
    finally:
        del model, clip
    # ComfyUI's list of loaded models holds weak references only: with ours gone it drops the entry,
    # and the cache is emptied before the next checkpoint loads.
    comfy.model_management.cleanup_models_gc()
    comfy.model_management.soft_empty_cache()
    if alive() is not None:
        logger.warning("comparison grid: checkpoint %s is still in memory after its rows", ckpt.name)


def _check_scoring(reference: torch.Tensor | None, clip_model: str, dino_model: str) -> bool:
    """Whether to score the cells; checked before sampling so a bad setting costs no sampling time."""
    chosen = [name for name in (clip_model, dino_model) if name and name != score_node.NO_MODEL]
    if not chosen:
        if reference is not None:
            logger.warning("comparison grid: reference is connected but clip_model and dino_model are both "
                           "'%s', so the cells are not scored", score_node.NO_MODEL)
        return False
    if reference is None:
        raise ValueError(
            "clip_model / dino_model are set but reference is not connected. Connect the subject photos to "
            f"reference to score the cells, or set both to '{score_node.NO_MODEL}'."
        )
    score_node.to_pil(reference, "reference")
    score_node.resolve_model("clip_model", clip_model or score_node.NO_MODEL)
    score_node.resolve_model("dino_model", dino_model or score_node.NO_MODEL)
    return True


def _score(pixels: list[np.ndarray], reference: torch.Tensor, cell_prompts: list[str], identifier: str,
           clip_model: str, dino_model: str) -> list[dict[str, float | None]]:
    models = score_node.cached_models(clip_model or score_node.NO_MODEL, dino_model or score_node.NO_MODEL)
    ident = str(identifier or "").strip()
    prompts = [scores.remove_identifier(p, ident) if ident else p for p in cell_prompts]
    cells = models.score_cells([Image.fromarray(p) for p in pixels],
                               reference=score_node.to_pil(reference, "reference"), prompts=prompts)
    return [cell.as_dict() for cell in cells]


def _means(cells: list[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in SCORE_KEYS:
        values = [c[key] for c in cells if c[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def _save(grid: Image.Image, pixels: list[np.ndarray], rows: list[_Row], columns: list[str], cell_prompts: list[str],
          settings: dict[str, Any], layout: dict[str, int], prefix: str, cell_scores: list[dict[str, float | None]],
          means: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Grid PNG, cell PNGs, <name>.json and <name>.csv in output/dreambooth_grids/; returns (table, preview)."""
    output_dir = folder_paths.get_output_directory()
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{GRID_FOLDER}/{prefix}", output_dir, grid.width, grid.height)
    stem = f"{filename}_{counter:05}_"
    cell_dir = Path(folder) / f"{stem}cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index, cell in enumerate(pixels):
        r, c = divmod(index, len(columns))
        row = rows[r]
        cell_name = f"r{r:03}_c{c:03}.png"
        Image.fromarray(cell).save(cell_dir / cell_name, compress_level=4)
        records.append({
            "row": r, "column": c,
            "lora": row.lora.name if row.lora else "", "lora_path": str(row.lora.path) if row.lora else "",
            "unet_strength": row.unet, "text_encoder_strength": row.text_encoder, "cfg": row.cfg,
            "prompt": cell_prompts[index], **settings,
            "image_file": "/".join(p for p in (subfolder, f"{stem}cells", cell_name) if p),
            **cell_scores[index],
            "type": row.kind, "checkpoint": row.checkpoint.name if row.checkpoint else "",
            "checkpoint_path": str(row.checkpoint.path) if row.checkpoint else "", "identifier_removed": row.drop,
        })
    grid.save(Path(folder) / f"{stem}.png", compress_level=4)
    relative = "/".join(p for p in (subfolder, stem) if p)
    table = {"grid_file": f"{relative}.png", "rows": [" | ".join(row.label_lines()) for row in rows],
             "columns": columns, "layout": layout, "cells": records,
             **means}
    with open(Path(folder) / f"{stem}.json", "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1, ensure_ascii=False)
    with open(Path(folder) / f"{stem}.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if record[k] is None else record[k] for k in CSV_FIELDS})
    logger.info("comparison grid of %d cells saved to %s", len(pixels), os.path.join(folder, f"{stem}.png"))
    return table, {"filename": f"{stem}.png", "subfolder": subfolder, "type": "output"}


NODES: list[type[io.ComfyNode]] = [DreamBoothCompareGrid]
