"""The DreamBooth Score node through a real ComfyUI server, on tiny random CLIP / DINO folders.

Images go in through core LoadImage / ImageBatch and come out through core Preview as Text
(PreviewAny), whose text lands in /history; expected values are computed in this process with
``trainer/scores.py`` on the same PNGs.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comfyui_dreambooth_lora.trainer import scores
from dreambooth_test_support.comfyui import PromptRejected, PromptResult
from dreambooth_test_support.tiny_models import tiny_clip_folder, tiny_dino_folder
from PIL import Image

pytest.importorskip("transformers")

NODE = "DreamBoothScore"
CLIP, DINO = "tiny-clip", "tiny-dino"


@pytest.fixture(scope="module")
def setup(comfy_server: Any) -> dict[str, Any]:
    root = comfy_server.models_dir / "dreambooth_scores"
    clip = tiny_clip_folder(root / CLIP)
    dino = tiny_dino_folder(root / DINO)
    rng = np.random.default_rng(5)
    names, pil = [], []
    for i, size in enumerate(((48, 40), (36, 52))):
        name = f"score_{uuid.uuid4().hex[:6]}_{i}.png"
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        im.save(comfy_server.input_dir / name)
        names.append(name)
        pil.append(im)
    return {"clip": clip, "dino": dino, "names": names, "pil": pil}


def _prompt(setup: dict[str, Any], *, reference: int = 0, prompt: str = "", identifier: str = "",
            clip_model: str = CLIP, dino_model: str = DINO) -> dict[str, Any]:
    """images = [a, a] (a batch of the first PNG twice), reference = one PNG; four Preview as Text nodes."""
    a, b = setup["names"]
    graph: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": a}},
        "2": {"class_type": "LoadImage", "inputs": {"image": b}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["1", 0]}},
        "4": {"class_type": NODE, "inputs": {
            "images": ["3", 0], "reference": [str(reference + 1), 0], "prompt": prompt, "identifier": identifier,
            "clip_model": clip_model, "dino_model": dino_model}},
    }
    for slot in range(4):  # clip_i, clip_t, dino, report
        graph[f"1{slot}"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", slot]}}
    return graph


def _texts(result: PromptResult) -> tuple[float, float, float, str]:
    result.raise_for_status()
    text = [result.outputs[f"1{slot}"]["text"][0] for slot in range(4)]
    return float(text[0]), float(text[1]), float(text[2]), text[3]


def _error(result: PromptResult) -> str:
    assert result.status == "error", f"expected an error, got {result.status}: {result.outputs}"
    assert result.error is not None and result.error.get("node_id") == "4", result.error
    return str(result.error.get("exception_message", ""))


def test_identical_images_score_one_and_clip_t_drops_the_identifier(comfy_server: Any, setup: dict[str, Any]) -> None:
    spec = comfy_server.object_info(NODE)[NODE]
    assert spec["category"] == "DreamBooth/evaluate"
    for key, kind in (("clip_model", "clip"), ("dino_model", "dino")):
        opts = spec["input"]["required"][key][1]
        options = opts["options"]
        assert options[0] == "none" and {CLIP, DINO} <= set(options), options
        # The first folder named after its kind (other tests on this server add folders of their own).
        assert opts["default"] == next(o for o in options if kind in o.lower()), (opts["default"], options)
    assert spec["output_name"] == ["clip_i", "clip_t", "dino", "report"]
    missing = [name for name, entry in spec["input"]["required"].items() if not entry[1].get("tooltip")]
    assert not missing, f"inputs without tooltip: {missing}"

    prompts = "a photo of qzx dog\nQZX dog on the beach"
    clip_i, clip_t, dino, report = _texts(comfy_server.run_prompt(
        _prompt(setup, prompt=prompts, identifier="qzx"), timeout=120))
    assert clip_i == pytest.approx(1.0, abs=1e-4)
    assert dino == pytest.approx(1.0, abs=1e-4)

    a = setup["pil"][0]
    expected = scores.ScoreModels.load(setup["clip"], None).clip_t([a, a], ["a photo of dog", "dog on the beach"])
    assert clip_t == pytest.approx(expected, abs=1e-4) and abs(clip_t) > 1e-3
    lines = report.splitlines()
    row = lines[4].split()  # image, CLIP-I, CLIP-T, DINO, prompt
    assert row[0] == "1" and row[1] == row[3] == "1.0000" and " ".join(row[4:]) == "a photo of dog", report
    assert lines[5].endswith("dog on the beach") and "qzx" not in report.lower(), report
    assert lines[6].startswith(" mean  1.0000") and "not computed" not in report, report


def test_none_skips_and_errors_name_the_input(comfy_server: Any, setup: dict[str, Any]) -> None:
    # Another reference: DINO is no longer 1, so the node cannot be returning a constant.
    a, b = setup["pil"]
    clip_i, clip_t, dino, report = _texts(comfy_server.run_prompt(
        _prompt(setup, reference=1, prompt="a photo of dog", clip_model="none"), timeout=120))
    assert (clip_i, clip_t) == (0.0, 0.0)
    expected = scores.ScoreModels.load(None, setup["dino"]).dino([a, a], [b])
    assert dino == pytest.approx(expected, abs=1e-4) and abs(dino - 1.0) > 1e-3
    assert "CLIP-I and CLIP-T not computed: clip_model is 'none' (outputs 0.0)." in report, report

    message = _error(comfy_server.run_prompt(_prompt(setup, prompt="one\ntwo\nthree"), timeout=60))
    assert message.startswith("prompt has 3 lines for 2 generated images"), message

    broken = comfy_server.models_dir / "dreambooth_scores" / "broken-clip"
    broken.mkdir()
    try:
        message = _error(comfy_server.run_prompt(_prompt(setup, clip_model="broken-clip"), timeout=60))
        assert message.startswith("clip_model: CLIP score model folder") and "is missing config.json" in message
        assert "models/dreambooth_scores/" in message, message
        # A name that is no longer a folder: ComfyUI 0.3.75 does not check V3 combo values, so the node
        # says it; a ComfyUI that checks them refuses the prompt naming the input.
        shutil.rmtree(broken)
        for name in ("clip_model", "dino_model"):
            try:
                result = comfy_server.run_prompt(_prompt(setup, **{name: "broken-clip"}), timeout=60)
            except PromptRejected as exc:
                errors = exc.node_errors.get("4", {}).get("errors", [])
                assert any(name in str(e) for e in errors), exc.body
                continue
            message = _error(result)
            assert message.startswith(f"{name}: no folder 'broken-clip' in "), message
            assert "models/dreambooth_scores/broken-clip/" in message, message
    finally:
        shutil.rmtree(broken, ignore_errors=True)
    assert Path(setup["clip"]).is_dir()
