"""The test harness itself, checked against the real ComfyUI server with the tiny models.

If these fail, every end-to-end test of the pack would fail for reasons unrelated to the pack.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from dreambooth_test_support.comfyui import ComfyServer, PromptRejected
from PIL import Image

pytestmark = pytest.mark.comfy

CKPT = "tiny-sd15.safetensors"
CONTROLNET = "tiny-controlnet.safetensors"


def txt2img_prompt(prefix: str, seed: int = 1, hint_image: str | None = None) -> dict[str, Any]:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler (2 steps, 64x64) -> VAEDecode -> SaveImage."""
    prompt: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if hint_image is not None:
        prompt["8"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
        prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": hint_image}}
        prompt["10"] = {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["2", 0], "negative": ["3", 0], "control_net": ["8", 0], "image": ["9", 0],
                "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "vae": ["1", 2],
            },
        }
        prompt["5"]["inputs"]["positive"] = ["10", 0]
        prompt["5"]["inputs"]["negative"] = ["10", 1]
    return prompt


def run_and_load(server: ComfyServer, prompt: dict[str, Any]) -> np.ndarray:
    result = server.run_prompt(prompt, timeout=300).raise_for_status()
    assert result.events_of("executing"), "no executing events arrived on the websocket"
    files = server.output_files(result, node_id="7")
    assert len(files) == 1, result.outputs
    assert files[0].is_file(), files[0]
    assert files[0].resolve().is_relative_to(server.output_dir.resolve())
    with Image.open(files[0]) as img:
        assert img.size == (64, 64)
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def test_object_info_lists_core_nodes(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    for node in ("CheckpointLoaderSimple", "KSampler", "ControlNetApplyAdvanced", "SaveImage"):
        assert node in info
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert CKPT in ckpts


def test_txt2img_writes_png(comfy_server: ComfyServer) -> None:
    pixels = run_and_load(comfy_server, txt2img_prompt(f"harness_{uuid.uuid4().hex[:8]}"))
    # Random weights still have to give a non-constant picture, or comparisons below mean nothing.
    assert pixels.std() > 1.0


def test_controlnet_changes_the_image(comfy_server: ComfyServer) -> None:
    hint = f"hint_{uuid.uuid4().hex[:8]}.png"
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, ::8] = 255
    stripes[::16, :] = 255
    Image.fromarray(stripes).save(comfy_server.input_dir / hint)

    plain = run_and_load(comfy_server, txt2img_prompt(f"plain_{uuid.uuid4().hex[:8]}", seed=7))
    controlled = run_and_load(
        comfy_server, txt2img_prompt(f"cnet_{uuid.uuid4().hex[:8]}", seed=7, hint_image=hint)
    )
    diff = float(np.abs(plain - controlled).mean())
    assert diff > 1.0, f"ControlNet left the image unchanged (mean abs diff {diff:.3f})"


def test_unknown_checkpoint_is_a_validation_error(comfy_server: ComfyServer) -> None:
    prompt = txt2img_prompt("never_written")
    prompt["1"]["inputs"]["ckpt_name"] = "does-not-exist.safetensors"
    with pytest.raises(PromptRejected) as excinfo:
        comfy_server.queue_prompt(prompt)
    err = excinfo.value
    assert err.status == 400
    assert "1" in err.node_errors, err.body
    errors = err.node_errors["1"]["errors"]
    assert any(e.get("type") == "value_not_in_list" for e in errors), errors
    assert "does-not-exist.safetensors" in str(errors)
