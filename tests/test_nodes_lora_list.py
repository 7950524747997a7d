"""DreamBoothLoraList in a real ComfyUI server: two LoRAs of train nodes gathered into one list for the grid.

Only the train node gives a LoRA socket, so the LoRAs come from train nodes. To keep this to one real
training (2 steps on the tiny SD1.5 checkpoint), the second train node's file is a copy of the first's
made before the graph runs: the same training under another name, which that node returns as already
trained (its documented reuse of an unchanged training) instead of training again.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dreambooth_test_support.comfyui import ComfyServer
from dreambooth_test_support.paths import sibling_test_module
from PIL import Image

pytestmark = pytest.mark.comfy

NODE = "DreamBoothLoraList"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def _listed_names(result: Any, node: str) -> list[str]:
    """The names in a LoRA list, as core's Preview as Text node shows the payload."""
    return re.findall(r"name='([^']+)'", "".join(result.outputs[node]["text"]))


def test_two_trainings_listed_give_a_base_row_then_both_lora_rows(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info(NODE)[NODE]
    assert info["category"] == "DreamBooth/evaluate" and info["display_name"] == "DreamBooth LoRA List"
    assert list(info["input"]["required"]) == ["lora_1"]
    assert list(info["input"]["optional"]) == ["lora_2", "lora_3", "lora_4", "loras"]
    assert info["output"] == ["DREAMBOOTH_LORA_LIST"] and info["output_name"] == ["loras"]

    train = sibling_test_module("test_nodes_train")
    tag = uuid.uuid4().hex[:6]
    folder = train.add_photos(comfy_server, f"lora list {tag}", count=2)
    # A learning rate this high makes 2 steps enough for the LoRA rows to differ from the base row.
    graph = train.train_prompt(folder, f"list_a_{tag}", steps=2, train_text_encoder=False, learning_rate=1e-2)
    del graph["3"], graph["4"], graph["5"]
    comfy_server.run_prompt(graph, timeout=300).raise_for_status()
    loras = comfy_server.models_dir / "loras"
    first, second = loras / f"list_a_{tag}.safetensors", loras / f"list_b_{tag}.safetensors"
    shutil.copyfile(first, second)

    graph["6"] = {"class_type": "DreamBoothTrain", "inputs": {**graph["2"]["inputs"], "lora_name": f"list_b_{tag}"}}
    graph["7"] = {"class_type": NODE, "inputs": {"lora_1": ["2", 0], "lora_2": ["6", 0]}}
    graph["8"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": train.CKPT}}
    grid = sibling_test_module("test_nodes_compare_grid").grid_prompt(f"list_{tag}", loras=["7", 0])["2"]
    grid["inputs"].update(model=["8", 0], clip=["8", 1], vae=["8", 2], prompts="a photo of fac dog")
    graph["9"] = grid
    graph["10"] = {"class_type": "PreviewAny", "inputs": {"source": ["9", 2]}}
    # Chained: the list extended by lora_1 = B (already in it: not added again) and lora_2 = A again.
    graph["11"] = {"class_type": NODE, "inputs": {"loras": ["7", 0], "lora_1": ["6", 0], "lora_2": ["2", 0]}}
    graph["12"] = {"class_type": "PreviewAny", "inputs": {"source": ["11", 0]}}
    # Without a list to extend, the order is lora_1, lora_2.
    graph["13"] = {"class_type": NODE, "inputs": {"lora_1": ["6", 0], "lora_2": ["2", 0]}}
    graph["14"] = {"class_type": "PreviewAny", "inputs": {"source": ["13", 0]}}
    result = comfy_server.run_prompt(graph, timeout=300).raise_for_status()
    events = train.train_events(result, "6")
    assert any(e.get("reused") for e in events if e["type"] == "status"), f"B was trained, not reused: {events}"

    table = json.loads(result.outputs["10"]["text"][0])
    rows = [(c["type"], Path(c["lora_path"]).resolve() if c["lora_path"] else None) for c in table["cells"]]
    assert rows == [("base", None), ("lora", first.resolve()), ("lora", second.resolve())]
    base, row_a, row_b = [pixels(comfy_server.output_dir / c["image_file"]) for c in table["cells"]]
    assert np.abs(row_a - base).mean() > 1.0, "the LoRA rows must show the LoRA"
    assert np.array_equal(row_a, row_b), "one training under two names renders the same"
    assert _listed_names(result, "12") == [f"list_a_{tag}.safetensors", f"list_b_{tag}.safetensors"]
    assert _listed_names(result, "14") == [f"list_b_{tag}.safetensors", f"list_a_{tag}.safetensors"]
