"""Regenerate ``example_workflows/`` (UI format) and ``example_workflows/api/`` (API format).

The workflows are defined once, below, in API format with only the values that matter; every other
widget takes the node's default from a real ComfyUI's ``/object_info`` (started here with the pack
installed), so the files always match the current node schemas. Run after changing a node:

    python3 scripts/dev.py env   # once, for the venv
    .venv/bin/python scripts/make_workflows.py
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_UI = REPO / "example_workflows"
OUT_API = OUT_UI / "api"
SD15 = "v1-5-pruned-emaonly.safetensors"
CANNY = "control_v11p_sd15_canny.pth"
SDXL = "sd_xl_base_1.0.safetensors"
CANNY_SDXL = "controlnet-canny-sdxl-1.0.safetensors"
PHOTOS = "my_subject"  # a folder under ComfyUI/input/
LORA = "dreambooth/my_subject"

logger = logging.getLogger("make_workflows")


def _dataset(node_id: str, resolution: int = 512, **inputs: Any) -> dict[str, Any]:
    return {node_id: {"class_type": "DreamBoothDataset", "_meta": {"title": "Subject photos"},
                      "inputs": {"folder": PHOTOS, "instance_prompt": ["idn", 1], "resolution": resolution,
                                 **inputs}}}


def _identifier() -> dict[str, Any]:
    return {"idn": {"class_type": "DreamBoothIdentifier", "_meta": {"title": "Rare identifier"},
                    "inputs": {"class_noun": "dog", "index": 0}}}


def _train(prior: bool, ckpt: str = SD15, lora_name: str = LORA,
           dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "train": {"class_type": "DreamBoothTrain", "_meta": {"title": "Train DreamBooth-LoRA"},
                  "inputs": {"ckpt_name": ckpt, "dataset": ["data", 0], "lora_name": lora_name, "steps": 500,
                             "validation_prompts": "a photo of fac dog on the beach\na fac dog in a bucket",
                             "validation_steps": 100, "checkpointing_steps": 100}},
        "crops": {"class_type": "PreviewImage", "_meta": {"title": "Training crops"},
                  "inputs": {"images": ["data", 1]}},
        "curve": {"class_type": "PreviewImage", "_meta": {"title": "Loss curve"}, "inputs": {"images": ["train", 1]}},
        "samples": {"class_type": "PreviewImage", "_meta": {"title": "Validation samples"},
                    "inputs": {"images": ["train", 2]}},
    }
    if prior:
        nodes["prior"] = {"class_type": "DreamBoothPriorPreservation", "_meta": {"title": "Prior preservation"},
                          "inputs": {"class_prompt": ["idn", 2], "num_class_images": 100,
                                     "prior_loss_weight": 1.0}}
        nodes["train"]["inputs"]["prior"] = ["prior", 0]
    return {**_identifier(), **(dataset or _dataset("data")), **nodes}


def _generate(lora_from: list[Any] | None, ckpt: str = SD15, controlnet: str = CANNY) -> dict[str, Any]:
    loader_inputs: dict[str, Any] = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "strength_model": 1.0,
                                     "strength_clip": 0.8}
    if lora_from is None:
        loader_inputs["lora_name"] = f"{LORA}.safetensors"
    else:
        loader_inputs["lora"] = lora_from
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "lora": {"class_type": "DreamBoothLoraLoader", "_meta": {"title": "LoRA (UNet / text encoder)"},
                 "inputs": loader_inputs},
        "cn": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}},
        "pose": {"class_type": "LoadImage", "_meta": {"title": "Composition to follow"},
                 "inputs": {"image": "example.png"}},
        "gen": {"class_type": "DreamBoothControlNetGenerate", "_meta": {"title": "Generate with ControlNet"},
                "inputs": {"model": ["lora", 0], "clip": ["lora", 1], "vae": ["ckpt", 2], "control_net": ["cn", 0],
                           "image": ["pose", 0], "preprocessor": "canny",
                           "positive": "a photo of fac dog sitting in a field of flowers, detailed, sharp",
                           "negative": "blurry, low quality", "seed": 42, "steps": 25, "cfg": 7.0,
                           "sampler_name": "dpmpp_2m", "scheduler": "karras", "strength": 0.9}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["gen", 0], "filename_prefix": "dreambooth/subject"}},
        "hint": {"class_type": "PreviewImage", "_meta": {"title": "ControlNet hint"}, "inputs": {"images": ["gen", 1]}},
    }


# The environments the DreamBooth paper recontextualises its subjects in: one grid column each.
ENVIRONMENT_PROMPTS = [f"a photo of fac dog {place}" for place in (
    "in a forest", "in a kitchen", "on a city street", "in the snow", "at the seaside")]
# Without the identifier: how far training drags the plain class towards the subject (language drift).
DRIFT_PROMPT = "a photo of a dog"


def _grid(prompts: list[str], prefix: str, **inputs: Any) -> dict[str, Any]:
    """Checkpoint -> comparison grid (one seed for every cell) -> preview of the grid."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "grid": {"class_type": "DreamBoothCompareGrid", "_meta": {"title": "Comparison grid"},
                 "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2],
                            "prompts": "\n".join(prompts), "include_base": True,
                            "negative_prompt": "blurry, low quality", "seed": 42, "steps": 25,
                            "sampler_name": "dpmpp_2m", "scheduler": "karras", "width": 512, "height": 512,
                            "filename_prefix": prefix, **inputs}},
        "show": {"class_type": "PreviewImage", "_meta": {"title": "Grid"}, "inputs": {"images": ["grid", 0]}},
    }


def _strength_guidance_sweep() -> dict[str, Any]:
    """One trained LoRA: UNet strength x text-encoder strength x CFG against the base model."""
    return _grid(ENVIRONMENT_PROMPTS, "strength_guidance", lora_names=f"{LORA}.safetensors",
                 unet_strengths="0, 0.5, 1", text_encoder_strengths="0, 0.5, 1", cfgs="5, 7.5")


def _training_length_sweep() -> dict[str, Any]:
    """One training, its LoRA saved every 100 steps: a row per length shows under- and overfitting."""
    nodes: dict[str, Any] = {**_identifier(), **_dataset("data")}
    nodes["opts"] = {"class_type": "DreamBoothOptionsAdvanced", "_meta": {"title": "Save a LoRA every 100 steps"},
                     "inputs": {"save_lora_every_n_steps": 100}}
    nodes["train"] = {"class_type": "DreamBoothTrain", "_meta": {"title": "Train DreamBooth-LoRA"},
                      "inputs": {"ckpt_name": SD15, "dataset": ["data", 0], "lora_name": f"{LORA}_length_sweep",
                                 "steps": 600, "checkpointing_steps": 100, "options": ["opts", 0]}}
    nodes["curve"] = {"class_type": "PreviewImage", "_meta": {"title": "Loss curve"},
                      "inputs": {"images": ["train", 1]}}
    # The subject photos and identifier are wired to the grid: picking a clip_model or dino_model there
    # scores every cell (CLIP-I, CLIP-T, DINO) as the paper does.
    nodes.update(_grid([*ENVIRONMENT_PROMPTS, DRIFT_PROMPT], "training_length",
                       loras=["train", 3], lora=["train", 0], reference=["data", 1], identifier=["idn", 0]))
    return nodes


# Same photos, same seed: the trainings of a comparison differ only in what the comparison is about.
TRAIN_SEED = 0


def _train_variant(node_id: str, title: str, lora_name: str, **inputs: Any) -> dict[str, Any]:
    return {node_id: {"class_type": "DreamBoothTrain", "_meta": {"title": title},
                      "inputs": {"ckpt_name": SD15, "dataset": ["data", 0], "lora_name": lora_name, "steps": 500,
                                 "seed": TRAIN_SEED, "checkpointing_steps": 100, **inputs}}}


def _compare_trainings(prompts: list[str], prefix: str, train_ids: list[str], **inputs: Any) -> dict[str, Any]:
    """Each train node's `lora` -> one LoRA List -> comparison grid of the base model and every LoRA, in order.

    Links, not file names, bring the LoRAs to the grid: ComfyUI runs independent branches in no fixed
    order, and a link is what makes the grid wait for every training it shows.
    """
    assert 1 <= len(train_ids) <= 4, "the LoRA List node has lora_1 .. lora_4 (chain a second one for more)"
    nodes = _grid(prompts, prefix, loras=["list", 0], reference=["data", 1], identifier=["idn", 0], **inputs)
    lora_list = {"class_type": "DreamBoothLoraList", "_meta": {"title": "LoRAs to compare"},
                 "inputs": {f"lora_{i}": [train_id, 0] for i, train_id in enumerate(train_ids, 1)}}
    return {"ckpt": nodes.pop("ckpt"), "list": lora_list, **nodes}


def _prior_preservation_on_off() -> dict[str, Any]:
    """One subject trained twice, with and without prior preservation: does the class prompt drift?"""
    nodes: dict[str, Any] = {**_identifier(), **_dataset("data")}
    nodes["prior"] = {"class_type": "DreamBoothPriorPreservation", "_meta": {"title": "Prior preservation"},
                      "inputs": {"class_prompt": ["idn", 2], "num_class_images": 100, "prior_loss_weight": 1.0}}
    nodes.update(_train_variant("train_prior", "Train WITH prior preservation", f"{LORA}_prior",
                                prior=["prior", 0]))
    nodes.update(_train_variant("train_plain", "Train WITHOUT prior preservation", f"{LORA}_no_prior"))
    # "a photo of a dog" has no identifier: with drift it shows the subject instead of some dog.
    prompts = [DRIFT_PROMPT, "a photo of fac dog", "a photo of fac dog on the beach"]
    nodes.update(_compare_trainings(prompts, "prior_on_off", ["train_prior", "train_plain"]))
    return nodes


# Rank and UNet learning rate together, as one study paired them: the smaller the rank, the larger
# the rate. alpha = rank keeps the LoRA scale at 1, so rank and rate are the only differences.
RANK_SWEEP = [(4, "2e-3", 2e-3), (8, "2e-4", 2e-4), (16, "2e-5", 2e-5)]
FULL_LR = 5e-6


def _rank_sweep() -> dict[str, Any]:
    """Three LoRAs of one subject, rank 4 / 8 / 16 each with its learning rate, and the paper's full
    fine-tune of the same photos and seed, side by side, each also without the identifier (language drift)."""
    nodes: dict[str, Any] = {**_identifier(), **_dataset("data")}
    for rank, label, lr in RANK_SWEEP:
        nodes.update(_train_variant(f"train_r{rank}", f"Train rank {rank}, lr {label} (one study's pairing)",
                                    f"{LORA}_rank{rank}", rank=rank, alpha=float(rank), learning_rate=lr))
    nodes["full_opts"] = {"class_type": "DreamBoothOptionsFullFineTune", "_meta": {"title": "Full fine-tune"},
                          "inputs": {"training_method": "full", "extract_lora_rank": 0}}
    # The paper's setting: every UNet weight at 5e-6 (LoRA rates wreck a full fine-tune), text encoder frozen.
    nodes.update(_train_variant("train_full", f"Full fine-tune, lr {FULL_LR:g} (the DreamBooth paper)",
                                f"{LORA}_full", learning_rate=FULL_LR, train_text_encoder=False,
                                options=["full_opts", 0]))
    nodes.update(_compare_trainings(ENVIRONMENT_PROMPTS, "rank_sweep", [f"train_r{rank}" for rank, _, _ in RANK_SWEEP],
                                    checkpoint=["train_full", 4], rows_without_identifier=True))
    return nodes


def _sdxl_train_then_generate() -> dict[str, Any]:
    """SDXL end to end: 1024 px aspect-ratio buckets (portrait photos keep heads and feet), prior
    preservation with class images from the frozen SDXL model, then an SDXL ControlNet."""
    data = _dataset("data", resolution=1024, aspect_buckets=True)
    nodes = _train(prior=True, ckpt=SDXL, lora_name=f"{LORA}_sdxl", dataset=data)
    nodes.update(_generate(["train", 0], ckpt=SDXL, controlnet=CANNY_SDXL))
    return nodes


def workflows() -> dict[str, dict[str, Any]]:
    both = _train(prior=True)
    both.update(_generate(["train", 0]))
    return {
        "dreambooth_sdxl_train_then_generate": _sdxl_train_then_generate(),
        "dreambooth_train_with_prior": _train(prior=True),
        "lora_split_strength_controlnet": _generate(None),
        "dreambooth_train_then_generate": both,
        "dreambooth_strength_guidance_sweep": _strength_guidance_sweep(),
        "dreambooth_training_length_sweep": _training_length_sweep(),
        "dreambooth_prior_preservation_on_off": _prior_preservation_on_off(),
        "dreambooth_rank_sweep": _rank_sweep(),
    }


def layout(prompt: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Left-to-right columns by dependency depth, so the graph reads like the method."""
    depth: dict[str, int] = {}

    def level(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in prompt[node_id]["inputs"].values()
                       if isinstance(v, list) and len(v) == 2 and v[0] in prompt]
            depth[node_id] = 1 + max((level(s) for s in sources), default=-1)
        return depth[node_id]

    rows: dict[int, int] = {}
    positions = {}
    for node_id in prompt:
        col = level(node_id)
        positions[node_id] = (60 + 400 * col, 60 + 330 * rows.get(col, 0))
        rows[col] = rows.get(col, 0) + 1
    return positions


def complete(prompt: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """Fill every widget input the workflow leaves out with the node's default."""
    from workflow_format import _ordered_inputs, is_widget  # noqa: PLC0415 - sibling script module

    out = copy.deepcopy(prompt)
    for node in out.values():
        for name, spec, _optional in _ordered_inputs(object_info[node["class_type"]]):
            if name in node["inputs"] or not is_widget(spec):
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                node["inputs"][name] = options["default"]
            elif isinstance(spec[0], list) and spec[0]:
                node["inputs"][name] = spec[0][0]
    return out




def fetch_object_info() -> dict[str, Any]:
    from support_loader import load_test_support  # noqa: PLC0415 - sibling script module

    load_test_support()
    from dreambooth_test_support import comfyui, paths  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="workflows ") as base:
        server = comfyui.ComfyServer(comfyui.provision_comfyui(), Path(base))
        server.install_pack(REPO, paths.PACK_NAME)
        with server:
            return server.object_info()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from workflow_format import api_to_ui  # noqa: PLC0415

    object_info = fetch_object_info()
    OUT_API.mkdir(parents=True, exist_ok=True)
    for name, prompt in workflows().items():
        api = complete(prompt, object_info)
        (OUT_API / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n", encoding="utf-8")
        ui = api_to_ui(api, object_info, layout(api))
        (OUT_UI / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s (%d nodes)", name, len(api))
    return 0


if __name__ == "__main__":
    sys.exit(main())
