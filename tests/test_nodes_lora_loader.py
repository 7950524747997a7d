"""DreamBoothLoraLoader in a real ComfyUI server, on the tiny SD1.5 and SDXL checkpoints.

Most LoRAs are built here in kohya format (what ComfyUI's own loader reads): UNet keys named after
the diffusers module path of the tiny UNet, text-encoder keys after CLIP-L's layers. The family checks
use an SDXL and an SD1.5 LoRA this pack trained.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from comfyui_dreambooth_lora.trainer import protocol
from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.run import train
from dreambooth_test_support.comfyui import ComfyServer, PromptResult
from dreambooth_test_support.paths import DREAMBENCH_DIR
from PIL import Image
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy

CKPT = "tiny-sd15.safetensors"
SDXL_CKPT = "tiny-sdxl.safetensors"
NODE = "DreamBoothLoraLoader"
FROM_INPUT = "(use the lora input)"
RANK = 4

# Attention blocks of the tiny UNet (one level, one res block: the up block has two), in the
# diffusers naming kohya uses, with (out, in) of each layer. proj_in/proj_out are 1x1 convs.
_UNET_BLOCKS = (
    "down_blocks_0_attentions_0",
    "mid_block_attentions_0",
    "up_blocks_0_attentions_0",
    "up_blocks_0_attentions_1",
)
_UNET_LAYERS: dict[str, tuple[int, int]] = {
    "transformer_blocks_0_attn1_to_q": (320, 320),
    "transformer_blocks_0_attn1_to_k": (320, 320),
    "transformer_blocks_0_attn1_to_v": (320, 320),
    "transformer_blocks_0_attn1_to_out_0": (320, 320),
    "transformer_blocks_0_attn2_to_q": (320, 320),
    "transformer_blocks_0_attn2_to_k": (320, 768),
    "transformer_blocks_0_attn2_to_v": (320, 768),
    "transformer_blocks_0_attn2_to_out_0": (320, 320),
    "transformer_blocks_0_ff_net_0_proj": (2560, 320),
    "transformer_blocks_0_ff_net_2": (320, 1280),
}
_UNET_CONVS = ("proj_in", "proj_out")
_TE_LAYERS: dict[str, tuple[int, int]] = {
    "self_attn_q_proj": (768, 768),
    "self_attn_k_proj": (768, 768),
    "self_attn_v_proj": (768, 768),
    "self_attn_out_proj": (768, 768),
    "mlp_fc1": (3072, 768),
    "mlp_fc2": (768, 3072),
}


def _pair(sd: dict[str, torch.Tensor], name: str, out: int, fan_in: int, gen: torch.Generator,
          conv: bool = False) -> None:
    # diff = up @ down has per-element std ~ 0.5 / sqrt(fan_in): the size of the layer's own
    # weights, so the effect is plain to see after two sampling steps.
    down = torch.randn(RANK, fan_in, generator=gen) / fan_in**0.5
    up = torch.randn(out, RANK, generator=gen) * (0.5 / RANK**0.5)
    if conv:
        down, up = down[:, :, None, None], up[:, :, None, None]
    sd[f"{name}.lora_down.weight"] = down.contiguous()
    sd[f"{name}.lora_up.weight"] = up.contiguous()
    sd[f"{name}.alpha"] = torch.tensor(float(RANK))


def kohya_lora(seed: int = 0, unet: bool = True, text: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    if unet:
        for block in _UNET_BLOCKS:
            for layer, (out, fan_in) in _UNET_LAYERS.items():
                _pair(sd, f"lora_unet_{block}_{layer}", out, fan_in, gen)
            for conv in _UNET_CONVS:
                _pair(sd, f"lora_unet_{block}_{conv}", 320, 320, gen, conv=True)
    if text:
        for i in range(12):
            for layer, (out, fan_in) in _TE_LAYERS.items():
                _pair(sd, f"lora_te_text_model_encoder_layers_{i}_{layer}", out, fan_in, gen)
    return sd


def sdxl_lora(seed: int = 1) -> dict[str, torch.Tensor]:
    """The key layout of an SDXL kohya LoRA: CLIP-L as te1, CLIP-G (1280) as te2, 2048-wide context."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(2):
        _pair(sd, f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj", 768, 768, gen)
        _pair(sd, f"lora_te2_text_model_encoder_layers_{i}_self_attn_q_proj", 1280, 1280, gen)
        _pair(sd, f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1", 5120, 1280, gen)
    for t in range(2):
        block = f"lora_unet_input_blocks_4_1_transformer_blocks_{t}"
        _pair(sd, f"{block}_attn1_to_q", 640, 640, gen)
        _pair(sd, f"{block}_attn2_to_k", 640, 2048, gen)
        _pair(sd, f"{block}_attn2_to_v", 640, 2048, gen)
    _pair(sd, "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k", 1280, 2048, gen)
    return sd


def txt2img(prefix: str, lora: dict[str, Any] | None, seed: int = 3, ckpt: str = CKPT) -> dict[str, Any]:
    """Checkpoint -> [LoRA loader] -> 2-step 64x64 txt2img -> SaveImage (node "8")."""
    model: list[Any] = ["1", 0]
    clip: list[Any] = ["1", 1]
    prompt: dict[str, Any] = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if lora is not None:
        prompt["2"] = {"class_type": NODE, "inputs": {"model": ["1", 0], "clip": ["1", 1], **lora}}
        prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}
        model, clip = ["2", 0], ["2", 1]
    prompt |= {
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of fac dog", "clip": clip}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": model, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    return prompt


def loader_inputs(name: str, strength_model: float, strength_clip: float) -> dict[str, Any]:
    return {"lora_name": name, "strength_model": strength_model, "strength_clip": strength_clip}


def render(server: ComfyServer, lora: dict[str, Any] | None, ckpt: str = CKPT) -> tuple[np.ndarray, PromptResult]:
    result = server.run_prompt(txt2img(f"lora_{uuid.uuid4().hex[:10]}", lora, ckpt=ckpt),
                               timeout=300).raise_for_status()
    files = server.output_files(result, node_id="8")
    assert len(files) == 1, result.outputs
    with Image.open(files[0]) as img:
        assert img.size == (64, 64)
        return np.asarray(img.convert("RGB"), dtype=np.float32), result


def node_error(result: PromptResult) -> str:
    assert result.status == "error", f"expected a node error, got {result.status}: {result.outputs}"
    assert result.error is not None
    assert result.error.get("node_id") == "2", result.error
    assert result.error.get("exception_type", "").endswith("ValueError"), result.error
    return str(result.error.get("exception_message", ""))


@pytest.fixture(scope="module")
def loras(comfy_server: ComfyServer) -> dict[str, str]:
    """LoRA files written into the server's models/loras; a name with a space on purpose."""
    tag = uuid.uuid4().hex[:6]
    files: dict[str, dict[str, torch.Tensor]] = {
        "good": kohya_lora(seed=0),
        "sdxl": sdxl_lora(),
    }
    wrong = kohya_lora(seed=2, text=False)
    for block in _UNET_BLOCKS:
        # Right names, SDXL-like width: core would only log a warning while patching.
        gen = torch.Generator().manual_seed(5)
        _pair(wrong, f"lora_unet_{block}_transformer_blocks_0_attn1_to_q", 320, 640, gen)
    files["wrong_shape"] = wrong
    partial = kohya_lora(seed=3)
    gen = torch.Generator().manual_seed(6)
    _pair(partial, "lora_unet_down_blocks_1_attentions_0_proj_in", 640, 640, gen)
    _pair(partial, "lora_te_text_model_encoder_layers_12_self_attn_q_proj", 768, 768, gen)
    files["partial"] = partial
    # How diffusers' example script saves the UNet half: ComfyUI drops these keys.
    gen = torch.Generator().manual_seed(7)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora"
    files["diffusers"] = {
        f"{prefix}.down.weight": torch.randn(RANK, 320, generator=gen),
        f"{prefix}.up.weight": torch.randn(320, RANK, generator=gen),
    }
    names = {}
    folder = comfy_server.models_dir / "loras"
    for key, sd in files.items():
        name = f"test {key} {tag}.safetensors"
        save_file(sd, str(folder / name))
        names[key] = name
    return names


def test_object_info_schema(comfy_server: ComfyServer, loras: dict[str, str]) -> None:
    info = comfy_server.object_info(NODE)[NODE]
    assert info["category"] == "DreamBooth/lora"
    assert info["display_name"] == "DreamBooth LoRA Loader (split strengths)"
    required, optional = info["input"]["required"], info["input"].get("optional", {})
    assert list(required) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert required["model"][0] == "MODEL" and required["clip"][0] == "CLIP"
    names = required["lora_name"][1]["options"] if required["lora_name"][0] == "COMBO" else required["lora_name"][0]
    assert names[0] == FROM_INPUT
    assert loras["good"] in names
    for key in ("strength_model", "strength_clip"):
        spec = required[key][1]
        assert required[key][0] == "FLOAT"
        assert (spec["default"], spec["min"], spec["max"], spec["step"]) == (1.0, -20.0, 20.0, 0.01)
    assert optional["lora"][0] == "DREAMBOOTH_LORA"
    for spec in [*required.values(), *optional.values()]:
        assert spec[1].get("tooltip"), spec
    assert info["output"] == ["MODEL", "CLIP", "STRING"]
    assert info["output_name"] == ["model", "clip", "report"]


def test_split_strengths_change_the_image(comfy_server: ComfyServer, loras: dict[str, str]) -> None:
    good = loras["good"]
    base, _ = render(comfy_server, None)
    assert base.std() > 1.0  # a flat image would make every comparison below meaningless

    unet_only, result = render(comfy_server, loader_inputs(good, 1.0, 0.0))
    report = result.outputs["9"]["text"][0]
    assert "UNet: 48 layers, strength 1" in report, report
    assert "text encoder: 72 layers, strength 0, skipped" in report, report
    assert np.abs(unet_only - base).mean() > 1.0, "strength_model=1 left the image unchanged"

    negative, _ = render(comfy_server, loader_inputs(good, -1.0, 0.0))
    assert np.abs(negative - unet_only).mean() > 1.0, "strength -1 gave the same image as +1"
    assert np.abs(negative - base).mean() > 1.0

    text_only, _ = render(comfy_server, loader_inputs(good, 0.0, 1.0))
    assert np.abs(text_only - base).mean() > 1.0, "strength_clip=1 left the image unchanged"
    assert np.abs(text_only - unet_only).mean() > 1.0

    off, result = render(comfy_server, loader_inputs(good, 0.0, 0.0))
    assert np.array_equal(off, base), "both strengths 0 must reproduce the image without a LoRA"
    assert "skipped" in result.outputs["9"]["text"][0]


def test_sdxl_lora_is_a_clear_error_and_the_server_recovers(
    comfy_server: ComfyServer, loras: dict[str, str]
) -> None:
    result = comfy_server.run_prompt(
        txt2img(f"sdxl_{uuid.uuid4().hex[:8]}", loader_inputs(loras["sdxl"], 1.0, 1.0)), timeout=300
    )
    message = node_error(result)
    assert loras["sdxl"] in message
    assert "SD1.x" in message  # the model it was applied to
    assert "SDXL" in message  # the family it was made for
    # The 2 te1 (CLIP-L) layers fit SD1.5: 6 of 39 tensors, 2 of 13 modules; nothing else does.
    assert "6 of 39 tensors (2 of 13 modules)" in message, message
    assert "lora_te2_text_model_encoder_layers_0" in message or "lora_unet_input_blocks_4_1" in message
    assert "Fix:" in message
    assert not comfy_server.output_files(result, node_id="8")

    pixels, _ = render(comfy_server, loader_inputs(loras["good"], 1.0, 1.0))
    assert pixels.std() > 1.0


def test_wrong_shapes_are_an_error(comfy_server: ComfyServer, loras: dict[str, str]) -> None:
    result = comfy_server.run_prompt(
        txt2img(f"shape_{uuid.uuid4().hex[:8]}", loader_inputs(loras["wrong_shape"], 1.0, 1.0)), timeout=300
    )
    message = node_error(result)
    assert loras["wrong_shape"] in message
    assert "4 layers match by name but not by shape" in message, message
    assert "320x640" in message and "320x320" in message, message
    assert "Fix:" in message


def test_a_half_written_lora_file_is_an_error_naming_the_input(comfy_server: ComfyServer,
                                                               loras: dict[str, str]) -> None:
    good = comfy_server.models_dir / "loras" / loras["good"]
    name = f"test cut {uuid.uuid4().hex[:6]}.safetensors"
    data = good.read_bytes()
    (comfy_server.models_dir / "loras" / name).write_bytes(data[: len(data) * 3 // 4])
    result = comfy_server.run_prompt(txt2img(f"cut_{uuid.uuid4().hex[:8]}", loader_inputs(name, 1.0, 1.0)),
                                     timeout=300)
    message = node_error(result)
    assert message.startswith("lora_name: ") and name in message, message
    assert "the download is incomplete" in message and "Download the file again" in message, message
    assert not comfy_server.output_files(result, node_id="8")


def test_partial_match_is_an_error(comfy_server: ComfyServer, loras: dict[str, str]) -> None:
    result = comfy_server.run_prompt(
        txt2img(f"partial_{uuid.uuid4().hex[:8]}", loader_inputs(loras["partial"], 1.0, 1.0)), timeout=300
    )
    message = node_error(result)
    assert "360 of 366 tensors (120 of 122 modules)" in message, message
    assert "lora_unet_down_blocks_1_attentions_0_proj_in" in message
    assert "lora_te_text_model_encoder_layers_12_self_attn_q_proj" in message


def test_diffusers_script_keys_are_an_error_with_the_fix(comfy_server: ComfyServer, loras: dict[str, str]) -> None:
    result = comfy_server.run_prompt(
        txt2img(f"diffusers_{uuid.uuid4().hex[:8]}", loader_inputs(loras["diffusers"], 1.0, 1.0)), timeout=300
    )
    message = node_error(result)
    assert "0 of 2 tensors" in message, message
    assert "diffusers/peft" in message and "kohya" in message, message


def test_placeholder_without_lora_input_is_an_error(comfy_server: ComfyServer) -> None:
    result = comfy_server.run_prompt(
        txt2img(f"none_{uuid.uuid4().hex[:8]}", loader_inputs(FROM_INPUT, 1.0, 1.0)), timeout=300
    )
    message = node_error(result)
    assert "lora input" in message and "models/loras" in message


def test_unknown_lora_name_is_rejected_at_validation(comfy_server: ComfyServer) -> None:
    from dreambooth_test_support.comfyui import PromptRejected

    # ComfyUI checks V3 combo values only through the node's validate_inputs.
    with pytest.raises(PromptRejected) as excinfo:
        comfy_server.queue_prompt(txt2img("never", loader_inputs("missing.safetensors", 1.0, 1.0)))
    assert "2" in excinfo.value.node_errors, excinfo.value.body
    assert "missing.safetensors" in str(excinfo.value.node_errors["2"])
    assert "models/loras" in str(excinfo.value.node_errors["2"])


def test_strength_range_is_still_validated(comfy_server: ComfyServer, loras: dict[str, str]) -> None:
    from dreambooth_test_support.comfyui import PromptRejected

    with pytest.raises(PromptRejected) as excinfo:
        comfy_server.queue_prompt(txt2img("never", loader_inputs(loras["good"], 25.0, 1.0)))
    errors = excinfo.value.node_errors["2"]["errors"]
    assert any(e.get("type") == "value_bigger_than_max" for e in errors), errors


def test_rewritten_file_is_reloaded(comfy_server: ComfyServer, loras: dict[str, str]) -> None:
    """A retrain that overwrites the same file name must not be served from ComfyUI's cache."""
    name = f"retrain {uuid.uuid4().hex[:6]}.safetensors"
    path: Path = comfy_server.models_dir / "loras" / name
    save_file(kohya_lora(seed=10, text=False), str(path))
    first, _ = render(comfy_server, loader_inputs(name, 1.0, 0.0))
    save_file(kohya_lora(seed=11, text=False), str(path))
    second, _ = render(comfy_server, loader_inputs(name, 1.0, 0.0))
    assert np.abs(first - second).mean() > 1.0, "the overwritten LoRA file was not reloaded"


# --------------------------------------------------------------------------------------------- families


def _train_lora(checkpoint: Path, out: Path) -> Path:
    """Two steps of this pack's training on every UNet module kind and the text encoder(s), rank 4, 64 px;
    the high learning rate makes the LoRA's effect visible in 8-bit images."""
    cfg = TrainConfig.from_dict({
        "pretrained_model": str(checkpoint), "instance_data_dir": str(DREAMBENCH_DIR / "dog"),
        "instance_prompt": "a photo of qzx dog", "output_dir": str(out), "resolution": 64,
        "max_train_steps": 2, "rank": 4, "alpha": 8, "unet_target": "full", "train_text_encoder": True,
        "text_encoder_target": "attn_mlp", "learning_rate": 2e-2, "text_encoder_lr": 2e-2,
        "cache_dir": str(out / "cache"), "device": "cpu",
    })
    result = train(cfg, protocol.EventWriter(io.StringIO()), protocol.Commands())
    assert result.status == "done" and result.lora_path is not None
    return result.lora_path


@pytest.fixture(scope="module")
def trained(comfy_server: ComfyServer, tiny_checkpoint: Path, tiny_sdxl_checkpoint: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An SDXL and an SD1.5 LoRA this pack trained, in the server's models/loras (names with spaces), and the
    tiny SDXL checkpoint in its models/checkpoints."""
    comfy_server.add_model("checkpoints", tiny_sdxl_checkpoint, SDXL_CKPT)
    tag = uuid.uuid4().hex[:6]
    names = {}
    for family, checkpoint in (("sdxl", tiny_sdxl_checkpoint), ("sd15", tiny_checkpoint)):
        path = _train_lora(checkpoint, tmp_path_factory.mktemp(f"{family} lora"))
        names[family] = f"trained {family} {tag}.safetensors"
        comfy_server.add_model("loras", path, names[family])
    return names


def _module_counts(path: Path) -> tuple[int, int]:
    """(UNet modules, text-encoder modules) of a kohya LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        modules = {key.split(".")[0] for key in handle.keys()}
    return (len({m for m in modules if m.startswith("lora_unet_")}),
            len({m for m in modules if m.startswith("lora_te")}))


def test_a_trained_sdxl_lora_loads_fully_on_sdxl_and_changes_the_image(comfy_server: ComfyServer,
                                                                       trained: dict[str, str]) -> None:
    name = trained["sdxl"]
    unet_modules, te_modules = _module_counts(comfy_server.models_dir / "loras" / name)
    assert unet_modules > 100 and te_modules == (12 + 32) * 6, "the fixture covers every module kind"
    base, _ = render(comfy_server, None, ckpt=SDXL_CKPT)
    assert base.std() > 1.0
    patched, result = render(comfy_server, loader_inputs(name, 1.0, 1.0), ckpt=SDXL_CKPT)
    # Any key it could not place is an error (unused keys are counted before patching), so this report line
    # means every module of the file is applied: zero unloaded keys.
    report = result.outputs["9"]["text"][0]
    assert report == (f"LoRA {name!r} (SDXL): UNet: {unet_modules} layers, strength 1; "
                      f"text encoder: {te_modules} layers, strength 1."), report
    assert np.abs(patched - base).mean() > 1.0, "the SDXL LoRA left the image unchanged"


@pytest.mark.parametrize(("lora", "ckpt", "model", "made_for"), [
    ("sdxl", CKPT, "SD1.x", "SDXL"),
    ("sd15", SDXL_CKPT, "SDXL", "SD1.x"),
])
def test_a_lora_of_the_other_family_is_a_clear_error(comfy_server: ComfyServer, trained: dict[str, str], lora: str,
                                                     ckpt: str, model: str, made_for: str) -> None:
    name = trained[lora]
    result = comfy_server.run_prompt(
        txt2img(f"family_{uuid.uuid4().hex[:8]}", loader_inputs(name, 1.0, 1.0), ckpt=ckpt), timeout=300)
    message = node_error(result)
    assert message.startswith(f"LoRA {name!r} does not fit this {model} model: "), message
    assert f"It looks made for {made_for} (cross-attention input width" in message, message
    assert (f"Fix: use this LoRA with a checkpoint of its family ({made_for}), or pick a LoRA trained for "
            f"{model}") in message, message
    assert not comfy_server.output_files(result, node_id="8")
