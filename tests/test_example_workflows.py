"""Every example workflow is valid against the live node schemas and runs end to end.

UI files are converted back to API form through the server's ``/object_info`` (node types, widget
values, sockets and link types must all fit) and must equal their API twins; the API files are
run on the real server with the tiny models swapped in for the SD1.5 files they name.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comfyui_dreambooth_lora.trainer import scores
from dreambooth_test_support.paths import DREAMBENCH_DIR
from dreambooth_test_support.tiny_models import (
    tiny_clip_folder,
    tiny_dino_folder,
    tiny_sdxl_checkpoint,
    tiny_sdxl_controlnet,
)
from PIL import Image
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
DREAMBENCH = DREAMBENCH_DIR
NAMES = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))


def _script_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"dreambooth_scripts_{name}", REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


workflow_format = _script_module("workflow_format")
demo = _script_module("demo")


def load(kind: str, name: str) -> dict[str, Any]:
    folder = WORKFLOWS / "api" if kind == "api" else WORKFLOWS
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


def test_there_are_the_documented_workflows() -> None:
    assert NAMES == ["dreambooth_prior_preservation_on_off", "dreambooth_rank_sweep",
                     "dreambooth_sdxl_train_then_generate",
                     "dreambooth_strength_guidance_sweep", "dreambooth_train_then_generate",
                     "dreambooth_train_with_prior", "dreambooth_training_length_sweep",
                     "lora_split_strength_controlnet"]
    for name in NAMES:
        text = (WORKFLOWS / f"{name}.json").read_text(encoding="utf-8") + json.dumps(load("api", name))
        assert "/home/" not in text and ":\\\\" not in text and "/tmp/" not in text, "no absolute paths"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_fits_the_live_schema_and_matches_its_api_twin(name: str, comfy_server) -> None:
    object_info = comfy_server.object_info()
    ui = load("ui", name)
    as_api = workflow_format.ui_to_api(ui, object_info)
    api = load("api", name)
    ids = {old: str(i + 1) for i, old in enumerate(api)}

    def renumber(node: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: [ids[v[0]], v[1]] if isinstance(v, list) and len(v) == 2 and v[0] in ids else v
                  for k, v in node["inputs"].items()}
        return {"class_type": node["class_type"], "inputs": inputs}

    assert as_api == {ids[k]: renumber(v) for k, v in api.items()}
    for link in ui["links"]:
        assert any(n["id"] == link[1] for n in ui["nodes"]) and any(n["id"] == link[3] for n in ui["nodes"])


@pytest.mark.parametrize("name", NAMES)
def test_ui_nodes_do_not_overlap(name: str) -> None:
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - workflow_format.TITLE_HEIGHT, n["pos"][0] + n["size"][0],
              n["pos"][1] + n["size"][1]) for n in load("ui", name)["nodes"]]
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1:]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"nodes {a} and {b} overlap"


@pytest.fixture(scope="module")
def photo_folder(comfy_server) -> str:
    """Four DreamBench dog photos (downscaled copies) in the server's input folder."""
    folder = Path(comfy_server.input_dir) / "wf dog"
    folder.mkdir(parents=True, exist_ok=True)
    for jpg in sorted((DREAMBENCH / "dog").glob("*.jpg"))[:4]:
        with Image.open(jpg) as img:
            img.convert("RGB").resize((96, 96)).save(folder / f"{jpg.stem}.png")
    with Image.open(sorted((DREAMBENCH / "dog").glob("*.jpg"))[0]) as img:
        img.convert("RGB").resize((96, 64)).save(Path(comfy_server.input_dir) / "wf_layout.png")
    return folder.name


def tiny(prompt: dict[str, Any], photos: str, lora_name: str) -> dict[str, Any]:
    """The same graph on the tiny models and small sizes (the demo's own adaptation)."""
    return demo.adapt_workflow(prompt, checkpoint="tiny-sd15.safetensors", controlnet="tiny-controlnet.safetensors",
                               folder=photos, layout_image="wf_layout.png", resolution=64, steps=3,
                               lora_name=lora_name, num_class_images=2, sample_steps=2,
                               output_prefix=f"wf/{lora_name.replace('/', '_')}", rank=4)


def test_train_with_prior_then_split_strength_generation(comfy_server, photo_folder: str) -> None:
    result = comfy_server.run_prompt(tiny(load("api", "dreambooth_train_with_prior"), photo_folder, "wf/prior"))
    result.raise_for_status()
    lora = Path(comfy_server.models_dir) / "loras" / "wf" / "prior.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        assert any(k.startswith("lora_te_") for k in f.keys()) and any(k.startswith("lora_unet_") for k in f.keys())
    assert meta["ss_prior_loss_weight"] == "1.0" and meta["dreambooth.class_prompt"] == "a photo of dog"
    assert meta["dreambooth.instance_prompt"].startswith("a photo of ") and meta["ss_steps"] == "3"
    crops = comfy_server.output_files(result, "crops")
    assert len(crops) == 4 and all(Image.open(p).size == (64, 64) for p in crops)
    assert len(comfy_server.output_files(result, "samples")) == 2, "one per validation prompt"
    generated = comfy_server.run_prompt(tiny(load("api", "lora_split_strength_controlnet"), photo_folder, "wf/prior"))
    generated.raise_for_status()
    images = comfy_server.output_files(generated, "save")
    assert len(images) == 1 and Image.open(images[0]).size == (96, 64), "size follows the layout image"


def test_one_graph_trains_and_generates(comfy_server, photo_folder: str) -> None:
    result = comfy_server.run_prompt(tiny(load("api", "dreambooth_train_then_generate"), photo_folder, "wf/both"))
    result.raise_for_status()
    assert set(result.outputs) >= {"crops", "curve", "samples", "save", "hint"}, "every branch ran"
    assert (Path(comfy_server.models_dir) / "loras" / "wf" / "both.safetensors").is_file()
    images = comfy_server.output_files(result, "save")
    assert len(images) == 1 and Image.open(images[0]).size == (96, 64)
    assert len(comfy_server.output_files(result, "hint")) == 1


@pytest.fixture(scope="module")
def sdxl_models(comfy_server, comfyui_root: Path) -> tuple[str, str]:
    """The tiny SDXL checkpoint and ControlNet in the server's model folders (ComfyUI lists files as
    they appear, so the server need not restart)."""
    ckpt, controlnet = "tiny-sdxl.safetensors", "tiny-sdxl-controlnet.safetensors"
    comfy_server.add_model("checkpoints", tiny_sdxl_checkpoint(comfyui_root), ckpt)
    comfy_server.add_model("controlnet", tiny_sdxl_controlnet(comfyui_root), controlnet)
    return ckpt, controlnet


@pytest.mark.slow
def test_sdxl_trains_with_buckets_and_prior_then_generates_with_an_sdxl_controlnet(
        comfy_server, photo_folder: str, sdxl_models: tuple[str, str]) -> None:
    api = load("api", "dreambooth_sdxl_train_then_generate")
    assert api["data"]["inputs"]["resolution"] == 1024 and api["data"]["inputs"]["aspect_buckets"] is True
    ckpt, controlnet = sdxl_models
    graph = demo.adapt_workflow(api, checkpoint=ckpt, controlnet=controlnet, folder=photo_folder,
                                layout_image="wf_layout.png", resolution=64, steps=2, lora_name="wf/sdxl",
                                num_class_images=2, sample_steps=2, output_prefix="wf/sdxl", rank=4)
    result = comfy_server.run_prompt(graph, timeout=900).raise_for_status()
    assert set(result.outputs) >= {"crops", "curve", "save", "hint"}, "every branch ran"
    lora = Path(comfy_server.models_dir) / "loras" / "wf" / "sdxl.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_prior_loss_weight"] == "1.0"
    assert any(k.startswith("lora_unet_") for k in keys)
    if graph["train"]["inputs"]["train_text_encoder"]:
        assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    images = comfy_server.output_files(result, "save")
    assert len(images) == 1 and Image.open(images[0]).size == (96, 64), "size follows the layout image"


def sweep(prompt: dict[str, Any], photos: str, lora_name: str, **grid: Any) -> dict[str, Any]:
    """A sweep workflow made small: 6 training steps with a LoRA every 2, 64 px cells, 2 sampling steps."""
    out = tiny(prompt, photos, lora_name)
    for node in out.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "DreamBoothTrain":
            inputs.update(steps=6, checkpointing_steps=3)
        if kind == "DreamBoothOptionsAdvanced":
            inputs["save_lora_every_n_steps"] = 2
        if kind == "DreamBoothCompareGrid":
            inputs.update(steps=2, width=64, height=64, sampler_name="euler", scheduler="normal",
                          filename_prefix=f"wf_{lora_name.replace('/', '_')}", **grid)
            if inputs["lora_names"]:
                inputs["lora_names"] = f"{lora_name}.safetensors"
    return out


def grid_table(comfy_server, result: Any, node: str, prompt: dict[str, Any]) -> dict[str, Any]:
    """The grid's saved table, after checking the grid is rows x columns cells of 64 px plus its labels."""
    (grid_path,) = comfy_server.output_files(result, node_id=node)
    table = json.loads(grid_path.with_suffix(".json").read_text(encoding="utf-8"))
    columns = [line for line in prompt[node]["inputs"]["prompts"].splitlines() if line.strip()]
    assert table["columns"] == columns
    layout = table["layout"]
    with Image.open(grid_path) as img:
        assert img.size == (layout["left"] + 64 * len(columns), layout["top"] + 64 * len(table["rows"]))
    assert len(comfy_server.output_files(result, node_id="show")) == 1, "the grid preview"
    return table


def cell(comfy_server, table: dict[str, Any], row: int, column: int) -> Any:
    record = table["cells"][row * len(table["columns"]) + column]
    assert (record["row"], record["column"]) == (row, column)
    with Image.open(comfy_server.output_dir / record["image_file"]) as img:
        return img.convert("RGB").tobytes()


def test_training_length_sweep_then_strength_guidance_sweep(comfy_server, photo_folder: str) -> None:
    lengths = sweep(load("api", "dreambooth_training_length_sweep"), photo_folder, "wf/sweep")
    result = comfy_server.run_prompt(lengths, timeout=600).raise_for_status()
    steps_dir = Path(comfy_server.models_dir) / "loras" / "wf" / "sweep_steps"
    saved = sorted(p.name for p in steps_dir.iterdir())
    assert saved == ["sweep_step000002.safetensors", "sweep_step000004.safetensors"]
    table = grid_table(comfy_server, result, "grid", lengths)
    assert len(table["columns"]) == 6 and table["columns"][-1] == "a photo of a dog"
    # base, every intermediate LoRA in step order, then the final one
    row_loras = [table["cells"][r * 6]["lora_path"] for r in range(len(table["rows"]))]
    final = Path(comfy_server.models_dir) / "loras" / "wf" / "sweep.safetensors"
    assert row_loras[0] == "" and [Path(p).resolve() for p in row_loras[1:]] == [
        *((steps_dir / name).resolve() for name in saved), final.resolve()]
    assert "curve" in result.outputs

    strengths = sweep(load("api", "dreambooth_strength_guidance_sweep"), photo_folder, "wf/sweep",
                      unet_strengths="0, 1", text_encoder_strengths="0, 1")
    cfgs = [5.0, 7.5]
    assert strengths["grid"]["inputs"]["cfgs"] == "5, 7.5"
    result = comfy_server.run_prompt(strengths, timeout=600).raise_for_status()
    table = grid_table(comfy_server, result, "grid", strengths)
    assert len(table["columns"]) == 5
    settings = [(c["lora"], c["unet_strength"], c["text_encoder_strength"], c["cfg"]) for c in table["cells"][::5]]
    lora = "wf/sweep.safetensors"
    assert settings == [("", None, None, 5.0), ("", None, None, 7.5),
                        *((lora, u, t, c) for u in (0.0, 1.0) for t in (0.0, 1.0) for c in cfgs)]
    for column in range(5):  # strength 0 on both sides is the base model, cell for cell
        assert cell(comfy_server, table, 2, column) == cell(comfy_server, table, 0, column)
        assert cell(comfy_server, table, 3, column) == cell(comfy_server, table, 1, column)



def trained_apart(comfy_server, prompt: dict[str, Any], photos: str, tag: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """A workflow with several train nodes made small like `sweep`, each keeping its own LoRA name,
    rank and alpha (the demo's adaptation gives every train node one name and rank 4).
    Returns the graph and each train node's file (a full fine-tune's in models/checkpoints)."""
    out = sweep(prompt, photos, f"wf/{tag}")
    files: dict[str, Path] = {}
    for node_id, node in prompt.items():
        if node["class_type"] != "DreamBoothTrain":
            continue
        original = node["inputs"]
        name = f"wf/{tag}_{Path(original['lora_name']).name}"
        out[node_id]["inputs"].update(lora_name=name, rank=original["rank"], alpha=original["alpha"])
        options = prompt[original["options"][0]]["inputs"] if "options" in original else {}
        folder = "checkpoints" if options.get("training_method") == "full" else "loras"
        files[node_id] = Path(comfy_server.models_dir) / folder / f"{name}.safetensors"
    assert len(set(files.values())) == len(files) > 1, "distinct file names"
    # Every trained LoRA reaches the grid through a link (so the grid waits for it), none by file name.
    assert prompt["grid"]["inputs"]["lora_names"] == ""
    return out, files


def row_loras(table: dict[str, Any]) -> list[Path | None]:
    """The LoRA file of each row (None: the base model or a checkpoint)."""
    firsts = table["cells"][::len(table["columns"])]
    assert len(firsts) == len(table["rows"])
    return [Path(c["lora_path"]).resolve() if c["lora_path"] else None for c in firsts]


def row_kinds(table: dict[str, Any]) -> list[tuple[str, Path | None, str]]:
    """(type, LoRA or checkpoint file, identifier removed) of each row."""
    firsts = table["cells"][::len(table["columns"])]
    return [(c["type"], Path(c["lora_path"] or c["checkpoint_path"]).resolve()
             if c["lora_path"] or c["checkpoint_path"] else None, c["identifier_removed"]) for c in firsts]


def check_scores(comfy_server, table: dict[str, Any], clip_dir: Path, identifier: str) -> None:
    """Every cell scored; CLIP-T recomputed from the saved cell and its prompt without the identifier;
    the row and column means are the means of the cells."""
    model = scores.ScoreModels.load(clip_dir, None)
    width = len(table["columns"])
    for record in table["cells"]:
        assert all(-1.0 <= record[k] <= 1.0 for k in ("clip_i", "clip_t", "dino")), record
    for record in table["cells"][::7]:  # a sample across rows and columns keeps it quick
        with Image.open(comfy_server.output_dir / record["image_file"]) as img:
            picture = img.convert("RGB")
        text = scores.remove_identifier(record["prompt"], identifier)
        assert record["clip_t"] == pytest.approx(model.clip_t([picture], [text]), abs=1e-4)
    for key in ("clip_i", "clip_t", "dino"):
        for r, means in enumerate(table["row_means"]):
            assert means[key] == pytest.approx(np.mean([x[key] for x in table["cells"][r * width:(r + 1) * width]]))
        for c, means in enumerate(table["column_means"]):
            assert means[key] == pytest.approx(np.mean([x[key] for x in table["cells"][c::width]]))


def row_cells(comfy_server, table: dict[str, Any], row: int) -> list[Any]:
    return [cell(comfy_server, table, row, column) for column in range(len(table["columns"]))]


@pytest.mark.slow
def test_prior_preservation_on_off(comfy_server, photo_folder: str) -> None:
    graph, files = trained_apart(comfy_server, load("api", "dreambooth_prior_preservation_on_off"), photo_folder,
                                 "prior_on_off")
    with_prior, without = files["train_prior"], files["train_plain"]
    assert graph["train_prior"]["inputs"]["prior"] == ["prior", 0] and "prior" not in graph["train_plain"]["inputs"]
    assert graph["train_prior"]["inputs"]["seed"] == graph["train_plain"]["inputs"]["seed"]
    result = comfy_server.run_prompt(graph, timeout=600).raise_for_status()
    with safe_open(str(with_prior), "pt") as f:
        assert f.metadata()["ss_prior_loss_weight"] == "1.0"
    with safe_open(str(without), "pt") as f:
        assert "ss_prior_loss_weight" not in f.metadata() or float(f.metadata()["ss_prior_loss_weight"]) == 0
    table = grid_table(comfy_server, result, "grid", graph)
    assert table["columns"][0] == "a photo of a dog" and len(table["columns"]) == 3
    assert row_loras(table) == [None, with_prior.resolve(), without.resolve()]
    # Same seed, same photos: only prior preservation tells the two LoRA rows apart.
    assert row_cells(comfy_server, table, 1) != row_cells(comfy_server, table, 2)


@pytest.mark.slow
def test_rank_sweep(comfy_server, photo_folder: str) -> None:
    graph, files = trained_apart(comfy_server, load("api", "dreambooth_rank_sweep"), photo_folder, "ranks")
    full = files.pop("train_full")
    trains = {node_id: graph[node_id]["inputs"] for node_id in files}
    assert [(t["rank"], t["learning_rate"]) for t in trains.values()] == [(4, 2e-3), (8, 2e-4), (16, 2e-5)]
    assert graph["full_opts"]["inputs"] == {"training_method": "full", "extract_lora_rank": 0}
    full_inputs = graph["train_full"]["inputs"]
    assert full_inputs["options"] == ["full_opts", 0] and graph["grid"]["inputs"]["checkpoint"] == ["train_full", 4]
    assert (full_inputs["learning_rate"], full_inputs["train_text_encoder"]) == (5e-6, False), "the paper's"
    assert len({t["seed"] for t in [*trains.values(), full_inputs]}) == 1
    assert graph["grid"]["inputs"]["rows_without_identifier"] is True
    # 6 steps at the paper's 5e-6 would leave the tiny model's pixels as they were.
    full_inputs["learning_rate"] = 1e-3
    # Scored as a user would: tiny CLIP and DINO folders picked on the grid (the photos are wired to it).
    root = comfy_server.models_dir / "dreambooth_scores"
    clip_dir, _ = tiny_clip_folder(root / "rank-sweep-clip"), tiny_dino_folder(root / "rank-sweep-dino")
    graph["grid"]["inputs"] |= {"clip_model": "rank-sweep-clip", "dino_model": "rank-sweep-dino"}
    result = comfy_server.run_prompt(graph, timeout=600).raise_for_status()
    table = grid_table(comfy_server, result, "grid", graph)
    assert len(table["rows"]) == 9 and len(table["columns"]) == 5
    ident = table["cells"][2 * len(table["columns"])]["identifier_removed"]  # the checkpoint's no-identifier row
    assert ident and all(ident in p for p in table["columns"])
    check_scores(comfy_server, table, clip_dir, ident)
    trained = [("checkpoint", full.resolve()), *(("lora", p.resolve()) for p in files.values())]
    assert row_kinds(table) == [("base", None, ""), *((kind, path, drop) for kind, path in trained
                                                      for drop in ("", ident))]
    with safe_open(str(full), "pt") as f:
        assert f.metadata()["dreambooth.training_method"] == "full"
    for node_id, path in files.items():
        rank = trains[node_id]["rank"]
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["ss_network_dim"] == str(rank)
            downs = [k for k in f.keys() if k.endswith(".lora_down.weight")]
            assert downs and {f.get_slice(k).get_shape()[0] for k in downs} == {rank}
    rows = [row_cells(comfy_server, table, r) for r in range(9)]
    assert rows[1] != rows[0], "the fine-tuned checkpoint renders differently from the base model"
    assert len({tuple(rows[r]) for r in (3, 5, 7)}) == 3, "the three LoRAs render differently"
