"""Where each engine setting is set in the graph, and how the graph's values become one TrainConfig.

Every TrainConfig key is either an input of one of the pack's nodes (train, dataset, prior, options
nodes) or filled by the train node itself (``NODE_FILLED``, with the reason); a test holds that no
key is left out. The values combine in one order, lowest first:

    engine defaults < train node widgets < memory preset < options nodes

so an options node is the explicit choice that always wins, and a memory preset replaces the train
node's own memory widgets. This module imports no ComfyUI: the node modules build their widgets and
configs from it, and unit tests load it by path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trainer.config import ConfigError, TrainConfig
from ..trainer.families import FAMILIES

TRAIN_NODE = "DreamBooth Train LoRA"
DATASET_NODE = "DreamBooth Dataset"
PRIOR_NODE = "DreamBooth Prior Preservation"
OPTIONS_PREFIX = "DreamBooth Options: "

# Train node input -> config key, for every input that is one (in the node's input order).
TRAIN_INPUTS: dict[str, str] = {
    "steps": "max_train_steps", "learning_rate": "learning_rate", "text_encoder_lr": "text_encoder_lr",
    "train_text_encoder": "train_text_encoder", "rank": "rank", "alpha": "alpha", "unet_target": "unet_target",
    "batch_size": "train_batch_size", "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_checkpointing": "gradient_checkpointing", "mixed_precision": "mixed_precision",
    "lr_scheduler": "lr_scheduler", "lr_warmup_steps": "lr_warmup_steps", "min_snr_gamma": "min_snr_gamma",
    "seed": "seed", "checkpointing_steps": "checkpointing_steps", "validation_prompts": "validation_prompts",
    "validation_steps": "validation_steps", "overwrite": "overwrite",
    # A connected prior input is what switches prior preservation on.
    "prior": "with_prior_preservation",
}
DATASET_INPUTS: dict[str, str] = {
    # folder, images and folder_path are three ways to give the one folder the trainer reads.
    "folder": "instance_data_dir", "instance_prompt": "instance_prompt", "use_captions": "use_captions",
    "resolution": "resolution", "crop": "crop", "aspect_buckets": "aspect_buckets",
}
PRIOR_INPUTS: dict[str, str] = {
    "class_prompt": "class_prompt", "num_class_images": "num_class_images",
    "prior_loss_weight": "prior_loss_weight", "class_folder": "class_data_dir",
    "class_generation_steps": "class_generation_steps", "class_generation_guidance": "class_generation_guidance",
    "class_negative_prompt": "class_negative_prompt",
}

# The options nodes: (node id, group name shown after OPTIONS_PREFIX, the config keys it sets in widget
# order). Each widget is named after its key.
OPTION_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("DreamBoothOptionsOptimizer", "Optimizer",
     ("optimizer", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm", "noise_offset",
      "lora_dropout")),
    ("DreamBoothOptionsTextEncoder", "Text Encoder", ("text_encoder_rank", "text_encoder_alpha", "text_encoder_target")),
    ("DreamBoothOptionsValidation", "Validation",
     ("validation_seed", "validation_inference_steps", "validation_guidance", "validation_negative_prompt")),
    ("DreamBoothOptionsAdvanced", "Saving & Advanced",
     ("save_precision", "checkpoints_total_limit", "resume", "init_lora", "prediction_type", "attention",
      "cache_latents", "random_flip", "device", "background",
      # Last and optional: saved workflows (widget values by position) and API prompts made before it still load.
      "save_lora_every_n_steps")),
    ("DreamBoothOptionsFullFineTune", "Full Fine-tune", ("training_method", "extract_lora_rank")),
)

# Keys no widget sets: the train node fills them, each for the reason given.
NODE_FILLED: dict[str, str] = {
    "pretrained_model": "the full path of ckpt_name in models/checkpoints",
    "instance_data_dir": "the dataset node's resolved folder (folder, folder_path, or the images written to temp/)",
    "output_dir": "output/dreambooth/<lora_name>/: the run folder follows lora_name",
    "output_path": "models/loras/<lora_name>.safetensors, so LoraLoader lists the result (a full fine-tune: "
                   "models/checkpoints/<lora_name>.safetensors, so CheckpointLoaderSimple lists it)",
    "extracted_lora_path": "models/loras/<lora_name>_lora_rank<R>.safetensors, so LoraLoader lists the LoRA "
                           "extracted from a full fine-tune",
    "intermediate_lora_dir": "models/loras/<lora_name>_steps/, so LoraLoader lists the LoRAs saved every "
                             "save_lora_every_n_steps steps too",
    "cache_dir": "output/dreambooth/_cache/, shared by all runs (class images, model hashes)",
    "lora_name": "the last part of lora_name (the title in the LoRA header)",
    "identifier": "the word the instance prompt has beyond the class prompt (metadata only)",
    "metadata": "the dataset and class-folder fingerprints, for reuse checks",
}

# Option widgets that stand for "not set here" rather than a value.
FROM_PRESET = "(memory preset)"
COMFYUI_DEVICE = "ComfyUI's device"
# A widget cannot hold None: 0 stands for "the same as the UNet's" (below the engine's minimum on purpose).
SENTINEL_MIN: dict[str, int] = {"text_encoder_rank": 0, "text_encoder_alpha": 0}
RESUME_CHOICES = {"resume automatically": "auto", "start fresh": "none"}
NO_INIT_LORA = "none"
CACHE_CHOICES = {"on": True, "off": False}


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def option_node_name(group: str) -> str:
    return OPTIONS_PREFIX + group


def option_value(key: str, widget_value: Any) -> Any:
    """The config value an options widget stands for, or UNSET when it leaves the key to others.

    init_lora is resolved to a path by the node (it needs ComfyUI's model folders) before this.
    """
    if key == "optimizer" and widget_value == FROM_PRESET:
        return UNSET
    if key == "cache_latents":
        return UNSET if widget_value == FROM_PRESET else CACHE_CHOICES.get(widget_value, widget_value)
    if key in SENTINEL_MIN and widget_value == SENTINEL_MIN[key]:
        return None
    if key == "resume":
        return RESUME_CHOICES.get(widget_value, widget_value)
    if key == "device":
        text = str(widget_value).strip()
        return UNSET if text in ("", COMFYUI_DEVICE) else text
    if key == "background":
        return parse_background(widget_value)
    return widget_value


def parse_background(text: str) -> tuple[int, ...]:
    parts = [p for p in str(text).replace(",", " ").split() if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ValueError(f"{option_node_name('Saving & Advanced')}.background: must be three numbers 0-255 "
                         f"separated by commas (red, green, blue), e.g. '255, 255, 255'; got {text!r}.")
    return tuple(values)  # a tuple keeps the options payload hashable


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class OptionValue:
    value: Any
    node: str  # display name of the options node that set it
    widget: str

    @property
    def where(self) -> str:
        return f"{self.node}.{self.widget}"


@dataclass(frozen=True)
class TrainOptions(Mapping[str, OptionValue]):
    """Payload of a DREAMBOOTH_TRAIN_OPTIONS socket: a frozen mapping config key -> the value and the
    node that set it. A node further down the chain overrides one further up for the same key."""

    entries: tuple[tuple[str, OptionValue], ...] = ()

    def __getitem__(self, key: str) -> OptionValue:
        for name, value in self.entries:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def chained(self, node: str, values: Mapping[str, Any]) -> TrainOptions:
        """These options with ``values`` (config key -> value; UNSET ones skipped) set by ``node`` on top."""
        merged = dict(self.entries)
        for key, value in values.items():
            if value is not UNSET:
                merged[key] = OptionValue(value, node, key)
        return TrainOptions(tuple(sorted(merged.items())))


# --------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class MemoryPreset:
    """What a memory preset sets. Estimates of peak VRAM are for the table's family at its resolution (SD1.5
    at 512 px, SDXL at 1024 px) without prior preservation (which adds the class images to every batch) and
    have not been measured on a GPU."""

    label: str
    train_batch_size: int
    gradient_checkpointing: bool
    optimizer: str  # adamw8bit only where bitsandbytes is installed and training runs on CUDA
    train_text_encoder: bool
    max_resolution: int  # the dataset's resolution is lowered to this, never raised
    mixed_precision: str
    cache_latents: bool
    device: str | None = None  # None: where ComfyUI computes
    peak_vram: str = ""
    refused: str = ""  # a card this family does not fit on: the preset is an error saying so and what to pick


CUSTOM_PRESET = "custom (the widgets above)"
MEMORY_PRESETS: tuple[MemoryPreset, ...] = (
    MemoryPreset("6 GB", 1, True, "adamw8bit", False, 512, "auto", True, peak_vram="about 4 GB"),
    MemoryPreset("8 GB", 1, True, "adamw8bit", True, 512, "auto", True, peak_vram="about 5 GB"),
    MemoryPreset("12 GB", 2, True, "adamw", True, 768, "auto", True, peak_vram="about 7 GB"),
    MemoryPreset("16 GB", 2, False, "adamw", True, 768, "auto", True, peak_vram="about 11 GB"),
    MemoryPreset("24 GB", 4, False, "adamw", True, 1024, "auto", True, peak_vram="about 18 GB"),
    MemoryPreset("CPU", 1, False, "adamw", True, 512, "no", True, device="cpu", peak_vram="none (RAM instead: about 10 GB)"),
)
# SDXL's UNet alone is 2.6B parameters (5.1 GB in half precision, against SD1.5's 1.7 GB) and it is trained at
# 1024 px, so its table starts at 8 GB and keeps gradient checkpointing on everywhere; the SD1.5 table's 512 px
# caps would lower an SDXL run to a resolution it gives blurry results at.
SDXL_MEMORY_PRESETS: tuple[MemoryPreset, ...] = (
    MemoryPreset("6 GB", 1, True, "adamw8bit", False, 1024, "auto", True,
                 refused="an SDXL LoRA needs about 8 GB of VRAM or more: pick the 8 GB preset or a larger one "
                         "(with a card that has it), or train an SD1.5 model on this card"),
    MemoryPreset("8 GB", 1, True, "adamw8bit", False, 1024, "auto", True, peak_vram="about 7.5 GB"),
    MemoryPreset("12 GB", 1, True, "adamw", False, 1024, "auto", True, peak_vram="about 9 GB"),
    MemoryPreset("16 GB", 1, True, "adamw", True, 1024, "auto", True, peak_vram="about 11 GB"),
    MemoryPreset("24 GB", 2, True, "adamw", True, 1024, "auto", True, peak_vram="about 14 GB"),
    MemoryPreset("CPU", 1, False, "adamw", True, 1024, "no", True, device="cpu",
                 peak_vram="none (RAM instead: about 32 GB)"),
)
# Model family (trainer.families names) -> its table. SD2.x keeps the SD1.5 one (same UNet size).
FAMILY_PRESETS: dict[str, tuple[MemoryPreset, ...]] = {"sd1": MEMORY_PRESETS, "sd2": MEMORY_PRESETS,
                                                        "sdxl": SDXL_MEMORY_PRESETS}
PRESET_CHOICES = [CUSTOM_PRESET, *(p.label for p in MEMORY_PRESETS)]
# Config keys a preset sets (besides lowering resolution): they replace the train node's widgets.
PRESET_KEYS = ("train_batch_size", "gradient_checkpointing", "optimizer", "train_text_encoder", "mixed_precision",
               "cache_latents", "device")


def preset(label: str, family: str = "sd1") -> MemoryPreset | None:
    """The preset of that label in ``family``'s table; None for custom. Unknown labels are an error naming
    the widget."""
    if label == CUSTOM_PRESET:
        return None
    for item in FAMILY_PRESETS.get(family, MEMORY_PRESETS):
        if item.label == label:
            return item
    raise ValueError(f"memory_preset {label!r} is not one of {', '.join(map(repr, PRESET_CHOICES))}; pick one "
                     "in the list (the workflow may come from another version of this pack).")


def checkpoint_family(path: Path) -> str:
    """'sd1', 'sd2' or 'sdxl' from a .safetensors checkpoint's header (names and shapes only, no tensor is
    read), to pick the memory preset table. 'sd1' where it cannot tell: a .ckpt would have to be unpickled
    whole, and a file the trainer refuses is reported by the trainer with its own reason."""
    if path.suffix.lower() != ".safetensors":
        return "sd1"
    from ..trainer.models import detect_family  # torch and friends: only when a preset is used
    from ..trainer.safetensors_file import SafetensorsFileError, read_header

    try:
        header = read_header(path)
        return detect_family({name: entry.shape for name, entry in header.tensors.items()})
    except (SafetensorsFileError, ConfigError):
        return "sd1"


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def preset_table() -> list[str]:
    """The README's preset tables, SD1.5's then SDXL's with a blank line between (a test holds the README
    to it)."""
    return [*_table(MEMORY_PRESETS, "SD1.5 at 512 px"), "", *_table(SDXL_MEMORY_PRESETS, "SDXL at 1024 px")]


def _table(presets: tuple[MemoryPreset, ...], what: str) -> list[str]:
    first = "memory_preset" if presets is MEMORY_PRESETS else "memory_preset (SDXL)"
    lines = [f"| {first} | batch | gradient checkpointing | optimizer | text encoder | max resolution "
             f"| mixed precision | cache latents | peak VRAM, {what} (estimate, not measured) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in presets:
        if p.refused:
            lines.append(f"| {p.label} | refused: {p.refused} | - | - | - | - | - | - | - |")
            continue
        optimizer = "adamw8bit with bitsandbytes on CUDA, else adamw" if p.optimizer == "adamw8bit" else p.optimizer
        precision = p.mixed_precision + (" (fp32)" if p.mixed_precision == "no" else "")
        lines.append(f"| {p.label} | {p.train_batch_size} | {_on(p.gradient_checkpointing)} | {optimizer} | "
                     f"{'trained' if p.train_text_encoder else 'frozen'} | {p.max_resolution} | {precision} | "
                     f"{_on(p.cache_latents)} | {p.peak_vram} |")
    return lines


def _on(flag: bool) -> str:
    return "on" if flag else "off"


# --------------------------------------------------------------------------------------------- assembly


@dataclass
class GraphValues:
    """Config values and, for each, where in the graph it was set (for error messages)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    preset_status: str = ""

    def set(self, key: str, value: Any, where: str) -> None:
        self.values[key] = value
        self.sources[key] = where

    def display_names(self) -> dict[str, str]:
        """Config key -> how messages name it: the widget, with its node unless it is the train node's."""
        return dict(self.sources)


def apply_preset(graph: GraphValues, label: str, *, bitsandbytes: bool, device_option: str | None = None,
                 family: str = "sd1") -> None:
    """Set the preset's values, from ``family``'s table, over the train node's; builds the status line saying
    what it set. A preset the family does not fit in is a ValueError saying what to pick instead.

    ``device_option``: the device an options node sets (it wins, so 8-bit AdamW is judged by it).
    """
    chosen = preset(label, family)
    if chosen is None:
        return
    family_label = FAMILIES[family].label if family in FAMILIES else family
    if chosen.refused:
        raise ValueError(f"memory_preset {chosen.label!r} does not fit an {family_label} model: {chosen.refused}.")
    def where(key: str) -> str:
        return f"{_input_of(TRAIN_INPUTS, key)} (memory_preset {chosen.label!r})"

    if chosen.device is not None:
        graph.set("device", chosen.device, where("device"))
    device = device_option or str(graph.values.get("device", "auto"))
    said = [f"batch {chosen.train_batch_size}",
            f"gradient checkpointing {_on(chosen.gradient_checkpointing)}"]
    optimizer = chosen.optimizer
    if optimizer == "adamw8bit" and not bitsandbytes:
        optimizer = "adamw"
        said.append("optimizer adamw (adamw8bit needs bitsandbytes, which is not installed)")
    elif optimizer == "adamw8bit" and not device.startswith("cuda"):
        optimizer = "adamw"
        said.append(f"optimizer adamw (adamw8bit needs a CUDA GPU; training on {device})")
    else:
        said.append(f"optimizer {optimizer}")
    said += [f"text encoder {'trained' if chosen.train_text_encoder else 'frozen'}",
             f"mixed precision {chosen.mixed_precision}", f"cache latents {_on(chosen.cache_latents)}"]
    for key, value in (("train_batch_size", chosen.train_batch_size),
                       ("gradient_checkpointing", chosen.gradient_checkpointing), ("optimizer", optimizer),
                       ("train_text_encoder", chosen.train_text_encoder),
                       ("mixed_precision", chosen.mixed_precision), ("cache_latents", chosen.cache_latents)):
        graph.set(key, value, where(key))
    resolution = graph.values.get("resolution")
    if isinstance(resolution, int) and resolution > chosen.max_resolution:
        graph.set("resolution", chosen.max_resolution, where("resolution"))
        said.append(f"resolution {resolution} lowered to {chosen.max_resolution} (the dataset node's preview "
                    "shows the larger crops)")
    else:
        said.append(f"resolution {resolution} kept (at most {chosen.max_resolution})")
    if chosen.device is not None:
        said.append(f"device {chosen.device}")
    # SD1.x keeps the line it always had; other families say which table the values came from.
    table = "" if FAMILY_PRESETS.get(family, MEMORY_PRESETS) is MEMORY_PRESETS else f" ({family_label} table)"
    graph.preset_status = f"memory preset {chosen.label}{table}: " + ", ".join(said)


def apply_options(graph: GraphValues, options: TrainOptions | None) -> None:
    if not options:
        return
    overridden = []
    for key, item in options.items():
        if graph.preset_status and "(memory_preset " in graph.sources.get(key, ""):
            overridden.append(f"{key} from {item.node}")
        graph.set(key, item.value, item.where)
    if overridden:
        graph.preset_status += "; options nodes win for " + ", ".join(overridden)


def assemble(*, node_filled: Mapping[str, Any], dataset: Mapping[str, Any], prior: Mapping[str, Any] | None,
             widgets: Mapping[str, Any], memory_preset: str = CUSTOM_PRESET, options: TrainOptions | None = None,
             bitsandbytes: bool | None = None, family: str = "sd1") -> GraphValues:
    """All config values of one train node run, each with where it was set, in the documented order.

    ``dataset`` and ``prior`` are config key -> value from those nodes; ``widgets`` is the train node's
    input name -> value (validation_prompts as the widget's text, one prompt per line); ``family`` is the
    base model's ('sd1', 'sd2', 'sdxl'), which picks the memory preset table.
    """
    graph = GraphValues()
    for key, value in node_filled.items():
        graph.set(key, value, key)
    for key, value in dataset.items():
        graph.set(key, value, f"{DATASET_NODE}.{_input_of(DATASET_INPUTS, key)}")
    if prior is not None:
        graph.set("with_prior_preservation", True, "prior")
        for key, value in prior.items():
            graph.set(key, value, f"{PRIOR_NODE}.{_input_of(PRIOR_INPUTS, key)}")
    for name, value in widgets.items():
        key = TRAIN_INPUTS[name]
        if key == "validation_prompts":
            value = [line.strip() for line in str(value).splitlines() if line.strip()]
        graph.set(key, value, name)
    if bitsandbytes is None:
        bitsandbytes = bitsandbytes_installed()
    device_option = options["device"].value if options and "device" in options else None
    apply_preset(graph, memory_preset, bitsandbytes=bitsandbytes, device_option=device_option, family=family)
    apply_options(graph, options)
    if "identifier" not in graph.values and prior is not None:
        found = identifier_from_prompts(str(dataset.get("instance_prompt", "")), str(prior.get("class_prompt", "")))
        if found:
            graph.set("identifier", found, "identifier")
    return graph


def _input_of(inputs: Mapping[str, str], key: str) -> str:
    return next((name for name, k in inputs.items() if k == key), key)


def identifier_from_prompts(instance_prompt: str, class_prompt: str) -> str:
    """'a photo of fac dog' and 'a photo of dog' -> 'fac': the one word the instance prompt adds, else ''."""
    extra = list(instance_prompt.split())
    for word in class_prompt.split():
        if word in extra:
            extra.remove(word)
        else:
            return ""
    return extra[0] if len(extra) == 1 else ""


def make_config(graph: GraphValues) -> TrainConfig:
    """The validated config; a bad value is a ValueError naming the widget (and node) it came from."""
    try:
        return TrainConfig.from_dict(graph.values)
    except ConfigError as exc:
        where = graph.sources.get(exc.key, exc.key)
        raise ValueError(f"{where}: {str(exc).split(': ', 1)[-1]}") from exc


# --------------------------------------------------------------------------------------------- locations


def graph_inputs() -> dict[str, str]:
    """Config key -> where a user sets it in the graph ('<input> on <node>'), for every reachable key."""
    found: dict[str, str] = {}
    for inputs, node in ((DATASET_INPUTS, DATASET_NODE), (PRIOR_INPUTS, PRIOR_NODE), (TRAIN_INPUTS, TRAIN_NODE)):
        for name, key in inputs.items():
            found[key] = f"{name} on {node}"
    for _node_id, group, keys in OPTION_GROUPS:
        for key in keys:
            found[key] = f"{key} on {option_node_name(group)}"
    return found


def graph_location(key: str) -> str:
    """How the graph names a config key in advice: '<input> (<node>[, or the memory_preset])'."""
    where = graph_inputs().get(key)
    if where is None:
        return key
    name, node = where.split(" on ", 1)
    if key not in PRESET_KEYS and key != "resolution":
        return f"{name} ({node})"
    preset_note = "or its memory_preset" if node == TRAIN_NODE else "or the train node's memory_preset"
    return f"{name} ({node}, {preset_note})"


def config_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def config_type(key: str) -> Any:
    return typing.get_type_hints(TrainConfig)[key]
