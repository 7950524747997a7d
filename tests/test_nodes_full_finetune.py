"""The full fine-tune through the real server: DreamBooth Options: Full Fine-tune chained into the train
node writes a checkpoint to models/checkpoints that CheckpointLoaderSimple loads and that changes the
image, and a LoRA extracted from it that the pack's loader applies completely (it refuses partial
matches) in the same prompt; ComfyUI's own loader code patches every module of it (no key left)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dreambooth_test_support.paths import sibling_test_module
from PIL import Image
from safetensors import safe_open

PROBE = Path(__file__).resolve().parent / "support" / "comfy_lora_probe.py"


def _pixels(server: Any, result: Any, node: str) -> np.ndarray:
    files = server.output_files(result, node_id=node)
    assert len(files) == 1, result.outputs
    with Image.open(files[0]) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def _render(server: Any, helpers: Any, ckpt_name: str) -> np.ndarray:
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
              **helpers.txt2img_nodes(["1", 0], ["1", 1], ["1", 2], f"full_{uuid.uuid4().hex[:8]}")}
    return _pixels(server, server.run_prompt(prompt, timeout=300).raise_for_status(), "6")


@pytest.mark.comfy
def test_full_fine_tune_checkpoint_and_extracted_lora(comfy_server: Any, comfyui_root: Path) -> None:
    helpers = sibling_test_module("test_nodes_train")
    name = f"test_full_{uuid.uuid4().hex[:6]}"
    folder = helpers.add_photos(comfy_server, f"full {name}", count=2)
    prompt = helpers.with_lora_render(helpers.train_prompt(
        folder, name, steps=2, train_text_encoder=False, learning_rate=1e-3, options=["20", 0]))
    del prompt["3"], prompt["4"], prompt["5"]
    prompt["20"] = {"class_type": "DreamBoothOptionsFullFineTune",
                    "inputs": {"training_method": "full", "extract_lora_rank": 8}}
    prompt["21"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 4]}}
    result = comfy_server.run_prompt(prompt, timeout=400).raise_for_status()

    checkpoint = comfy_server.models_dir / "checkpoints" / f"{name}.safetensors"
    extracted = comfy_server.models_dir / "loras" / f"{name}_lora_rank8.safetensors"
    assert checkpoint.is_file() and extracted.is_file()
    assert not (comfy_server.models_dir / "loras" / f"{name}.safetensors").exists(), "no LoRA training ran"
    assert f"{name}.safetensors" in "".join(result.outputs["21"]["text"]), "the checkpoint output names the file"
    with safe_open(str(checkpoint), "pt") as fh:
        assert fh.metadata()["dreambooth.training_method"] == "full"
    with safe_open(str(extracted), "pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "8"
    # The extracted LoRA went through the pack's loader (complete, or the prompt would have failed) and
    # changed the image of the base model.
    with_lora = _pixels(comfy_server, result, "16")

    base = _render(comfy_server, helpers, helpers.CKPT)
    tuned = _render(comfy_server, helpers, f"{name}.safetensors")
    assert np.abs(tuned - base).mean() > 1.0, "the fine-tuned checkpoint changes the image"
    assert np.abs(with_lora - base).mean() > 1.0, "the extracted LoRA changes the image"

    proc = subprocess.run([sys.executable, str(PROBE), str(comfyui_root), str(comfy_server.models_dir /
                           "checkpoints" / helpers.CKPT), str(extracted)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=comfyui_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert not [w for w in report["warnings"] if "lora key not loaded" in w], report["warnings"]
    assert report["unet_patched"] == len(report["lora_modules"]) > 50

    # Queued again: the checkpoint holds this training, so nothing is trained and the same files return.
    again = comfy_server.run_prompt(prompt, timeout=120).raise_for_status()
    assert any(e.get("reused") for e in helpers.train_events(again) if e["type"] == "status")
