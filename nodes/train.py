"""The train node: DreamBooth-LoRA training in a separate process, with progress, cancel and resume.

What it owns (the trainer owns the rest): turning widgets into a validated run.json, handing VRAM
over (ComfyUI unloads its models first), deciding whether a LoRA on disk already is this training
(then it is returned without training), relaying the trainer's events to the browser, and turning
how the trainer ended into either outputs, "interrupted" (checkpoint kept, queue again to resume) or
an error that says what happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
import threading
import typing
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image
from typing_extensions import override

from ..trainer import identity
from ..trainer.config import ConfigError, TrainConfig, intermediate_loras
from ..trainer.launcher import TrainerProcess, describe_exit
from ..trainer.plots import render_loss_curve
from ..trainer.run_folder import saved_samples
from . import graph_settings as gs
from .options import config_help, number_range
from .trainer_process import METRICS_FILE, WARM_TRAINERS, MetricsLog, UiRelay, run_trainer
from .types import (
    CheckpointFile,
    Dataset,
    InstanceData,
    LoraFile,
    LoraList,
    Options,
    Prior,
    PriorPreservation,
    TrainedCheckpoint,
    TrainedLora,
)

logger = logging.getLogger(__name__)

RUNS_SUBDIR = "dreambooth"  # under ComfyUI's output folder: one run folder per LoRA name
CACHE_NAME = "_cache"  # shared by all runs: generated class images, model hashes
DEFAULT_LORA_NAME = "dreambooth/my_subject"
# Saved every N steps so a crash or a killed server loses at most that much; a stop saves anyway.
DEFAULT_CHECKPOINTING_STEPS = 100
# models/loras/<lora_name><INTERMEDIATE_SUFFIX>/ holds the LoRAs saved every save_lora_every_n_steps steps:
# inside models/loras, so every LoRA dropdown lists them, and beside the final LoRA, so they are found by name.
INTERMEDIATE_SUFFIX = "_steps"
_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f]')
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
# Config key -> the train node's widget, where they differ (to name the widget in messages).
_WIDGET_NAMES = {key: name for name, key in gs.TRAIN_INPUTS.items() if name != key}
_help = config_help


def _default(name: str) -> Any:
    return TrainConfig.__dataclass_fields__[name].default


def _choices(name: str) -> list[str]:
    return list(typing.get_args(typing.get_type_hints(TrainConfig)[name]))


# --------------------------------------------------------------------------------------------- names


def sanitize_lora_name(name: str) -> str:
    """'people/Alice' -> 'people/Alice': a path under models/loras without extension; never escapes it."""
    text = name.strip().replace("\\", "/")
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")]
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or text.startswith("~"):
        raise ValueError(f"lora_name {name!r} must be a name relative to models/loras (e.g. 'people/alice'), "
                         "not an absolute path.")
    parts = []
    for raw in text.split("/"):
        raw = raw.strip()
        if raw == "..":
            raise ValueError(f"lora_name {name!r} contains '..'; the LoRA is saved inside models/loras, "
                             "subfolders are allowed but no way out of it.")
        part = _BAD_CHARS.sub("_", raw).rstrip(". ")
        if not part or part == ".":
            continue
        if part.startswith("."):
            part = "_" + part[1:]
        if part.split(".")[0].upper() in _RESERVED:
            part = "_" + part  # reserved device names on Windows
        parts.append(part)
    if not parts:
        raise ValueError("lora_name is empty: give the LoRA a name, e.g. 'my_dog' (saved as models/loras/my_dog.safetensors).")
    if parts[0] == CACHE_NAME:
        raise ValueError(f"lora_name may not start with {CACHE_NAME!r}: that folder holds the shared training cache.")
    return "/".join(parts)


def loras_root() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0]).resolve()


def checkpoints_root() -> Path:
    return Path(folder_paths.get_folder_paths("checkpoints")[0]).resolve()


def runs_root() -> Path:
    return Path(folder_paths.get_output_directory()).resolve() / RUNS_SUBDIR


def _inside(path: Path, root: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{path} leads out of {root} (a symlinked folder?); choose another lora_name.")
    return resolved


def _file_signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _trainer_device() -> str:
    """Train where ComfyUI computes: '--cpu' means CPU for the trainer too."""
    device = mm.get_torch_device()
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return f"cuda:{device.index}" if device.index is not None else "cuda"
    return "auto"


# --------------------------------------------------------------------------------------------- config


def build_config(*, ckpt_path: Path, dataset: InstanceData, prior: PriorPreservation | None, rel_name: str,
                 settings: dict[str, Any], memory_preset: str = gs.CUSTOM_PRESET,
                 options: gs.TrainOptions | None = None) -> tuple[TrainConfig, gs.GraphValues]:
    """The run's config from the graph (see graph_settings for the order values override each other),
    and where each value came from; a bad value is an error naming its widget and node."""
    metadata = {"dataset_fingerprint": dataset.fingerprint}
    if prior is not None and prior.class_fingerprint:
        metadata["class_fingerprint"] = prior.class_fingerprint
    node_filled: dict[str, Any] = {
        "pretrained_model": str(ckpt_path),
        "instance_data_dir": str(dataset.folder),
        "output_dir": str(runs_root() / rel_name),
        "output_path": str(result_path(rel_name, options)),
        "intermediate_lora_dir": str(loras_root() / f"{rel_name}{INTERMEDIATE_SUFFIX}"),
        "cache_dir": str(runs_root() / CACHE_NAME),
        "resume": "auto",
        "lora_name": rel_name.rsplit("/", 1)[-1],  # the title in the header; folders are this machine's
        "device": _trainer_device(),
        "metadata": metadata,
    }
    extract_rank = _option(options, "extract_lora_rank", 0)
    if extract_rank:
        node_filled["extracted_lora_path"] = str(loras_root() / f"{rel_name}_lora_rank{extract_rank}.safetensors")
    from_dataset = {"instance_prompt": dataset.instance_prompt, "use_captions": dataset.use_captions,
                    "resolution": dataset.resolution, "crop": dataset.crop,
                    "aspect_buckets": dataset.aspect_buckets}
    from_prior = None
    if prior is not None:
        from_prior = {"class_prompt": prior.class_prompt, "num_class_images": prior.num_class_images,
                      "prior_loss_weight": prior.prior_loss_weight,
                      "class_data_dir": str(prior.class_folder) if prior.class_folder else None,
                      "class_generation_steps": prior.class_generation_steps,
                      "class_generation_guidance": prior.class_generation_guidance,
                      "class_negative_prompt": prior.class_negative_prompt}
    family = gs.checkpoint_family(ckpt_path) if memory_preset != gs.CUSTOM_PRESET else "sd1"
    graph = gs.assemble(node_filled=node_filled, dataset=from_dataset, prior=from_prior, widgets=settings,
                        memory_preset=memory_preset, options=options, family=family)
    return gs.make_config(graph), graph


def _option(options: gs.TrainOptions | None, key: str, default: Any) -> Any:
    return options[key].value if options is not None and key in options else default


def is_full_finetune(options: gs.TrainOptions | None) -> bool:
    return _option(options, "training_method", "lora") == "full"


def result_path(rel_name: str, options: gs.TrainOptions | None) -> Path:
    """The file a training ends with: its LoRA, or a full fine-tune's checkpoint (where each loader looks)."""
    if is_full_finetune(options):
        return _inside(checkpoints_root() / f"{rel_name}.safetensors", checkpoints_root())
    return _inside(loras_root() / f"{rel_name}.safetensors", loras_root())


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a .safetensors LoRA, read strictly: a truncated file is an error here,
    so a half-written LoRA is never taken for a finished training."""
    from ..trainer.safetensors_file import read_header

    return dict(read_header(path).metadata)


def differences_from(path: Path, config: TrainConfig, *, instance_images: str,
                     names: dict[str, str] | None = None) -> list[str]:
    """Why the LoRA at ``path`` is not what ``config`` would train ([] when it is).

    The engine's training identity decides (``trainer.identity``, the same one the trainer resumes by):
    contents of the base model and photos, the settings that change the weights, the step count.
    ``instance_images`` is the dataset node's fingerprint of the photos; ``names`` maps config keys to
    how the graph names them (the train node's widget names by default).
    """
    try:
        meta = read_lora_metadata(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable header means "not ours to reuse"
        return [f"its header cannot be read ({exc})"]
    if identity.METADATA_KEY not in meta:
        return [f"it was not trained by this version of the DreamBooth train node (no {identity.METADATA_KEY} in "
                "its header), so it cannot be shown to be this training"]
    try:
        stored = identity.TrainingIdentity.from_json(meta[identity.METADATA_KEY])
    except ValueError as exc:
        return [f"its {identity.METADATA_KEY} header cannot be read ({exc})"]
    widget_names = names if names is not None else _WIDGET_NAMES
    found = [d.describe("in the file", widget_names)
             for d in identity.compare(stored, config, instance_images=instance_images)]
    if meta.get("ss_steps") != str(stored.steps):
        found.append(f"it holds step {meta.get('ss_steps')} of a {stored.steps}-step training (a checkpoint's "
                     "LoRA, not a finished one)")
    return found


def checkpoint_file_problem(path: Path) -> str | None:
    """Why a .safetensors checkpoint cannot be trained on (header and size checked), or None.

    Cheap (the header only), so the prompt is refused before the dataset node reads any photo.
    """
    if path.suffix.lower() != ".safetensors":
        return None  # .ckpt files are only checked by loading them, in the trainer
    from ..trainer.models import read_state_dict

    try:
        read_state_dict(path)
    except ConfigError as exc:
        return str(exc).removeprefix(f"config '{exc.key}': ")
    return None


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- outputs


def _latest_samples(run_dir: Path, up_to: int | None) -> list[Path]:
    found = saved_samples(run_dir, up_to)
    newest = max((step for step, _, _ in found), default=None)
    return [path for step, _, path in found if step == newest]


def load_images(paths: list[Path]) -> torch.Tensor:
    """PNG files -> IMAGE batch; a 1x64x64 black image when there are none."""
    frames: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    for path in paths:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as exc:
            logger.warning("cannot read sample %s: %s", path, exc)
            continue
        size = size or rgb.size
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        frames.append(np.asarray(rgb, dtype=np.float32) / 255.0)
    if not frames:
        return torch.zeros(1, 64, 64, 3)
    return torch.from_numpy(np.stack(frames))


def pil_to_image(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def saved_intermediate_loras(config: TrainConfig, final_metadata: dict[str, str]) -> tuple[TrainedLora, ...]:
    """The intermediate LoRAs of the training in ``final_metadata`` (the final LoRA's header), in step order.

    Only files whose training identity is the final LoRA's are listed: the folder may also hold those of an
    earlier training under the same name (other settings, or other step counts whose files were kept).
    """
    wanted = final_metadata.get(identity.METADATA_KEY)
    if not wanted:
        return ()
    try:
        key = identity.TrainingIdentity.from_json(wanted).key()
    except ValueError:
        return ()
    root = loras_root()
    found = []
    for _step, path in intermediate_loras(Path(config.intermediate_lora_dir), Path(config.output_path).stem):
        try:
            meta = read_lora_metadata(path)
            ours = identity.TrainingIdentity.from_json(meta.get(identity.METADATA_KEY, "")).key() == key
        except Exception:  # noqa: BLE001 - a half-written or foreign file is simply not listed
            ours = False
        if ours:
            name = path.resolve().relative_to(root).as_posix() if path.resolve().is_relative_to(root) else path.name
            found.append(TrainedLora(path=path, name=name, metadata=meta))
    return tuple(found)


def _result(rel_name: str, lora_path: Path, run_dir: Path, config: TrainConfig,
            sample_paths: list[Path] | None = None) -> io.NodeOutput:
    """The node's outputs for the finished training whose file is ``lora_path`` (a full fine-tune: its
    checkpoint, with the extracted LoRA, if any, as the lora output)."""
    meta = read_lora_metadata(lora_path)
    try:
        step = int(meta.get("ss_steps", config.max_train_steps))
    except ValueError:
        step = config.max_train_steps
    metrics = MetricsLog(run_dir / METRICS_FILE)
    curve = render_loss_curve(metrics.curve(up_to=step), total_steps=config.max_train_steps,
                              title=f"loss of {rel_name}")
    samples = load_images(sample_paths if sample_paths else _latest_samples(run_dir, step))
    if config.training_method == "full":
        checkpoint = TrainedCheckpoint(path=lora_path, name=f"{rel_name}.safetensors", metadata=meta)
        extracted = Path(config.extracted_lora_path) if config.extract_lora_rank else None
        trained = None
        if extracted is not None:
            trained = TrainedLora(path=extracted, name=extracted.resolve().relative_to(loras_root()).as_posix(),
                                  metadata=read_lora_metadata(extracted))
        return io.NodeOutput(trained, pil_to_image(curve), samples, (), checkpoint)
    trained = TrainedLora(path=lora_path, name=f"{rel_name}.safetensors", metadata=meta)
    return io.NodeOutput(trained, pil_to_image(curve), samples, saved_intermediate_loras(config, meta), None)


# --------------------------------------------------------------------------------------------- node


def _lr_input(name: str, config_key: str) -> io.Float.Input:
    # The step sets the frontend's rounding: 1e-7 keeps the smallest valid rate from rounding to 0.
    return io.Float.Input(name, default=_default(config_key), step=1e-7, tooltip=_help(config_key),
                          **number_range(config_key, ui_max=1.0))


_BY_PRESET = " A memory_preset other than custom replaces this value."
_PRESET_TOOLTIP = (
    "Memory settings for a graphics card of this size, from the checkpoint's family's table (SD1.x/SD2.x, or "
    "SDXL at 1024 px, which needs 8 GB or more). A preset replaces batch_size, "
    "gradient_checkpointing, train_text_encoder and mixed_precision above, the optimizer (8-bit AdamW on the "
    "6 and 8 GB presets when bitsandbytes is installed and training runs on CUDA, else AdamW) and latent "
    "caching, and lowers the dataset's resolution to its maximum (never raises it); 'CPU' also trains on the "
    "CPU. Order, lowest first: engine defaults < the widgets above < memory_preset < options nodes. The "
    "node's status line says what the preset set. SD1.x: "
    + "; ".join(f"{p.label}: batch {p.train_batch_size}, max {p.max_resolution} px" for p in gs.MEMORY_PRESETS)
    + ". SDXL: " + "; ".join(f"{p.label}: refused" if p.refused else
                              f"{p.label}: batch {p.train_batch_size}, max {p.max_resolution} px"
                              for p in gs.SDXL_MEMORY_PRESETS)
    + "."
)


class DreamBoothTrain(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothTrain",
            display_name="DreamBooth Train LoRA",
            category="DreamBooth/train",
            description=(
                "Trains a DreamBooth LoRA of your subject on an SD1.x/SD2.x checkpoint, in a separate process "
                "(ComfyUI frees its VRAM first). Cancel keeps a checkpoint; queueing again resumes. A LoRA "
                "already trained with the same settings and images is returned without training."
            ),
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="The base checkpoint (SD1.x or SD2.x, from models/checkpoints) to train on. "
                                       "Use the LoRA with this checkpoint."),
                Dataset.Input("dataset", tooltip="The subject photos and prompt, from the DreamBooth Dataset node."),
                Prior.Input("prior", optional=True,
                            tooltip="Optional prior preservation (DreamBooth Prior Preservation node): keeps the "
                                    "class generic at about twice the cost per step."),
                io.String.Input("lora_name", default=DEFAULT_LORA_NAME,
                                tooltip="Saved as models/loras/<lora_name>.safetensors (subfolders allowed). The "
                                        "run folder (checkpoints, samples, trainer.log) is "
                                        f"output/{RUNS_SUBDIR}/<lora_name>/."),
                io.Int.Input("steps", default=_default("max_train_steps"),
                             **number_range("max_train_steps", ui_max=1_000_000),
                             tooltip=_help("max_train_steps") + " 100-200 per photo is typical at lr 1e-4."),
                _lr_input("learning_rate", "learning_rate"),
                _lr_input("text_encoder_lr", "text_encoder_lr"),
                io.Boolean.Input("train_text_encoder", default=_default("train_text_encoder"),
                                 tooltip=_help("train_text_encoder") + " Learns the identifier better; costs memory."
                                 + _BY_PRESET),
                io.Int.Input("rank", default=_default("rank"), **number_range("rank", ui_max=1024),
                             tooltip=_help("rank") + " 4-32 is typical; higher = bigger file, more capacity."),
                io.Float.Input("alpha", default=_default("alpha"), step=0.5, **number_range("alpha", ui_max=4096.0),
                               tooltip=_help("alpha") + " alpha = rank keeps the scale at 1."),
                io.Combo.Input("unet_target", options=_choices("unet_target"), default=_default("unet_target"),
                               tooltip=_help("unet_target")),
                io.Int.Input("batch_size", default=_default("train_batch_size"),
                             **number_range("train_batch_size", ui_max=256),
                             tooltip=_help("train_batch_size") + _BY_PRESET),
                io.Int.Input("gradient_accumulation_steps", default=_default("gradient_accumulation_steps"),
                             **number_range("gradient_accumulation_steps", ui_max=1024),
                             tooltip=_help("gradient_accumulation_steps")),
                io.Boolean.Input("gradient_checkpointing", default=_default("gradient_checkpointing"),
                                 tooltip=_help("gradient_checkpointing") + " Turn on when out of memory."
                                 + _BY_PRESET),
                io.Combo.Input("mixed_precision", options=_choices("mixed_precision"),
                               default=_default("mixed_precision"), tooltip=_help("mixed_precision") + _BY_PRESET),
                io.Combo.Input("lr_scheduler", options=_choices("lr_scheduler"), default=_default("lr_scheduler"),
                               tooltip=_help("lr_scheduler")),
                io.Int.Input("lr_warmup_steps", default=_default("lr_warmup_steps"),
                             **number_range("lr_warmup_steps", ui_max=1_000_000),
                             tooltip=_help("lr_warmup_steps")),
                io.Float.Input("min_snr_gamma", default=_default("min_snr_gamma"), step=0.5,
                               **number_range("min_snr_gamma", ui_max=100.0),
                               tooltip=_help("min_snr_gamma")),
                io.Int.Input("seed", default=_default("seed"), **number_range("seed", ui_min=0, ui_max=2**63 - 1),
                             control_after_generate=False,
                             tooltip=_help("seed") + " Fixed on purpose: a new seed means a new training."),
                io.Int.Input("checkpointing_steps", default=DEFAULT_CHECKPOINTING_STEPS,
                             **number_range("checkpointing_steps", ui_max=1_000_000),
                             tooltip=_help("checkpointing_steps") + " Cancelling always saves one; these protect "
                                     "against crashes. Queueing again resumes from the newest."),
                io.String.Input("validation_prompts", default="", multiline=True,
                                tooltip="Prompts to sample during training, one per line (empty: no samples; the "
                                        "samples output is then one black 64x64 image). They do not change the "
                                        "LoRA: changing only them returns the LoRA already trained."),
                io.Int.Input("validation_steps", default=_default("validation_steps"),
                             **number_range("validation_steps", ui_max=1_000_000),
                             tooltip=_help("validation_steps")),
                io.Boolean.Input("overwrite", default=_default("overwrite"),
                                 tooltip="Replace an existing models/loras/<lora_name>.safetensors that was trained "
                                         "with other settings or images. Off: that is an error, so a good LoRA is "
                                         "never replaced by accident."),
                # Optional and last, so saved workflows (widget values by position) and API prompts
                # written before these inputs existed still load.
                io.Combo.Input("memory_preset", options=gs.PRESET_CHOICES, default=gs.CUSTOM_PRESET, optional=True,
                               tooltip=_PRESET_TOOLTIP),
                Options.Input("options", optional=True,
                              tooltip="Settings beyond these widgets, from the DreamBooth Options nodes (chain them). "
                                      "They win over the widgets above and the memory_preset."),
            ],
            outputs=[
                LoraFile.Output("lora", display_name="lora",
                                tooltip="The trained LoRA, for the DreamBooth LoRA Loader's lora input."),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="Training loss per step (faint) and its moving average (bold)."),
                io.Image.Output("samples", display_name="samples",
                                tooltip="Validation samples of the last sampled step, one per prompt; a single "
                                        "black 64x64 image when no validation prompts were given."),
                # Appended last: saved workflows link outputs by position.
                LoraList.Output("intermediate_loras", display_name="intermediate_loras",
                                tooltip="The LoRAs saved every save_lora_every_n_steps steps (DreamBooth Options: "
                                        "Saving & Advanced), in step order, from models/loras/<lora_name>"
                                        f"{INTERMEDIATE_SUFFIX}/; empty when that setting is 0. The final LoRA is "
                                        "the lora output."),
                CheckpointFile.Output("checkpoint", display_name="checkpoint",
                                      tooltip="With DreamBooth Options: Full Fine-tune (training_method full): the "
                                              "fine-tuned model in models/checkpoints/<lora_name>.safetensors, e.g. "
                                              "for the comparison grid's checkpoint input; empty for a LoRA."),
            ],
        )

    @classmethod
    @override
    def validate_inputs(cls, ckpt_name: str | None = None) -> bool | str:
        # One parameter only: core files a failure under every input named here, and skips its own
        # min/max checks for them. lora_name is checked at the start of execute(), before any work.
        # None: the input is linked, so its value is only known when the prompt runs.
        if ckpt_name is None:
            return True
        full = folder_paths.get_full_path("checkpoints", ckpt_name)
        if full is None:
            return (f"checkpoint {ckpt_name!r} is not in models/checkpoints; put it there and refresh the page, "
                    "or pick another one.")
        problem = checkpoint_file_problem(Path(full))
        if problem:
            return f"checkpoint {ckpt_name!r} cannot be trained on: {problem}"
        return True

    @classmethod
    @override
    def fingerprint_inputs(cls, ckpt_name: str = "", lora_name: str = DEFAULT_LORA_NAME, **kwargs: Any) -> Any:
        # The dataset node's own fingerprint already covers the photos. Here: a checkpoint replaced under
        # the same name, and a result file deleted or replaced since it was returned (the LoRA, or a full
        # fine-tune's checkpoint: the options input is linked, so which one is not known here).
        ckpt = folder_paths.get_full_path("checkpoints", ckpt_name)
        try:
            rel_name = sanitize_lora_name(lora_name)
            results = [loras_root() / f"{rel_name}.safetensors", checkpoints_root() / f"{rel_name}.safetensors"]
        except ValueError:
            results = []
        return (_file_signature(Path(ckpt)) if ckpt else None, *(_file_signature(p) for p in results))

    @classmethod
    @override
    def execute(cls, ckpt_name: str, dataset: InstanceData, lora_name: str, steps: int, learning_rate: float,
                text_encoder_lr: float, train_text_encoder: bool, rank: int, alpha: float, unet_target: str,
                batch_size: int, gradient_accumulation_steps: int, gradient_checkpointing: bool,
                mixed_precision: str, lr_scheduler: str, lr_warmup_steps: int, min_snr_gamma: float, seed: int,
                checkpointing_steps: int, validation_prompts: str, validation_steps: int, overwrite: bool,
                prior: PriorPreservation | None = None, memory_preset: str = gs.CUSTOM_PRESET,
                options: gs.TrainOptions | None = None) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        ckpt_path = Path(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))
        rel_name = sanitize_lora_name(lora_name)
        relay = UiRelay(node_id, run_name=rel_name)
        run_dir = _inside(runs_root() / rel_name, runs_root())
        _inside(loras_root() / f"{rel_name}{INTERMEDIATE_SUFFIX}", loras_root())
        settings = {
            "steps": steps, "learning_rate": learning_rate, "text_encoder_lr": text_encoder_lr,
            "train_text_encoder": train_text_encoder, "rank": rank, "alpha": alpha, "unet_target": unet_target,
            "batch_size": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
            "gradient_checkpointing": gradient_checkpointing, "mixed_precision": mixed_precision,
            "lr_scheduler": lr_scheduler, "lr_warmup_steps": lr_warmup_steps, "min_snr_gamma": min_snr_gamma,
            "seed": seed, "checkpointing_steps": checkpointing_steps, "validation_prompts": validation_prompts,
            "validation_steps": validation_steps, "overwrite": overwrite,
        }
        config, graph = build_config(ckpt_path=ckpt_path, dataset=dataset, prior=prior, rel_name=rel_name,
                                     settings=settings, memory_preset=memory_preset, options=options)
        if graph.preset_status:
            relay.status(graph.preset_status, memory_preset=memory_preset)
        # The file the training ends with (result_path): the LoRA, or a full fine-tune's checkpoint.
        lora_path = Path(config.output_path)

        if lora_path.is_file():
            diffs = differences_from(lora_path, config, instance_images=dataset.fingerprint,
                                     names={**_WIDGET_NAMES, **graph.display_names()})
            if not diffs and config.extract_lora_rank and not Path(config.extracted_lora_path).is_file():
                raise ValueError(
                    f"{lora_path.name} holds this training, but no rank-{config.extract_lora_rank} LoRA was extracted "
                    f"from it ({Path(config.extracted_lora_path).name} is missing): turn on overwrite to train again "
                    "with the extraction, or set extract_lora_rank to the rank it was saved with.")
            if not diffs:
                relay.status(f"{lora_path.name} already holds this training (same settings, images and base "
                             "model): returned without training", reused=True)
                return _result(rel_name, lora_path, run_dir, config)
            if not overwrite:
                raise ValueError(
                    f"{lora_path} already exists and was trained differently: {'; '.join(diffs[:6])}. Turn on "
                    "overwrite to train again and replace it, or choose another lora_name."
                )
            relay.status(f"replacing {lora_path.name} (overwrite is on): {'; '.join(diffs[:3])}")

        config_path = run_dir / "run.json"
        _write_json_atomic(config_path, config.to_dict())
        # The trainer needs the VRAM that ComfyUI's cached models hold; they reload on the next prompt.
        mm.unload_all_models()
        mm.soft_empty_cache()
        metrics = MetricsLog(run_dir / METRICS_FILE)
        outcome = run_trainer(config_path, run_dir=run_dir, node_id=node_id, total_steps=config.max_train_steps,
                              relay=relay, metrics=metrics)
        log_note = f"Full trainer log: {run_dir / 'trainer.log'}"
        if outcome.stop_requested and outcome.returncode != 0:
            relay.status(f"interrupted: the checkpoint is kept in {run_dir / 'checkpoints'}; queue the prompt "
                         "again with the same settings to resume", interrupted=True)
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException()
        if outcome.returncode != 0:
            error = with_graph_oom_advice(outcome.error)
            message = f"{describe_exit(outcome.returncode, error, outcome.stderr_tail)}\n{log_note}"
            if outcome.error is None:
                relay.error(message)
            raise RuntimeError(message)
        if not lora_path.is_file():
            message = (f"the trainer reported success but {lora_path} does not exist; this is a bug, please "
                       f"report it with the trainer log. {log_note}")
            relay.error(message)
            raise RuntimeError(message)
        latest = max((int(s.get("step", 0)) for s in outcome.samples), default=None)
        sample_paths = [Path(str(s["path"])) for s in sorted(outcome.samples, key=lambda s: int(s.get("index", 0)))
                        if latest is not None and int(s.get("step", 0)) == latest]
        return _result(rel_name, lora_path, run_dir, config, sample_paths)


def with_graph_oom_advice(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """The trainer's out-of-memory error with its advice naming the graph's widgets and nodes instead of
    config keys ("gradient_checkpointing (DreamBooth Train LoRA, or its memory_preset)")."""
    if not error or error.get("kind") != "oom":
        return error
    from ..trainer.runtime import oom_advice

    return {**error, "advice": oom_advice(display=gs.graph_location)}


def prewarm_when_training_is_queued(json_data: Any) -> Any:
    """POST /prompt hook: a queued prompt that trains starts a warm trainer at once, so its imports
    overlap with the queue and the nodes upstream of the training node."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict) and any(isinstance(node, dict) and node.get("class_type") == DreamBoothTrain.__name__
                                        for node in prompt.values()):
        # Off the server's event loop: spawning (or replacing a dead trainer) must not stall other requests.
        threading.Thread(target=WARM_TRAINERS.prewarm, name="dreambooth-prewarm", daemon=True).start()
    return json_data


def warm_trainer_state(spare: TrainerProcess | None) -> dict[str, Any]:
    return {"warm": spare is not None, "pid": spare.pid if spare else None, "idle_s": WARM_TRAINERS.idle_s}


_hooks_registered = False


def register_server_hooks() -> None:
    """The POST /prompt hook above, and POST /dreambooth/prewarm: the web extension calls it when a
    workflow with a training node is opened, so the trainer warms up while the user sets up the run."""
    global _hooks_registered
    if _hooks_registered:
        return
    try:
        from aiohttp import web
        from server import PromptServer

        server = PromptServer.instance
    except (ImportError, AttributeError):  # not inside a ComfyUI server (e.g. a script importing the nodes)
        logger.debug("no PromptServer to hook into", exc_info=True)
        return

    @server.routes.post("/dreambooth/prewarm")
    async def prewarm(request: web.Request) -> web.Response:
        spare = await asyncio.get_running_loop().run_in_executor(None, WARM_TRAINERS.prewarm)
        return web.json_response(warm_trainer_state(spare))

    server.add_on_prompt_handler(prewarm_when_training_is_queued)
    _hooks_registered = True


NODES: list[type[io.ComfyNode]] = [DreamBoothTrain]
