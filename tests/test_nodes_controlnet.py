"""The ControlNet nodes inside a real ComfyUI server, with the tiny SD1.5 checkpoint and ControlNet.

Hints are written as PNGs into the server's input folder and read back with core LoadImage, so
the nodes see exactly what a user's workflow gives them. Weights for the annotator tests are
built at test time (random networks) in the server's `models/annotators` folder and removed
again, so the missing-weights test holds whatever the order.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from dreambooth_test_support.comfyui import ComfyServer, PromptResult
from dreambooth_test_support.images import photo
from PIL import Image

pytestmark = pytest.mark.comfy

REPO_ROOT = Path(__file__).resolve().parents[1]
CKPT = "tiny-sd15.safetensors"
CONTROLNET = "tiny-controlnet.safetensors"
NONE = "none (image is a hint)"
PRE = "DreamBoothControlNetPreprocessor"
GEN = "DreamBoothControlNetGenerate"


def _load_core() -> ModuleType:
    # The ComfyUI-free core, loaded on its own (the pack's nodes/__init__ imports ComfyUI).
    name = "dreambooth_controlnet_aux_core"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "nodes" / "controlnet_aux_core.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def put_input(server: ComfyServer, pixels: np.ndarray) -> str:
    name = f"cn_{uuid.uuid4().hex[:10]}.png"
    Image.fromarray(pixels).save(server.input_dir / name)
    return name


def saved(server: ComfyServer, result: PromptResult, node_id: str) -> list[np.ndarray]:
    files = server.output_files(result, node_id=node_id)
    assert files, f"node {node_id} saved nothing: {result.outputs}"
    out = []
    for path in files:
        with Image.open(path) as img:
            out.append(np.asarray(img.convert("RGB")).copy())
    return out


def save(images: list[Any], prefix: str) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def prefix() -> str:
    return f"cn_{uuid.uuid4().hex[:8]}"


def preprocess_prompt(image_name: str, preprocessor: str, detect_resolution: int = 64) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": PRE, "inputs": {
            "image": ["1", 0], "preprocessor": preprocessor, "detect_resolution": detect_resolution,
            "low_threshold": 100, "high_threshold": 200, "seed": 0}},
        "3": save(["2", 0], prefix()),
    }


def generate_prompt(image_name: str, *, preprocessor: str = NONE, width: int = 0, height: int = 0,
                    strength: float = 1.0, seed: int = 7) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "8": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}},
        "9": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "20": {"class_type": GEN, "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "control_net": ["8", 0], "image": ["9", 0],
            "preprocessor": preprocessor, "detect_resolution": 64,
            "positive": "a photo of sks dog", "negative": "blurry",
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "strength": strength, "start_percent": 0.0, "end_percent": 1.0,
            "width": width, "height": height, "batch_size": 1}},
        "21": save(["20", 0], prefix()),
        "22": save(["20", 1], prefix()),
    }


def native_prompt(image_name: str, seed: int = 7) -> dict[str, Any]:
    """The same generation with core nodes only."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "8": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}},
        "9": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "10": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["8", 0], "image": ["9", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "vae": ["1", 2]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["10", 0], "negative": ["10", 1], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": save(["6", 0], prefix()),
    }


def canny_hint(width: int, height: int) -> np.ndarray:
    from controlnet_aux.canny import CannyDetector

    side = min(width, height)
    return CannyDetector()(photo(width, height), 100, 200, detect_resolution=side, image_resolution=side,
                           output_type="np")


@pytest.fixture
def annotators(comfy_server: ComfyServer) -> Iterator[Path]:
    """The server's default annotators folder; files a test puts there are removed afterwards."""
    folder = comfy_server.models_dir / "annotators"
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    yield folder
    for path in set(folder.iterdir()) - before:
        path.unlink()


# --------------------------------------------------------------------------- schema


def test_nodes_are_registered_with_tooltips(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    assert info[PRE]["category"] == "DreamBooth/controlnet"
    assert info[GEN]["category"] == "DreamBooth/generate"
    for node in (PRE, GEN):
        for name, spec in info[node]["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"

    def options(spec: list[Any]) -> list[str]:
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]

    pre_in, gen_in = info[PRE]["input"]["required"], info[GEN]["input"]["required"]
    detectors = options(pre_in["preprocessor"])
    assert {"canny", "depth_midas", "openpose", "lineart_realistic", "softedge_hed", "mlsd", "normal_bae",
            "scribble_xdog", "shuffle", "tile"} <= set(detectors)
    assert options(gen_in["preprocessor"]) == [NONE, *detectors]
    ks = info["KSampler"]["input"]["required"]
    assert options(gen_in["sampler_name"]) == options(ks["sampler_name"])
    assert options(gen_in["scheduler"]) == options(ks["scheduler"])
    assert info[GEN]["output"] == ["IMAGE", "IMAGE", "LATENT"]
    assert info[PRE]["output"] == ["IMAGE"]


# --------------------------------------------------------------------------- generate


def test_generate_is_pixel_identical_to_the_native_chain(comfy_server: ComfyServer) -> None:
    name = put_input(comfy_server, canny_hint(64, 64))
    native = comfy_server.run_prompt(native_prompt(name)).raise_for_status()
    ours = comfy_server.run_prompt(generate_prompt(name)).raise_for_status()
    (expected,) = saved(comfy_server, native, "7")
    (image,) = saved(comfy_server, ours, "21")
    assert image.shape == (64, 64, 3)
    assert expected.std() > 1.0
    np.testing.assert_array_equal(image, expected)

    # The hint really steers the result: without the ControlNet the picture changes.
    free = comfy_server.run_prompt(generate_prompt(name, strength=0.0)).raise_for_status()
    (unguided,) = saved(comfy_server, free, "21")
    assert not np.array_equal(unguided, image)


def test_generate_takes_its_size_from_the_image(comfy_server: ComfyServer) -> None:
    name = put_input(comfy_server, photo(96, 64))
    result = comfy_server.run_prompt(generate_prompt(name, preprocessor="canny")).raise_for_status()
    (image,) = saved(comfy_server, result, "21")
    (hint,) = saved(comfy_server, result, "22")
    assert image.shape == (64, 96, 3)
    assert hint.shape == (64, 96, 3)
    # The generate node's canny is the preprocessor node's canny.
    alone = comfy_server.run_prompt(preprocess_prompt(name, "canny")).raise_for_status()
    np.testing.assert_array_equal(hint, saved(comfy_server, alone, "3")[0])

    # One side given: the other follows the image's aspect ratio.
    tall = comfy_server.run_prompt(generate_prompt(name, height=32)).raise_for_status()
    assert saved(comfy_server, tall, "21")[0].shape == (32, 48, 3)


# --------------------------------------------------------------------------- preprocessor


def test_canny_matches_controlnet_aux_and_keeps_aspect(comfy_server: ComfyServer) -> None:
    core = _load_core()
    wide = photo(128, 64)
    result = comfy_server.run_prompt(preprocess_prompt(put_input(comfy_server, wide), "canny")).raise_for_status()
    (hint,) = saved(comfy_server, result, "3")
    np.testing.assert_array_equal(hint, canny_hint(128, 64))  # no resizing needed: controlnet_aux verbatim

    odd = photo(96, 64)  # padded for detection, see the core's documented transformation
    result = comfy_server.run_prompt(preprocess_prompt(put_input(comfy_server, odd), "canny")).raise_for_status()
    (hint,) = saved(comfy_server, result, "3")
    assert hint.shape == (64, 96, 3)
    np.testing.assert_array_equal(hint, core.detect(odd, "canny", [], detect_resolution=64)[0])


def test_missing_weights_is_a_node_error_and_the_server_carries_on(
    comfy_server: ComfyServer, annotators: Path
) -> None:
    assert not (annotators / "body_pose_model.pth").exists()
    name = put_input(comfy_server, photo(64, 64))
    result = comfy_server.run_prompt(preprocess_prompt(name, "openpose"))
    assert result.status == "error"
    assert result.error is not None and result.error["node_type"] == PRE
    message = result.error["exception_message"]
    assert "body_pose_model.pth" in message and "'openpose'" in message
    assert str(annotators) in message and "lllyasviel/Annotators" in message

    after = comfy_server.run_prompt(preprocess_prompt(name, "canny"))
    assert after.status == "success", after.error


def test_random_lineart_weights_run_end_to_end(comfy_server: ComfyServer, annotators: Path) -> None:
    from controlnet_aux.lineart import Generator

    torch.manual_seed(0)
    for filename in ("sk_model.pth", "sk_model2.pth"):
        torch.save(Generator(3, 1, 3).state_dict(), annotators / filename)
    name = put_input(comfy_server, photo(96, 64))
    result = comfy_server.run_prompt(preprocess_prompt(name, "lineart_realistic")).raise_for_status()
    (hint,) = saved(comfy_server, result, "3")
    assert hint.shape == (64, 96, 3)
    assert hint.std() > 0


def test_code_carrying_pickle_is_refused(comfy_server: ComfyServer, annotators: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pickle code ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    torch.save({"state_dict": Payload()}, annotators / "ControlNetHED.pth")
    name = put_input(comfy_server, photo(64, 64))
    result = comfy_server.run_prompt(preprocess_prompt(name, "softedge_hed"))
    assert result.status == "error"
    assert result.error is not None
    message = result.error["exception_message"]
    assert "not a plain weights file" in message and "ControlNetHED.pth" in message
    assert not marker.exists()
