"""DreamBoothCompareGrid in a real ComfyUI server: tiny SD1.5 checkpoint, 64 px cells, 2 steps.

The LoRA is a UNet-only kohya file built here (attention layers of the tiny UNet), so a row at
UNet strength 0 must reproduce the base row exactly and a row at strength 1 must not. The
"fine-tuned" checkpoint is the tiny checkpoint with its UNet weights perturbed; a link to the tiny
checkpoint itself under another name must reproduce the base row exactly.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from comfyui_dreambooth_lora.trainer import scores
from dreambooth_test_support.comfyui import ComfyServer
from dreambooth_test_support.paths import sibling_test_module
from dreambooth_test_support.tiny_models import tiny_clip_folder, tiny_dino_folder
from PIL import Image
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfy

NODE = "DreamBoothCompareGrid"
CKPT = "tiny-sd15.safetensors"
PROMPTS = ["a photo of sks dog", "a photo of sks dog on the beach at sunset, highly detailed"]
_BLOCKS = ("down_blocks_0_attentions_0", "mid_block_attentions_0", "up_blocks_0_attentions_0",
           "up_blocks_0_attentions_1")
_LAYERS = {"attn1_to_q": (320, 320), "attn1_to_v": (320, 320), "attn2_to_k": (320, 768), "attn2_to_v": (320, 768),
           "ff_net_2": (320, 1280)}


def unet_lora(rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for block in _BLOCKS:
        for layer, (out, fan_in) in _LAYERS.items():
            name = f"lora_unet_{block}_transformer_blocks_0_{layer}"
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * (0.5 / rank**0.5)
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


def grid_prompt(prefix: str, **inputs: Any) -> dict[str, Any]:
    node = {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": "\n".join(PROMPTS) + "\n\n",
        "include_base": True, "lora_names": "", "unet_strengths": "1.0", "text_encoder_strengths": "1.0",
        "cfgs": "7.5", "negative_prompt": "blurry", "seed": 11, "steps": 2, "sampler_name": "euler",
        "scheduler": "normal", "width": 64, "height": 64, "filename_prefix": prefix,
    }
    node.update(inputs)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": NODE, "inputs": node},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": f"{prefix}_cells"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def lora_name(comfy_server: ComfyServer) -> str:
    name = f"grid lora {uuid.uuid4().hex[:6]}.safetensors"  # a space on purpose
    save_file(unet_lora(), str(comfy_server.models_dir / "loras" / name))
    return name


@pytest.fixture(scope="module")
def finetune_name(comfy_server: ComfyServer, tiny_checkpoint: Path) -> str:
    """The tiny checkpoint with every UNet weight nudged: a stand-in for a full fine-tune."""
    gen = torch.Generator().manual_seed(1)
    sd = load_file(str(tiny_checkpoint))
    for key, value in sd.items():
        if key.startswith("model.diffusion_model.") and value.is_floating_point() and value.ndim >= 2:
            noise = torch.randn(value.shape, generator=gen) * (0.1 * float(value.float().std()) + 1e-3)
            sd[key] = (value.float() + noise).to(value.dtype)
    name = f"grid finetune {uuid.uuid4().hex[:6]}.safetensors"
    save_file(sd, str(comfy_server.models_dir / "checkpoints" / name))
    return name


def cell_pixels(server: ComfyServer, records: list[dict[str, Any]]) -> list[np.ndarray]:
    return [pixels(server.output_dir / record["image_file"]) for record in records]


def test_grid_of_base_and_lora_strengths(comfy_server: ComfyServer, lora_name: str) -> None:
    info = comfy_server.object_info(NODE)[NODE]
    assert info["category"] == "DreamBooth/evaluate" and info["output_node"] is True
    assert info["output"] == ["IMAGE", "IMAGE", "STRING"]

    prefix = f"cmp_{uuid.uuid4().hex[:8]}"
    result = comfy_server.run_prompt(grid_prompt(prefix, lora_names=lora_name, unet_strengths="0, 1"),
                                     timeout=300).raise_for_status()

    cells = [pixels(p) for p in comfy_server.output_files(result, node_id="3")]
    assert len(cells) == 6 and all(c.shape == (64, 64, 3) for c in cells)
    base, off, on = cells[0:2], cells[2:4], cells[4:6]
    assert base[0].std() > 1.0 and not np.array_equal(base[0], base[1])  # prompts make a difference
    for col in range(2):
        assert np.array_equal(off[col], base[col]), "UNet strength 0 must reproduce the base row"
        assert np.abs(on[col] - base[col]).mean() > 1.0, "UNet strength 1 left the image unchanged"

    table = json.loads(result.outputs["4"]["text"][0])
    layout = table["layout"]
    (grid_path,) = comfy_server.output_files(result, node_id="2")
    assert grid_path.parent.name == "dreambooth_grids" and grid_path.name.startswith(prefix)
    grid = pixels(grid_path)
    left, top = layout["left"], layout["top"]
    assert left > 0 and top > layout["font_px"]
    assert grid.shape == (top + 3 * 64, left + 2 * 64, 3)
    for index, cell in enumerate(cells):
        r, c = divmod(index, 2)
        assert np.array_equal(grid[top + r * 64: top + (r + 1) * 64, left + c * 64: left + (c + 1) * 64], cell)
    assert (grid[:top, left:] < 128).any() and (grid[top:, :left] < 128).any(), "labels missing"

    stem = grid_path.with_suffix("")
    with open(f"{stem}.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    saved = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))
    assert saved == table
    records = table["cells"]
    assert len(records) == len(rows) == 6
    expect = [(None, ""), (0.0, lora_name), (1.0, lora_name)]
    for index, (record, row) in enumerate(zip(records, rows, strict=True)):
        r, c = divmod(index, 2)
        unet, lora = expect[r]
        assert (record["row"], record["column"], record["prompt"]) == (r, c, PROMPTS[c])
        assert (record["lora"], record["unet_strength"], record["cfg"]) == (lora, unet, 7.5)
        assert record["text_encoder_strength"] == (None if r == 0 else 1.0)
        assert (record["seed"], record["steps"], record["sampler"], record["scheduler"]) == (11, 2, "euler", "normal")
        assert (record["width"], record["height"]) == (64, 64)
        assert (row["row"], row["column"], row["lora"], row["prompt"]) == (str(r), str(c), lora, PROMPTS[c])
        assert row["unet_strength"] == ("" if unet is None else str(unet))
        assert np.array_equal(pixels(comfy_server.output_dir / record["image_file"]), cells[index])

    ticks = [e for e in result.events_of("progress") if e.get("node") == "2"]
    assert [e["value"] for e in ticks] == [1, 2, 3, 4, 5, 6] and {e["max"] for e in ticks} == {6}


def grid_outputs(server: ComfyServer, prefix: str) -> list[Path]:
    folder = server.output_dir / "dreambooth_grids"
    return sorted(folder.glob(f"{prefix}*")) if folder.is_dir() else []


def test_interrupt_stops_between_cells_and_saves_no_table(comfy_server: ComfyServer) -> None:
    # 4 CFGs x 3 prompts of the base model at 24 steps: several seconds of cells to cut short.
    prefix = f"cancel_{uuid.uuid4().hex[:8]}"
    graph = grid_prompt(prefix, prompts="a dog\na cat\na bird", cfgs="7.5, 5, 3, 2", steps=24)
    total = 12
    marks: dict[str, float] = {}
    ticks: list[int] = []

    def interrupt_at_first_cell(event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("type") == "executing" and data.get("node") == "2":
            marks.setdefault("started", time.monotonic())
        if event.get("type") == "progress" and data.get("node") == "2":
            ticks.append(int(data["value"]))
            if "asked" not in marks:
                marks["asked"] = time.monotonic()
                comfy_server.interrupt()

    result = sibling_test_module("test_nodes_train").follow(comfy_server, graph, interrupt_at_first_cell,
                                                            timeout=300)
    ended = time.monotonic()
    assert result.status == "interrupted", result.error
    assert result.error is not None and result.error.get("node_id") == "2", result.error
    assert ticks and max(ticks) < total / 2, f"cells kept coming after the interrupt: {ticks}"
    first_cell = marks["asked"] - marks["started"]  # the prompts' encoding and one cell
    assert ended - marks["asked"] < max(2.0, 3 * first_cell), (
        f"took {ended - marks['asked']:.1f} s to stop; one cell took {first_cell:.1f} s")
    # A half grid must not look like a finished one: no grid, table or cell folder for the prefix.
    assert grid_outputs(comfy_server, prefix) == []


@pytest.mark.parametrize(("inputs", "named"), [
    ({"unet_strengths": "0, one"}, "unet_strengths"),
    ({"prompts": " \n"}, "prompts"),
    ({"lora_names": "no such lora.safetensors"}, "lora_names"),
    ({"include_base": False}, "include_base"),
    ({"checkpoint_names": "no such checkpoint.safetensors"}, "checkpoint_names"),
    ({"rows_without_identifier": True}, "identifier"),
    ({"rows_without_identifier": True, "identifier": "qzx"}, "qzx"),
])
def test_bad_input_is_an_error_naming_it(comfy_server: ComfyServer, lora_name: str, inputs: dict[str, Any],
                                         named: str) -> None:
    inputs = {"lora_names": lora_name, **inputs} if named != "include_base" else inputs
    result = comfy_server.run_prompt(grid_prompt(f"bad_{uuid.uuid4().hex[:8]}", **inputs), timeout=120)
    assert result.status == "error" and result.error is not None
    assert result.error.get("node_id") == "2", result.error
    assert result.error.get("exception_type", "").endswith("ValueError"), result.error
    assert named in result.error.get("exception_message", ""), result.error


def test_scores_per_cell_with_row_and_column_means(comfy_server: ComfyServer) -> None:
    pytest.importorskip("transformers")
    root = comfy_server.models_dir / "dreambooth_scores"
    clip, dino = f"grid-clip-{uuid.uuid4().hex[:6]}", f"grid-dino-{uuid.uuid4().hex[:6]}"
    clip_dir, _ = tiny_clip_folder(root / clip), tiny_dino_folder(root / dino)
    two_rows = {"cfgs": "7.5, 2"}

    # The reference is the base row's first cell, from a run without scores.
    first = comfy_server.run_prompt(grid_prompt(f"ref_{uuid.uuid4().hex[:8]}", **two_rows),
                                    timeout=300).raise_for_status()
    plain = json.loads(first.outputs["4"]["text"][0])
    assert all(cell[key] is None for cell in plain["cells"] for key in ("clip_i", "clip_t", "dino"))
    reference = f"grid_ref_{uuid.uuid4().hex[:6]}.png"
    shutil.copy(comfy_server.output_dir / plain["cells"][0]["image_file"], comfy_server.input_dir / reference)

    prefix = f"scored_{uuid.uuid4().hex[:8]}"
    graph = grid_prompt(prefix, **two_rows, reference=["5", 0], identifier="sks", clip_model=clip, dino_model=dino)
    graph["5"] = {"class_type": "LoadImage", "inputs": {"image": reference}}
    result = comfy_server.run_prompt(graph, timeout=300).raise_for_status()
    table = json.loads(result.outputs["4"]["text"][0])
    records = table["cells"]
    assert len(records) == 4
    assert records[0]["clip_i"] == pytest.approx(1.0, abs=1e-4) and records[0]["dino"] == pytest.approx(1.0, abs=1e-4)
    for record in records[1:]:
        assert record["clip_i"] < 1.0 - 1e-4 and record["dino"] < 1.0 - 1e-4, record

    model = scores.ScoreModels.load(clip_dir, None)
    for record in records:
        with Image.open(comfy_server.output_dir / record["image_file"]) as img:
            cell = img.convert("RGB")
        text = scores.remove_identifier(record["prompt"], "sks")
        assert "sks" not in text
        assert record["clip_t"] == pytest.approx(model.clip_t([cell], [text]), abs=1e-4)

    for key in ("clip_i", "clip_t", "dino"):
        for r in range(2):
            assert table["row_means"][r][key] == pytest.approx(np.mean([x[key] for x in records[2 * r: 2 * r + 2]]))
        for c in range(2):
            assert table["column_means"][c][key] == pytest.approx(np.mean([x[key] for x in records[c::2]]))

    (grid_path,) = comfy_server.output_files(result, node_id="2")
    stem = grid_path.with_suffix("")
    with open(f"{stem}.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(row["dino"]) for row in rows] == pytest.approx([x["dino"] for x in records])
    # The score lines make the labels taller and wider; the cells themselves are unchanged.
    layout, before = table["layout"], plain["layout"]
    assert layout["top"] > before["top"] and layout["left"] >= before["left"]
    grid = pixels(grid_path)
    left, top = layout["left"], layout["top"]
    for index, record in enumerate(records):
        r, c = divmod(index, 2)
        cell = pixels(comfy_server.output_dir / record["image_file"])
        assert np.array_equal(cell, pixels(comfy_server.output_dir / plain["cells"][index]["image_file"]))
        assert np.array_equal(grid[top + r * 64: top + (r + 1) * 64, left + c * 64: left + (c + 1) * 64], cell)


def test_checkpoint_rows_follow_the_base_row_and_are_freed(comfy_server: ComfyServer, tiny_checkpoint: Path,
                                                           finetune_name: str, lora_name: str) -> None:
    same = f"grid same {uuid.uuid4().hex[:6]}.safetensors"
    comfy_server.add_model("checkpoints", tiny_checkpoint, same)
    prefix = f"ckpt_{uuid.uuid4().hex[:8]}"
    result = comfy_server.run_prompt(grid_prompt(prefix, checkpoint_names=f"{finetune_name}\n\n{same}\n",
                                                 lora_names=lora_name), timeout=300).raise_for_status()
    table = json.loads(result.outputs["4"]["text"][0])
    records = table["cells"]
    assert [(r["type"], r["checkpoint"], r["lora"]) for r in records[::2]] == [
        ("base", "", ""), ("checkpoint", finetune_name, ""), ("checkpoint", same, ""), ("lora", "", lora_name)]
    assert all(r["prompt"] == PROMPTS[r["column"]] and r["cfg"] == 7.5 for r in records)
    assert records[2]["checkpoint_path"].endswith(finetune_name)
    assert records[2]["unet_strength"] is None and records[2]["text_encoder_strength"] is None
    assert table["rows"][1].startswith("grid finetune") and "checkpoint" in table["rows"][1]
    cells = cell_pixels(comfy_server, records)
    for col in range(2):
        assert np.array_equal(cells[4 + col], cells[col]), "the base model as a checkpoint must give the base row"
        assert np.abs(cells[2 + col] - cells[col]).mean() > 1.0, "the fine-tune's row equals the base row"
    (grid_path,) = comfy_server.output_files(result, node_id="2")
    with open(grid_path.with_suffix(".csv"), encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(row["type"], row["checkpoint"]) for row in rows[2:4]] == [("checkpoint", finetune_name)] * 2
    assert "still in memory" not in comfy_server.log_text()

    # The same name pointing at another file (a retrain) is a new grid, not ComfyUI's cached one.
    retrained = f"grid retrained {uuid.uuid4().hex[:6]}.safetensors"
    one_cell = {"prompts": PROMPTS[0], "include_base": False, "checkpoint_names": retrained}
    comfy_server.add_model("checkpoints", tiny_checkpoint, retrained)
    before = comfy_server.run_prompt(grid_prompt(f"re_{uuid.uuid4().hex[:8]}", **one_cell)).raise_for_status()
    comfy_server.add_model("checkpoints", comfy_server.models_dir / "checkpoints" / finetune_name, retrained)
    after = comfy_server.run_prompt(grid_prompt(f"re_{uuid.uuid4().hex[:8]}", **one_cell)).raise_for_status()
    first, second = (json.loads(r.outputs["4"]["text"][0])["cells"] for r in (before, after))
    assert np.array_equal(cell_pixels(comfy_server, first)[0], cells[0])
    assert np.array_equal(cell_pixels(comfy_server, second)[0], cells[2])


def test_rows_without_identifier_follow_each_trained_row(comfy_server: ComfyServer, finetune_name: str,
                                                         lora_name: str) -> None:
    prefix = f"drift_{uuid.uuid4().hex[:8]}"
    result = comfy_server.run_prompt(grid_prompt(prefix, lora_names=lora_name, checkpoint_names=finetune_name,
                                                 identifier="sks", rows_without_identifier=True),
                                     timeout=300).raise_for_status()
    table = json.loads(result.outputs["4"]["text"][0])
    records = table["cells"]
    dropped = ["a photo of dog", "a photo of dog on the beach at sunset, highly detailed"]
    expect = [("base", "", PROMPTS), ("checkpoint", "", PROMPTS), ("checkpoint", "sks", dropped),
              ("lora", "", PROMPTS), ("lora", "sks", dropped)]
    assert len(records) == 2 * len(expect)
    for index, record in enumerate(records):
        kind, removed, prompts = expect[index // 2]
        assert (record["type"], record["identifier_removed"], record["prompt"]) == (kind, removed,
                                                                                     prompts[index % 2])
    assert "no identifier" in table["rows"][4] and "no identifier" not in table["rows"][3]
    (grid_path,) = comfy_server.output_files(result, node_id="2")
    with open(grid_path.with_suffix(".csv"), encoding="utf-8", newline="") as fh:
        assert [row["prompt"] for row in csv.DictReader(fh)][8:] == dropped
    cells = cell_pixels(comfy_server, records)
    for col in range(2):
        assert np.abs(cells[8 + col] - cells[6 + col]).mean() > 1.0, "removing the identifier changed nothing"
        assert not np.array_equal(cells[4 + col], cells[2 + col])
