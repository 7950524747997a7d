"""Options nodes: every engine setting the train node does not show, in four small chainable groups.

Each options node takes an optional ``options`` input and gives ``options`` out, so groups chain into
the train node's ``options`` input; a node closer to the train node overrides one further up for the
same setting, and options override the train node's widgets and its memory preset. Widgets are built
from TrainConfig (type, default, help, choices, valid range), so nothing here restates a default.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import folder_paths
from comfy_api.latest import io
from typing_extensions import override

from ..trainer.config import TrainConfig, bounds
from . import graph_settings as gs
from .types import Options

_FIELDS = TrainConfig.__dataclass_fields__
_FROM_CONFIG: Any = object()
CATEGORY = "DreamBooth/train/options"

# What a widget adds to the engine's range and help: an upper end where the engine has none (the
# frontend otherwise caps numbers at 2048), a step fine enough that the frontend's rounding (to the
# step's decimals) keeps small defaults, and what a user needs to know beyond the engine's help.
_UI: dict[str, dict[str, Any]] = {
    "adam_beta1": {"step": 0.0001}, "adam_beta2": {"step": 0.0001},
    "adam_epsilon": {"max": 1e-3, "step": 1e-10},
    "weight_decay": {"max": 1.0, "step": 0.001},
    "max_grad_norm": {"max": 100.0, "step": 0.1},
    "noise_offset": {"max": 1.0, "step": 0.01},
    "lora_dropout": {"step": 0.01},
    "text_encoder_rank": {"max": 1024},
    "text_encoder_alpha": {"max": 4096.0, "step": 0.5},
    "validation_seed": {"max": 2**63 - 1, "control_after_generate": False},
    "validation_inference_steps": {"max": 200},
    "validation_guidance": {"max": 100.0, "step": 0.5},
    "checkpoints_total_limit": {"max": 10_000},
    "save_lora_every_n_steps": {"max": 1_000_000},
    "extract_lora_rank": {"max": 1024},
    "class_generation_steps": {"max": 200},
    "class_generation_guidance": {"max": 100.0, "step": 0.5},
}
_TIPS: dict[str, str] = {
    "optimizer": f" {gs.FROM_PRESET!r}: the train node's memory_preset chooses (adamw with the custom preset).",
    "cache_latents": f" {gs.FROM_PRESET!r}: the train node's memory_preset chooses (on with the custom preset).",
    "text_encoder_rank": " 0: the same as the train node's rank.",
    "text_encoder_alpha": " 0: the same as the train node's alpha.",
    "resume": " 'start fresh' ignores this training's checkpoints (they are kept); 'resume automatically' "
              "continues from the newest one that fits.",
    "init_lora": " 'none' starts from zero. Lists models/loras (refresh the page after adding one).",
    "device": f" {gs.COMFYUI_DEVICE!r} (or empty): where ComfyUI computes ('--cpu' means the CPU).",
    "background": " Three numbers 0-255: red, green, blue.",
    "training_method": " 'full' saves models/checkpoints/<lora_name>.safetensors (the train node's checkpoint "
                       "output; CheckpointLoaderSimple lists it after a refresh); the train node's learning_rate "
                       "then applies to every UNet weight (the paper: 5e-6) and rank/alpha are not used.",
    "extract_lora_rank": " The LoRA goes to models/loras/<lora_name>_lora_rank<R>.safetensors and to the train "
                         "node's lora output.",
    "save_lora_every_n_steps": " They go to models/loras/<lora_name>_steps/ (every LoRA list shows them after a "
                               "refresh) and to the train node's intermediate_loras output.",
}
# Widgets added after workflows were saved: optional, so an API prompt without them still validates (a
# missing one leaves the engine default).
_ADDED_LATER = ("save_lora_every_n_steps",)


def _plain_type(key: str) -> Any:
    """The field's type without Optional (``int | None`` -> int)."""
    hint = gs.config_type(key)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def config_default(key: str) -> Any:
    return _FIELDS[key].default


def config_help(key: str) -> str:
    return str(_FIELDS[key].metadata.get("help", ""))


def config_choices(key: str) -> list[str]:
    return list(typing.get_args(gs.config_type(key)))


def number_range(key: str, *, ui_max: float | None = None, ui_min: float | None = None) -> dict[str, Any]:
    """min/max of a number widget: the engine's range, with UI ends only where the engine has none."""
    low, high = bounds(key)
    return {"min": low if low is not None else ui_min, "max": high if high is not None else ui_max}


def config_input(key: str, *, name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 default: Any = _FROM_CONFIG, options: list[str] | None = None, text: bool = False) -> io.Input:
    """A widget for one config key, its type, default, help, choices and range taken from TrainConfig.

    ``text``: a text widget whatever the type (for values a widget cannot hold, parsed by the node).
    """
    name = name or key
    ui = _UI.get(key, {})
    tip = tooltip if tooltip is not None else config_help(key) + _TIPS.get(key, "")
    value = config_default(key) if default is _FROM_CONFIG else default
    kind = _plain_type(key)
    if options is not None or typing.get_origin(kind) is Literal:
        choices = options if options is not None else config_choices(key)
        return io.Combo.Input(name, options=choices, default=value if value in choices else choices[0],
                              optional=optional, tooltip=tip)
    if kind is bool:
        return io.Boolean.Input(name, default=value, optional=optional, tooltip=tip)
    if kind is int:
        limits = number_range(key, ui_max=ui.get("max"), ui_min=0)
        if key in gs.SENTINEL_MIN:
            limits["min"] = gs.SENTINEL_MIN[key]
        return io.Int.Input(name, default=value, optional=optional, tooltip=tip, **limits,
                            **({"control_after_generate": ui["control_after_generate"]}
                               if "control_after_generate" in ui else {}))
    if kind is float:
        limits = number_range(key, ui_max=ui.get("max"), ui_min=0.0)
        if key in gs.SENTINEL_MIN:
            limits["min"] = float(gs.SENTINEL_MIN[key])
        return io.Float.Input(name, default=value, optional=optional, tooltip=tip, step=ui.get("step", 0.01),
                              **limits)
    if kind is str or text:
        return io.String.Input(name, default=value, optional=optional, tooltip=tip)
    raise TypeError(f"no widget for config key {key!r} of type {kind}")  # a bug in this module


def _option_widget(key: str) -> io.Input:
    """The widget of one options-node key; the few that stand for 'not set here' get that choice."""
    if key == "optimizer":
        return config_input(key, options=[gs.FROM_PRESET, *config_choices(key)], default=gs.FROM_PRESET)
    if key == "cache_latents":
        return config_input(key, options=[gs.FROM_PRESET, *gs.CACHE_CHOICES], default=gs.FROM_PRESET)
    if key in gs.SENTINEL_MIN:
        return config_input(key, default=gs.SENTINEL_MIN[key])
    if key == "resume":
        return config_input(key, options=list(gs.RESUME_CHOICES), default="resume automatically")
    if key == "init_lora":
        return config_input(key, options=[gs.NO_INIT_LORA, *folder_paths.get_filename_list("loras")],
                            default=gs.NO_INIT_LORA)
    if key == "device":
        return config_input(key, default=gs.COMFYUI_DEVICE)
    if key == "background":
        return config_input(key, default=", ".join(str(c) for c in config_default(key)), text=True)
    return config_input(key, optional=key in _ADDED_LATER)


class _OptionsNode(io.ComfyNode):
    GROUP = ""
    KEYS: tuple[str, ...] = ()
    SUMMARY = ""

    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.__name__,
            display_name=gs.option_node_name(cls.GROUP),
            category=CATEGORY,
            description=(f"{cls.SUMMARY} Chain options nodes into the train node's options input; a node closer to "
                         "the train node overrides one further up, and options override the train node's widgets "
                         "and its memory_preset."),
            inputs=[
                Options.Input("options", optional=True,
                              tooltip="Options from another options node; this node's settings win over them."),
                *(_option_widget(key) for key in cls.KEYS),
            ],
            outputs=[Options.Output("options_out", display_name="options",
                                    tooltip="For the train node's options input or the next options node.")],
        )

    @classmethod
    @override
    def execute(cls, options: gs.TrainOptions | None = None, **widgets: Any) -> io.NodeOutput:
        node = gs.option_node_name(cls.GROUP)
        values = {}
        for key in cls.KEYS:
            if key not in widgets:  # an optional widget the prompt leaves out (_ADDED_LATER)
                continue
            raw = widgets[key]
            if key == "init_lora":
                raw = _init_lora_path(node, raw)
            values[key] = gs.option_value(key, raw)
        return io.NodeOutput((options or gs.TrainOptions()).chained(node, values))


def _init_lora_path(node: str, name: str) -> str:
    if name in (gs.NO_INIT_LORA, ""):
        return ""
    full = folder_paths.get_full_path("loras", name)
    if full is None:
        raise ValueError(f"{node}.init_lora: {name!r} is not in models/loras; put the file there and refresh the "
                         "page, or pick 'none' to start from zero.")
    return full


class DreamBoothOptionsOptimizer(_OptionsNode):
    GROUP, KEYS = gs.OPTION_GROUPS[0][1], gs.OPTION_GROUPS[0][2]
    SUMMARY = "Optimizer settings: 8-bit AdamW, AdamW's betas, epsilon and weight decay, clipping, noise offset, dropout."


class DreamBoothOptionsTextEncoder(_OptionsNode):
    GROUP, KEYS = gs.OPTION_GROUPS[1][1], gs.OPTION_GROUPS[1][2]
    SUMMARY = "The text-encoder LoRA's own rank, alpha and layers (used when train_text_encoder is on)."


class DreamBoothOptionsValidation(_OptionsNode):
    GROUP, KEYS = gs.OPTION_GROUPS[2][1], gs.OPTION_GROUPS[2][2]
    SUMMARY = ("How validation samples are drawn (seed, steps, CFG, negative prompt); they never change the "
               "LoRA, so changing them returns the LoRA already trained.")


class DreamBoothOptionsAdvanced(_OptionsNode):
    GROUP, KEYS = gs.OPTION_GROUPS[3][1], gs.OPTION_GROUPS[3][2]
    SUMMARY = ("Saving (precision, checkpoints kept, resume or start fresh, start from an existing LoRA, a LoRA "
               "file every N steps) and the rest: prediction type, attention kernel, latent caching, flips, device, "
               "background colour.")


class DreamBoothOptionsFullFineTune(_OptionsNode):
    GROUP, KEYS = gs.OPTION_GROUPS[4][1], gs.OPTION_GROUPS[4][2]
    SUMMARY = ("Full DreamBooth, the paper's original method: every UNet weight trained and saved as a checkpoint in "
               "models/checkpoints (the train node's checkpoint output), optionally with a LoRA of a chosen rank "
               "extracted from it.")


NODES: list[type[io.ComfyNode]] = [DreamBoothOptionsOptimizer, DreamBoothOptionsTextEncoder,
                                   DreamBoothOptionsValidation, DreamBoothOptionsAdvanced,
                                   DreamBoothOptionsFullFineTune]
