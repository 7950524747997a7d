"""Every engine setting is reachable from the graph, and graph values combine in the documented order.

Unit tests run ``nodes/graph_settings.py`` (ComfyUI-free, loaded by path: the pack's nodes/__init__
imports ComfyUI); the real-server tests check the live node schemas against it and run a training
whose run.json shows options, a memory preset and the train node's widgets combined.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig, bounds
from comfyui_dreambooth_lora.trainer.runtime import OOM_SETTINGS, oom_advice
from dreambooth_test_support.comfyui import PromptRejected
from dreambooth_test_support.paths import sibling_test_module

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_graph_settings() -> ModuleType:
    name = "comfyui_dreambooth_lora.nodes.graph_settings"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "nodes" / "graph_settings.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]



gs = _load_graph_settings()

NODE_FILLED = {"pretrained_model": "m.safetensors", "instance_data_dir": "photos", "output_dir": "out",
               "output_path": "out/x.safetensors", "cache_dir": "cache", "resume": "auto", "lora_name": "x",
               "device": "cuda:0", "metadata": {"dataset_fingerprint": "f"}}
DATASET = {"instance_prompt": "a photo of fac dog", "use_captions": True, "resolution": 768, "crop": "center"}
WIDGETS = {"steps": 10, "learning_rate": 1e-4, "text_encoder_lr": 5e-5, "train_text_encoder": True, "rank": 4,
           "alpha": 4.0, "unet_target": "attn", "batch_size": 3, "gradient_accumulation_steps": 1,
           "gradient_checkpointing": False, "mixed_precision": "no", "lr_scheduler": "constant",
           "lr_warmup_steps": 0, "min_snr_gamma": 0.0, "seed": 7, "checkpointing_steps": 0,
           "validation_prompts": "a\n\n b ", "validation_steps": 0, "overwrite": False}


def graph(**kwargs: Any) -> Any:
    args: dict[str, Any] = {"node_filled": NODE_FILLED, "dataset": DATASET, "prior": None, "widgets": WIDGETS,
                            "bitsandbytes": True} | kwargs
    return gs.assemble(**args)


def options(*nodes: tuple[str, dict[str, Any]]) -> Any:
    """A chain of options nodes, first = furthest from the train node; widget values as the UI holds them."""
    chain = gs.TrainOptions()
    for group, widgets in nodes:
        chain = chain.chained(gs.option_node_name(group), {k: gs.option_value(k, v) for k, v in widgets.items()})
    return chain


# --------------------------------------------------------------------------------------------- reachability


def test_every_config_key_is_set_by_a_node_input_or_by_the_train_node() -> None:
    reachable = set(gs.graph_inputs())
    filled = set(gs.NODE_FILLED)
    assert gs.config_keys() - reachable - filled == set()
    assert filled <= gs.config_keys() and reachable <= gs.config_keys(), "names of settings that do not exist"
    assert all(reason.strip() for reason in gs.NODE_FILLED.values())
    grouped = [key for _id, _group, keys in gs.OPTION_GROUPS for key in keys]
    assert len(grouped) == len(set(grouped)), "a setting on two options nodes"
    on_nodes = set(gs.TRAIN_INPUTS.values()) | set(gs.DATASET_INPUTS.values()) | set(gs.PRIOR_INPUTS.values())
    assert not on_nodes & set(grouped), "an options node repeats a widget of the train, dataset or prior node"


# --------------------------------------------------------------------------------------------- precedence


def test_widgets_then_preset_then_options() -> None:
    plain = graph()
    assert plain.values["train_batch_size"] == 3 and plain.values["validation_prompts"] == ["a", "b"]
    assert plain.preset_status == "" and plain.values["resolution"] == 768

    preset = graph(memory_preset="8 GB")
    assert preset.values["train_batch_size"] == 1 and preset.values["gradient_checkpointing"] is True
    assert preset.values["optimizer"] == "adamw8bit" and preset.values["mixed_precision"] == "auto"
    assert preset.values["resolution"] == 512, "lowered to the preset's maximum"
    assert preset.preset_status.startswith("memory preset 8 GB: batch 1, gradient checkpointing on, optimizer adamw8bit")
    assert "resolution 768 lowered to 512" in preset.preset_status

    chosen = options(("Optimizer", {"optimizer": "adamw", "adam_beta1": 0.8}),
                     ("Saving & Advanced", {"cache_latents": "off"}),
                     ("Optimizer", {"optimizer": gs.FROM_PRESET, "adam_beta1": 0.85}))
    both = graph(memory_preset="8 GB", options=chosen)
    assert both.values["optimizer"] == "adamw", "an explicit option wins over the preset; '(memory preset)' sets nothing"
    assert both.values["adam_beta1"] == 0.85, "the node closer to the train node wins"
    assert both.values["cache_latents"] is False and both.values["train_batch_size"] == 1
    assert both.sources["adam_beta1"] == "DreamBooth Options: Optimizer.adam_beta1"
    assert "options nodes win for" in both.preset_status and "optimizer from DreamBooth Options: Optimizer" in \
        both.preset_status

    small = graph(memory_preset="24 GB", dataset={**DATASET, "resolution": 256})
    assert small.values["resolution"] == 256 and "resolution 256 kept" in small.preset_status, "never raised"


def test_eight_bit_adam_needs_bitsandbytes_and_cuda() -> None:
    missing = graph(memory_preset="6 GB", bitsandbytes=False)
    assert missing.values["optimizer"] == "adamw"
    assert "optimizer adamw (adamw8bit needs bitsandbytes, which is not installed)" in missing.preset_status
    cpu = graph(memory_preset="6 GB", node_filled={**NODE_FILLED, "device": "cpu"})
    assert cpu.values["optimizer"] == "adamw" and "needs a CUDA GPU; training on cpu" in cpu.preset_status
    by_option = graph(memory_preset="8 GB", options=options(("Saving & Advanced", {"device": "cpu"})))
    assert by_option.values["optimizer"] == "adamw", "judged on the device the options node sets"
    cpu_preset = graph(memory_preset="CPU")
    assert cpu_preset.values["device"] == "cpu" and cpu_preset.values["mixed_precision"] == "no"


def test_unknown_preset_names_the_widget() -> None:
    with pytest.raises(ValueError, match="memory_preset '4 GB' is not one of"):
        graph(memory_preset="4 GB")


def test_option_widgets_that_mean_not_set_here() -> None:
    assert gs.option_value("text_encoder_rank", 0) is None and gs.option_value("text_encoder_rank", 8) == 8
    assert gs.option_value("text_encoder_alpha", 0.0) is None
    assert gs.option_value("resume", "start fresh") == "none"
    assert gs.option_value("resume", "resume automatically") == "auto"
    assert gs.option_value("device", gs.COMFYUI_DEVICE) is gs.UNSET and gs.option_value("device", " ") is gs.UNSET
    assert gs.option_value("device", "cuda:1") == "cuda:1"
    assert gs.option_value("background", "0, 10,200") == (0, 10, 200)
    with pytest.raises(ValueError, match=r"Saving & Advanced\.background: must be three numbers"):
        gs.option_value("background", "white")
    chain = options(("Text Encoder", {"text_encoder_rank": 0, "text_encoder_alpha": 8.0,
                                      "text_encoder_target": "attn"}))
    config = gs.make_config(graph(options=chain))
    assert config.text_encoder_rank == 4 and config.text_encoder_alpha == 8.0, "0 follows the UNet's rank"
    assert chain == options(("Text Encoder", {"text_encoder_rank": 0, "text_encoder_alpha": 8.0,
                                              "text_encoder_target": "attn"})) and hash(chain)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("where", "fragment"), [
    ({"options": (("Optimizer", {"adam_beta1": 1.5}),)}, "DreamBooth Options: Optimizer.adam_beta1: must be <= 0.9999"),
    ({"options": (("Saving & Advanced", {"device": "gpu"}),)},
     "DreamBooth Options: Saving & Advanced.device: must be 'auto'"),
    ({"widgets": {**WIDGETS, "steps": 0}}, "steps: must be >= 1, got 0"),
    ({"widgets": {**WIDGETS, "learning_rate": 0.0}}, "learning_rate: must be >= 1e-07"),
    ({"dataset": {**DATASET, "resolution": 500}}, "DreamBooth Dataset.resolution: must be a multiple of 8"),
    ({"prior": {"class_prompt": "a dog", "class_generation_steps": 0}},
     "DreamBooth Prior Preservation.class_generation_steps: must be >= 1"),
])
def test_a_bad_value_is_named_by_its_widget_and_node(where: dict[str, Any], fragment: str) -> None:
    if "options" in where:
        where = {"options": options(*where["options"])}
    with pytest.raises(ValueError) as info:
        gs.make_config(graph(**where))
    assert str(info.value).startswith(fragment), info.value
    assert isinstance(info.value.__cause__, ConfigError)


# --------------------------------------------------------------------------------------------- identity


def test_options_that_do_not_change_the_weights_keep_the_training_identity() -> None:
    base = gs.make_config(graph()).training_signature()
    samples = options(("Validation", {"validation_seed": 5, "validation_inference_steps": 3,
                                      "validation_guidance": 2.0, "validation_negative_prompt": "blurry"}),
                      ("Saving & Advanced", {"checkpoints_total_limit": 9, "attention": "sdpa",
                                             "cache_latents": "off"}))
    assert gs.make_config(graph(options=samples)).training_signature() == base
    changed = options(("Optimizer", {"adam_beta2": 0.99}))
    assert gs.make_config(graph(options=changed)).training_signature() != base
    assert gs.make_config(graph(memory_preset="12 GB")).training_signature() != base, "batch and precision change it"


def test_identifier_comes_from_the_prompts_when_prior_preservation_names_the_class() -> None:
    assert gs.identifier_from_prompts("a photo of fac dog", "a photo of dog") == "fac"
    assert gs.identifier_from_prompts("a photo of fac dog", "a photo of cat") == ""
    assert gs.identifier_from_prompts("fac xyz dog", "dog") == ""
    config = gs.make_config(graph(prior={"class_prompt": "a photo of dog"}))
    assert config.identifier == "fac" and config.with_prior_preservation


# --------------------------------------------------------------------------------------------- advice, docs


def test_an_sdxl_checkpoint_gets_the_sdxl_presets(tiny_checkpoint: Path, tiny_sdxl_checkpoint: Path) -> None:
    assert gs.checkpoint_family(tiny_sdxl_checkpoint) == "sdxl" and gs.checkpoint_family(tiny_checkpoint) == "sd1"
    at_1024 = {**DATASET, "resolution": 1024}
    assert graph(memory_preset="8 GB", dataset=at_1024).values["resolution"] == 512, "SD1.5's table caps at 512"

    eight = graph(memory_preset="8 GB", dataset=at_1024, family="sdxl")
    assert eight.values["resolution"] == 1024, "an SDXL run keeps the resolution it was trained at"
    assert (eight.values["train_batch_size"], eight.values["gradient_checkpointing"], eight.values["optimizer"],
            eight.values["train_text_encoder"], eight.values["mixed_precision"]) == (1, True, "adamw8bit", False, "auto")
    assert eight.preset_status.startswith("memory preset 8 GB (SDXL table): batch 1, gradient checkpointing on, "
                                          "optimizer adamw8bit, text encoder frozen"), eight.preset_status
    assert "resolution 1024 kept (at most 1024)" in eight.preset_status
    got = {label: (g.values["train_batch_size"], g.values["optimizer"], g.values["train_text_encoder"])
           for label in ("12 GB", "16 GB", "24 GB")
           for g in [graph(memory_preset=label, dataset=at_1024, family="sdxl")]}
    assert got == {"12 GB": (1, "adamw", False), "16 GB": (1, "adamw", True), "24 GB": (2, "adamw", True)}
    cpu = graph(memory_preset="CPU", dataset={**DATASET, "resolution": 1536}, family="sdxl")
    assert cpu.values["device"] == "cpu" and cpu.values["mixed_precision"] == "no"
    assert cpu.values["resolution"] == 1024 and "resolution 1536 lowered to 1024" in cpu.preset_status

    with pytest.raises(ValueError, match=r"memory_preset '6 GB' does not fit an SDXL model: an SDXL LoRA needs "
                                         r"about 8 GB .*pick the 8 GB preset or a larger one.*SD1\.5 model"):
        graph(memory_preset="6 GB", family="sdxl")
    table = gs.preset_table()
    sdxl_rows = table[table.index("") + 1:]
    assert "SDXL at 1024 px (estimate, not measured)" in sdxl_rows[0]
    assert sdxl_rows[2].startswith("| 6 GB | refused: an SDXL LoRA needs about 8 GB")


def test_out_of_memory_advice_names_the_graph_inputs() -> None:
    advice = oom_advice(display=gs.graph_location)
    assert "turn gradient_checkpointing (DreamBooth Train LoRA, or its memory_preset) on" in advice
    assert "optimizer (DreamBooth Options: Optimizer, or the train node's memory_preset)" in advice
    assert "resolution (DreamBooth Dataset, or the train node's memory_preset)" in advice
    assert "batch_size (DreamBooth Train LoRA" in advice and "train_batch_size" not in advice
    for key in OOM_SETTINGS:
        assert gs.graph_location(key) != key, f"{key} has no place in the graph"


def test_readme_preset_table_is_the_code_table() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = "\n".join(gs.preset_table())
    assert table in readme, f"README's memory preset table differs from graph_settings.preset_table():\n{table}"
    for preset in (*gs.MEMORY_PRESETS, *gs.SDXL_MEMORY_PRESETS):
        assert preset.max_resolution % 8 == 0 and preset.mixed_precision in ("auto", "no", "fp16", "bf16")


# --------------------------------------------------------------------------------------------- live schemas


def _numeric_inputs(info: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    return {name: (spec[0], spec[1] if len(spec) > 1 else {}) for name, spec in inputs.items()
            if spec[0] in ("INT", "FLOAT")}


def _node_inputs() -> dict[str, dict[str, str]]:
    """Node id -> its input name -> config key."""
    nodes = {"DreamBoothTrain": gs.TRAIN_INPUTS, "DreamBoothDataset": gs.DATASET_INPUTS,
             "DreamBoothPriorPreservation": gs.PRIOR_INPUTS}
    for node_id, _group, keys in gs.OPTION_GROUPS:
        nodes[node_id] = {key: key for key in keys}
    return nodes


def test_every_widget_range_is_the_engines(comfy_server) -> None:
    info = comfy_server.object_info()
    checked = 0
    for node_id, inputs in _node_inputs().items():
        spec = info[node_id]
        names = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        assert set(inputs) <= set(names), f"{node_id} lacks inputs the graph table names: {set(inputs) - set(names)}"
        for name, (kind, opts) in _numeric_inputs(spec).items():
            key = inputs.get(name)
            if key is None:
                continue
            low, high = bounds(key)
            floor = gs.SENTINEL_MIN.get(key, low)
            if low is not None:
                assert opts["min"] == floor, f"{node_id}.{name}: widget min {opts['min']}, engine min {low}"
                step = 1 if kind == "INT" else min(opts.get("step", 0.01), low / 10 if low else 0.01)
                with pytest.raises(ConfigError):
                    TrainConfig.from_dict({**NODE_FILLED, "instance_prompt": "x", key: low - step})
            else:
                assert opts.get("min") is not None, f"{node_id}.{name}: no min (the frontend assumes 0)"
            if high is not None:
                assert opts["max"] == high, f"{node_id}.{name}: widget max {opts['max']}, engine max {high}"
            else:
                assert opts.get("max") is not None, f"{node_id}.{name}: no max (the frontend caps at 2048)"
            default = opts.get("default")
            assert opts["min"] <= default <= opts["max"], f"{node_id}.{name}: default {default} outside its range"
            if kind == "FLOAT":
                # The frontend rounds a float widget to its step's decimals: the default must survive that.
                decimals = max(0, -math.floor(math.log10(opts["step"])))
                assert math.isclose(round(default, decimals), default), f"{node_id}.{name}: step rounds {default}"
            checked += 1
    assert checked >= 30


def test_options_nodes_schema(comfy_server) -> None:
    info = comfy_server.object_info()
    for node_id, group, keys in gs.OPTION_GROUPS:
        spec = info[node_id]
        assert spec["display_name"] == f"DreamBooth Options: {group}"
        assert spec["category"] == "DreamBooth/train/options"
        assert spec["output"] == ["DREAMBOOTH_TRAIN_OPTIONS"]
        assert spec["input"]["optional"]["options"][0] == "DREAMBOOTH_TRAIN_OPTIONS"
        # Widgets added after workflows were saved are optional and come last (widget values are by position).
        optional = {k: v for k, v in spec["input"]["optional"].items() if k != "options"}
        assert list(spec["input"]["required"]) + list(optional) == list(keys)
        for name, entry in {**spec["input"]["required"], **optional}.items():
            assert entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
            field = TrainConfig.__dataclass_fields__[name]
            if field.metadata.get("help"):
                assert entry[1]["tooltip"].startswith(field.metadata["help"]), "tooltips come from the config's help"
    train = info["DreamBoothTrain"]
    assert train["input"]["optional"]["options"][0] == "DREAMBOOTH_TRAIN_OPTIONS"
    # Widget values are saved by position: the new widgets come after every older one.
    order = train["input_order"]
    assert order["required"][-1] == "overwrite" and order["optional"] == ["prior", "memory_preset", "options"]
    assert train["input"]["optional"]["memory_preset"][1]["default"] == gs.CUSTOM_PRESET
    prior = info["DreamBoothPriorPreservation"]["input_order"]
    assert prior["optional"] == ["class_folder", "class_generation_steps", "class_generation_guidance",
                                 "class_negative_prompt"]


# --------------------------------------------------------------------------------------------- real runs


def _train_graph(server: Any, name: str, **train: Any) -> dict[str, Any]:
    helpers = sibling_test_module("test_nodes_train")
    folder = helpers.add_photos(server, f"options {name}", count=2)
    prompt = helpers.train_prompt(folder, name, steps=1, **train)
    del prompt["3"], prompt["5"]  # only what needs the train node
    return prompt


def test_options_chain_and_preset_reach_run_json(comfy_server) -> None:
    name = f"test_options_{uuid.uuid4().hex[:6]}"
    prompt = _train_graph(comfy_server, name, gradient_checkpointing=True, batch_size=2, memory_preset="CPU",
                          options=["32", 0])
    prompt |= {
        "30": {"class_type": "DreamBoothOptionsOptimizer", "inputs": {
            "optimizer": gs.FROM_PRESET, "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-8,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "noise_offset": 0.0, "lora_dropout": 0.0}},
        "31": {"class_type": "DreamBoothOptionsAdvanced", "inputs": {
            "options": ["30", 0], "save_precision": "fp32", "checkpoints_total_limit": 1, "resume": "start fresh",
            "init_lora": "none", "prediction_type": "auto", "attention": "auto", "cache_latents": "off",
            "random_flip": False, "device": gs.COMFYUI_DEVICE, "background": "0, 0, 0"}},
        "32": {"class_type": "DreamBoothOptionsOptimizer", "inputs": {
            "options": ["31", 0], "optimizer": "adamw", "adam_beta1": 0.85, "adam_beta2": 0.99,
            "adam_epsilon": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0, "noise_offset": 0.0,
            "lora_dropout": 0.0}},
    }
    result = comfy_server.run_prompt(prompt, timeout=300).raise_for_status()
    run = json.loads((comfy_server.output_dir / "dreambooth" / name / "run.json").read_text(encoding="utf-8"))
    assert run["adam_beta1"] == 0.85, "the options node closer to the train node wins"
    assert run["save_precision"] == "fp32" and run["resume"] == "none" and run["background"] == [0, 0, 0]
    assert run["cache_latents"] is False, "an options node wins over the memory preset"
    assert run["train_batch_size"] == 1 and run["gradient_checkpointing"] is False, "the preset wins over widgets"
    assert run["mixed_precision"] == "no" and run["device"] == "cpu"
    statuses = [e["message"] for e in sibling_test_module("test_nodes_train").train_events(result) if e["type"] == "status"]
    preset_lines = [s for s in statuses if s.startswith("memory preset CPU: batch 1, gradient checkpointing off")]
    assert len(preset_lines) == 1, statuses
    assert re.search(r"options nodes win for cache_latents from DreamBooth Options: Saving & Advanced", preset_lines[0])


def test_a_preset_too_small_for_sdxl_is_refused(comfy_server, tiny_sdxl_checkpoint: Path) -> None:
    """The train node reads the checkpoint's family for its preset: 6 GB is refused for SDXL before any training."""
    comfy_server.add_model("checkpoints", tiny_sdxl_checkpoint, "tiny-sdxl.safetensors")
    name = f"test_sdxl_6gb_{uuid.uuid4().hex[:6]}"
    prompt = _train_graph(comfy_server, name, ckpt_name="tiny-sdxl.safetensors", memory_preset="6 GB")
    message = sibling_test_module("test_nodes_train").node_error(comfy_server.run_prompt(prompt, timeout=120), "2")
    assert message.startswith("memory_preset '6 GB' does not fit an SDXL model: an SDXL LoRA needs about 8 GB"), message
    assert not (comfy_server.output_dir / "dreambooth" / name / "run.json").exists(), "refused before any training"


def test_a_bad_option_is_refused_naming_the_widget(comfy_server) -> None:
    helpers = sibling_test_module("test_nodes_train")

    name = f"test_bad_option_{uuid.uuid4().hex[:6]}"
    advanced = {"save_precision": "fp16", "checkpoints_total_limit": 2, "resume": "resume automatically",
                "init_lora": "none", "prediction_type": "auto", "attention": "auto", "cache_latents": gs.FROM_PRESET,
                "random_flip": False, "device": "gpu", "background": "255, 255, 255"}
    prompt = _train_graph(comfy_server, name, options=["40", 0])
    prompt["40"] = {"class_type": "DreamBoothOptionsAdvanced", "inputs": advanced}
    result = comfy_server.run_prompt(prompt, timeout=120)
    message = helpers.node_error(result, "2")
    assert message.startswith("DreamBooth Options: Saving & Advanced.device: must be 'auto'"), message

    prompt["40"]["inputs"] = {**advanced, "device": "cpu", "checkpoints_total_limit": -1}
    with pytest.raises(PromptRejected) as excinfo:
        comfy_server.queue_prompt(prompt)
    assert "checkpoints_total_limit" in helpers.rejection(excinfo, "40")
