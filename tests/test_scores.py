"""trainer/scores.py: CLIP-I, CLIP-T and DINO on tiny random models built at test time."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_dreambooth_lora.trainer import scores
from dreambooth_test_support.tiny_models import tiny_clip_folder, tiny_dino_folder
from PIL import Image

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("score_models")
    return {"clip": tiny_clip_folder(root / "clip"), "dino": tiny_dino_folder(root / "dino")}


@pytest.fixture(scope="module")
def models(model_dirs: dict[str, Path]) -> scores.ScoreModels:
    return scores.ScoreModels.load(model_dirs["clip"], model_dirs["dino"], device="cpu", batch_size=2)


def _images(seed: int, n: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Odd sizes and modes: the model's own processor must resize / crop / convert them.
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, (40 + 7 * i, 48 + 3 * i, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        out.append(im.convert("RGBA") if i == 1 else im)
    return out


def _features(out: object) -> torch.Tensor:
    # transformers 4.x returns the projected tensor, 5.x an output whose pooler_output is projected.
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def _direct_clip(folder: Path) -> tuple[object, object, object]:
    """The reference computation, loaded the plain transformers way, apart from the module under test."""
    model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    proc = transformers.CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77)
    return model, proc, tok


@torch.no_grad()
def _clip_image_emb(folder: Path, images: list[Image.Image]) -> torch.Tensor:
    model, proc, _ = _direct_clip(folder)
    pixels = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return _features(model.get_image_features(pixel_values=pixels))


@torch.no_grad()
def _dino_emb(folder: Path, images: list[Image.Image]) -> torch.Tensor:
    model = transformers.ViTModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False).eval()
    proc = transformers.ViTImageProcessor.from_pretrained(str(folder), local_files_only=True)
    pixels = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return model(pixel_values=pixels).last_hidden_state[:, 0]


def _mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    vals = [torch.nn.functional.cosine_similarity(x, y, dim=0).item() for x in a for y in b]
    return sum(vals) / len(vals)


def test_identical_images_score_one(models: scores.ScoreModels) -> None:
    ims = _images(1, 3)
    assert models.clip_i(ims, ims) != pytest.approx(1.0, abs=1e-3)  # different images differ...
    for im in ims:  # ...and each image against itself is exactly similar
        assert models.clip_i([im], [im]) == pytest.approx(1.0, abs=1e-5)
        assert models.dino([im], [im]) == pytest.approx(1.0, abs=1e-5)


def test_clip_i_and_dino_equal_the_direct_computation(models: scores.ScoreModels,
                                                      model_dirs: dict[str, Path]) -> None:
    gen, ref = _images(2, 3), _images(3, 4)
    want_clip = _mean_pairwise_cosine(_clip_image_emb(model_dirs["clip"], gen), _clip_image_emb(model_dirs["clip"], ref))
    want_dino = _mean_pairwise_cosine(_dino_emb(model_dirs["dino"], gen), _dino_emb(model_dirs["dino"], ref))
    assert models.clip_i(gen, ref) == pytest.approx(want_clip, abs=1e-5)
    assert models.dino(gen, ref) == pytest.approx(want_dino, abs=1e-5)
    # Embeddings match the model's own get_image_features, batching (batch_size=2) included.
    assert torch.allclose(models.clip_model.embed_images(gen), _clip_image_emb(model_dirs["clip"], gen), atol=1e-5)
    assert models.clip_i(gen, ref) != pytest.approx(models.dino(gen, ref), abs=1e-4)


def test_clip_t_equals_the_direct_text_image_cosine(models: scores.ScoreModels, model_dirs: dict[str, Path]) -> None:
    gen = _images(4, 3)
    prompts = [scores.remove_identifier(p, "qzx") for p in
               ["a photo of qzx dog", "a qzx dog on the beach", "a qzx dog wearing a red hat, in the snow"]]
    model, proc, tok = _direct_clip(model_dirs["clip"])
    with torch.no_grad():
        img = _clip_image_emb(model_dirs["clip"], gen)
        t = tok(prompts, padding=True, return_tensors="pt")
        txt = _features(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
    each = [torch.nn.functional.cosine_similarity(img[i], txt[i], dim=0).item() for i in range(3)]
    assert models.clip_t(gen, prompts) == pytest.approx(sum(each) / 3, abs=1e-5)
    cells = models.score_cells(gen, prompts=prompts)
    assert [c.clip_t for c in cells] == pytest.approx(each, abs=1e-5)
    assert all(c.clip_i is None and c.dino is None for c in cells)  # no references given
    with pytest.raises(ValueError, match="one prompt per generated image"):
        models.clip_t(gen, prompts[:2])


def test_score_cells_average_to_the_totals(models: scores.ScoreModels) -> None:
    gen, ref = _images(5, 4), _images(6, 2)
    prompts = ["a photo of dog"] * 4
    cells = models.score_cells(gen, ref, prompts)
    assert len(cells) == 4
    assert set(cells[0].as_dict()) == {"clip_i", "clip_t", "dino"}
    assert np.mean([c.clip_i for c in cells]) == pytest.approx(models.clip_i(gen, ref), abs=1e-5)
    assert np.mean([c.dino for c in cells]) == pytest.approx(models.dino(gen, ref), abs=1e-5)
    assert np.mean([c.clip_t for c in cells]) == pytest.approx(models.clip_t(gen, prompts), abs=1e-5)
    assert len({round(c.dino, 6) for c in cells}) > 1  # per image, not one value copied


@pytest.mark.parametrize(("prompt", "want"), [
    ("a photo of qzx dog", "a photo of dog"),
    ("qzx dog", "dog"),
    ("a QZX dog, on a beach", "a dog, on a beach"),
    ("a photo of qzx, a dog", "a photo of, a dog"),
    ("a qzxy dog near qzx", "a qzxy dog near"),
    ("a dog", "a dog"),
])
def test_remove_identifier(prompt: str, want: str) -> None:
    assert scores.remove_identifier(prompt, "qzx") == want


def test_remove_identifier_needs_an_identifier() -> None:
    with pytest.raises(ValueError, match="identifier"):
        scores.remove_identifier("a photo of dog", " ")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _expect_error(load: object, folder: Path, missing: str, upstream: str) -> None:
    with pytest.raises(scores.ScoreModelError) as info:
        load(folder)  # type: ignore[operator]
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for part in (str(folder), missing, "models/dreambooth_scores/", upstream):
        assert part in msg, (part, msg)


def test_missing_or_incomplete_folders_are_clear_errors(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    _expect_error(scores.ClipScorer.load, tmp_path / "nope", "does not exist", "openai/clip-vit-base-patch32")
    _expect_error(scores.DinoScorer.load, tmp_path / "nope", "does not exist", "facebook/dino-vits16")

    clip = _copy(model_dirs["clip"], tmp_path)
    (clip / "vocab.json").unlink()
    _expect_error(scores.ClipScorer.load, clip, "tokenizer", "openai/clip-vit-large-patch14")
    (clip / "preprocessor_config.json").unlink()
    _expect_error(scores.ClipScorer.load, clip, "preprocessor_config.json", "openai/clip-vit-base-patch32")

    dino = _copy(model_dirs["dino"], tmp_path)
    (dino / "preprocessor_config.json").unlink()
    _expect_error(scores.DinoScorer.load, dino, "preprocessor_config.json", "facebook/dino-vits16")
    (dino / "model.safetensors").unlink()
    _expect_error(scores.DinoScorer.load, dino, "model.safetensors", "facebook/dino-vits16")
    (dino / "config.json").unlink()
    _expect_error(scores.DinoScorer.load, dino, "config.json", "facebook/dino-vits16")


def test_wrong_model_kind_and_missing_model_are_errors(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(scores.ScoreModelError, match="facebook/dino-vits16"):
        scores.DinoScorer.load(model_dirs["clip"])
    with pytest.raises(scores.ScoreModelError, match="no score model folder"):
        scores.ScoreModels.load(None, None)
    only_dino = scores.ScoreModels.load(None, model_dirs["dino"])
    with pytest.raises(scores.ScoreModelError, match="CLIP-I needs a CLIP model"):
        only_dino.clip_i(_images(7, 1), _images(8, 1))
    cells = only_dino.score_cells(_images(7, 2), _images(8, 1), ["a dog", "a cat"])
    assert all(c.clip_i is None and c.clip_t is None and c.dino is not None for c in cells)


def test_single_weights_file_beside_its_config(models: scores.ScoreModels, model_dirs: dict[str, Path],
                                               tmp_path: Path) -> None:
    clip = _copy(model_dirs["clip"], tmp_path)
    (clip / "model.safetensors").rename(clip / "clip-vit-tiny.safetensors")
    gen, ref = _images(9, 2), _images(10, 2)
    assert scores.ScoreModels.load(clip, None).clip_i(gen, ref) == pytest.approx(models.clip_i(gen, ref), abs=1e-6)
    # Two candidate files: which one is the model is ambiguous, so it is refused.
    shutil.copyfile(clip / "clip-vit-tiny.safetensors", clip / "other.safetensors")
    _expect_error(scores.ClipScorer.load, clip, "no model.safetensors", "openai/clip-vit-base-patch32")
