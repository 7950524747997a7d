"""Run the rank-sweep example workflow on the tiny models and keep its scored comparison grid for the README.

A real ComfyUI starts with the pack and the tiny random-weight models under the names the example
workflows use (``screenshot_workflow.prepare``), plus a tiny CLIP and a tiny DINO under
``models/dreambooth_scores/``. The API form of ``dreambooth_rank_sweep`` is read as it is now (every
train node, list and grid row it has), shortened the way the example-workflow tests shorten it (a few
training steps at 64 px, small cells, few sampling steps; every row and every prompt kept), the grid is
told to score with the tiny models, and the run's grid PNG is copied to ``--out``.

The models have random weights, so the cells are noise-like and the scores mean nothing: the picture
shows the grid's layout, its labels and where the score means go. A PNG over ``--max-kb`` is stored
with a 256-colour palette (noise barely compresses). About 2-3 minutes on two CPU cores.
Run with the test venv:

    .venv/bin/python scripts/grid_picture.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "example_workflows" / "api" / "dreambooth_rank_sweep.json"
DEFAULT_OUT = REPO / "docs" / "grid_rank_sweep.png"
CLIP_NAME, DINO_NAME = "tiny-clip", "tiny-dino"
SCORE_KEYS = ("clip_i", "clip_t", "dino")

logger = logging.getLogger("grid_picture")


def _module(name: str, path: Path) -> ModuleType:
    """A sibling script loaded from its path (scripts/ is not a package and stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shorten(prompt: dict[str, Any], cell_px: int, train_steps: int, sample_steps: int) -> dict[str, Any]:
    """The workflow made small by node type (not node id, so nodes added to the example later are covered).

    Names, ranks, seeds, rows and prompts stay as the example has them."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "DreamBoothDataset":
            inputs["resolution"] = 64
        elif kind == "DreamBoothPriorPreservation":
            inputs.update(num_class_images=2, class_generation_steps=2)
        elif kind == "DreamBoothTrain":
            inputs.update(steps=train_steps, checkpointing_steps=0, validation_steps=0, validation_prompts="")
            if isinstance(inputs.get("options"), list):
                options = out[inputs["options"][0]]
                if options["inputs"].get("training_method") == "full":
                    # The paper's 5e-6 over a few steps would leave the tiny model's pixels as they were,
                    # and the checkpoint rows would repeat the base row.
                    inputs["learning_rate"] = 1e-3
        elif kind == "DreamBoothOptionsAdvanced":
            inputs["save_lora_every_n_steps"] = 0
        elif kind == "DreamBoothCompareGrid":
            inputs.update(steps=sample_steps, width=cell_px, height=cell_px, sampler_name="euler",
                          scheduler="normal", clip_model=CLIP_NAME, dino_model=DINO_NAME)
    return out


def grid_node(prompt: dict[str, Any]) -> str:
    grids = [node_id for node_id, node in prompt.items() if node["class_type"] == "DreamBoothCompareGrid"]
    if len(grids) != 1:
        raise SystemExit(f"{WORKFLOW.name} should have one DreamBoothCompareGrid node, found {grids}")
    if not isinstance(prompt[grids[0]]["inputs"].get("reference"), list):
        raise SystemExit(f"the grid in {WORKFLOW.name} has no photos linked to `reference`: its cells cannot be scored")
    return grids[0]


def check_scored(table: dict[str, Any]) -> None:
    """Every cell and every row/column mean has all three scores, or the picture would not show them."""
    missing = [(c["row"], c["column"]) for c in table["cells"] if any(c.get(k) is None for k in SCORE_KEYS)]
    means = [*table.get("row_means", []), *table.get("column_means", [])]
    if missing or len(means) != len(table["rows"]) + len(table["columns"]) or any(
            m.get(k) is None for m in means for k in SCORE_KEYS):
        raise SystemExit(f"the grid is not fully scored: cells without scores {missing[:10]}, "
                         f"{len(means)} means for {len(table['rows'])} rows and {len(table['columns'])} columns")


def shrink(path: Path) -> None:
    """Store the grid with a 256-colour palette: the tiny models' noise-like cells barely compress as
    full-colour PNG, and the README picture only has to show the layout and the labels (black on
    white, which the palette keeps exact)."""
    from PIL import Image  # noqa: PLC0415  (from the test venv, like the server's libraries)

    before = path.stat().st_size
    with Image.open(path) as img:
        picture = img.convert("RGB")
    picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    logger.info("grid stored with a 256-colour palette: %d KB -> %d KB", before // 1024, path.stat().st_size // 1024)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to copy the grid PNG")
    parser.add_argument("--cell", type=int, default=96, choices=range(64, 129, 8), metavar="64..128",
                        help="cell size in px (a multiple of 8)")
    parser.add_argument("--train-steps", type=int, default=6, help="training steps of every train node")
    parser.add_argument("--sample-steps", type=int, default=3, help="sampling steps of every cell")
    parser.add_argument("--max-kb", type=int, default=400,
                        help="a grid PNG larger than this is stored with a 256-colour palette")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the run may take")
    args = parser.parse_args(argv)

    _module("dreambooth_scripts_support_loader", REPO / "scripts" / "support_loader.py").load_test_support()
    from dreambooth_test_support import comfyui, paths, tiny_models  # noqa: PLC0415

    shot = _module("dreambooth_scripts_screenshot_workflow", REPO / "scripts" / "screenshot_workflow.py")
    # Read now, not at import: the example may have gained nodes or rows since this script was written.
    prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    graph = shorten(prompt, args.cell, args.train_steps, args.sample_steps)
    grid_id = grid_node(graph)
    trains = sum(node["class_type"] == "DreamBoothTrain" for node in graph.values())
    logger.info("%s: %d nodes, %d train nodes, %d prompts", WORKFLOW.name, len(graph), trains,
                len([p for p in graph[grid_id]["inputs"]["prompts"].splitlines() if p.strip()]))

    root = comfyui.provision_comfyui()
    with tempfile.TemporaryDirectory(prefix="grid picture ") as tmp:
        server = comfyui.ComfyServer(root, Path(tmp) / "base")
        server.install_pack(REPO, paths.PACK_NAME)
        logger.info("preparing the tiny models and photos")
        shot.prepare(server, tiny_models, root)
        scores_dir = server.models_dir / "dreambooth_scores"
        tiny_models.tiny_clip_folder(scores_dir / CLIP_NAME)
        tiny_models.tiny_dino_folder(scores_dir / DINO_NAME)
        with server:
            logger.info("running the shortened rank sweep on %s", server.url)
            started = time.monotonic()
            result = server.run_prompt(graph, timeout=args.timeout)
            if result.status != "success":
                logger.error("%s", server.log_tail(4000))
            result.raise_for_status()
            seconds = time.monotonic() - started
            (grid_path,) = server.output_files(result, node_id=grid_id)
            table = json.loads(grid_path.with_suffix(".json").read_text(encoding="utf-8"))
            check_scored(table)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid_path, args.out)
            if args.out.stat().st_size > args.max_kb * 1024:
                shrink(args.out)
    logger.info("ran in %.0f s: %d rows x %d columns, every cell scored", seconds, len(table["rows"]),
                len(table["columns"]))
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
