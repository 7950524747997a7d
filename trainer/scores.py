"""The DreamBooth paper's subject and prompt fidelity scores: CLIP-I, CLIP-T and DINO.

ComfyUI-free. Each score is a mean cosine similarity between embeddings:

- CLIP-I: generated images vs the real subject photos, in CLIP's image-embedding space.
- CLIP-T: each generated image vs its own prompt *without* the identifier (``remove_identifier``),
  in CLIP's shared image/text space (both projection heads).
- DINO: generated images vs the real subject photos, as the last layer's CLS token of a
  self-supervised ViT-S/16 (facebook/dino-vits16). The paper prefers it to CLIP-I because it is not
  trained to ignore the differences between two subjects of one class.

CLIP-I and DINO average over every (generated, reference) pair, as the paper does; with the same
references for every generated image this equals the mean of the per-image values that
``score_cells`` returns, so a grid can average those per row or column and agree with the total.

Models are read offline, safetensors only, from folders the user downloaded in transformers format:
``config.json``, ``model.safetensors`` (or one other ``*.safetensors`` file, or a sharded
``model.safetensors.index.json``), ``preprocessor_config.json``, and for CLIP the tokenizer
(``tokenizer.json``, or ``vocab.json`` + ``merges.txt``). Images are preprocessed by each model's own
image processor. transformers is imported on first use, not at import time.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Where the node layer looks for score models, relative to ComfyUI's models folder.
SCORES_MODELS_DIR = "models/dreambooth_scores"
CLIP_UPSTREAM = "openai/clip-vit-base-patch32 (or openai/clip-vit-large-patch14)"
DINO_UPSTREAM = "facebook/dino-vits16"
# Enough to keep a 224 px ViT-L batch well inside a consumer GPU's memory.
DEFAULT_BATCH_SIZE = 16


class ScoreModelError(ValueError):
    """A score model folder that is missing, incomplete or of the wrong kind; the message says the fix."""


def remove_identifier(prompt: str, identifier: str) -> str:
    """``prompt`` without the whole-word ``identifier`` (any case), spaces tidied.

    "a photo of qzx dog" -> "a photo of dog". Words that merely contain the identifier stay.
    """
    ident = identifier.strip()
    if not ident:
        raise ValueError("identifier is empty: give the rare word the subject was trained with, e.g. 'sks'")
    text = re.sub(rf"(?<!\w){re.escape(ident)}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text).strip()
    # "of qzx, dog" would otherwise keep the space the identifier left before the comma.
    return re.sub(r"\s+([,.;:!?)\]])", r"\1", text)


# --------------------------------------------------------------------------- model folders


def _missing_message(kind: str, folder: Path, problem: str, upstream: str, name: str) -> str:
    return (
        f"{kind} score model folder {folder} {problem}. Download {upstream} in "
        f"transformers format (config.json, model.safetensors, preprocessor_config.json"
        f"{', tokenizer.json or vocab.json + merges.txt' if kind == 'CLIP' else ''}) and put its files in "
        f"ComfyUI's {SCORES_MODELS_DIR}/<name>/ folder (e.g. {SCORES_MODELS_DIR}/{name}/)."
    )


_NO_WEIGHTS = Path("<no weights>")


def _weights_file(folder: Path) -> Path | None:
    """The single weights file to load by hand, None where transformers reads the folder itself, or _NO_WEIGHTS."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return None
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(files) == 1:
        return files[0]
    return _NO_WEIGHTS


def _check_folder(kind: str, folder: Path | str, model_types: tuple[str, ...], upstream: str,
                  name: str, tokenizer: bool) -> tuple[Path, dict[str, Any]]:
    folder = Path(folder)

    def fail(problem: str) -> ScoreModelError:
        return ScoreModelError(_missing_message(kind, folder, problem, upstream, name))

    if not folder.is_dir():
        raise fail("does not exist")
    if not (folder / "config.json").is_file():
        raise fail("is missing config.json")
    if _weights_file(folder) is _NO_WEIGHTS:
        many = len(list(folder.glob("*.safetensors")))
        raise fail("is missing model.safetensors" if many == 0 else
                   f"has {many} .safetensors files and no model.safetensors: rename the model's own file to "
                   "model.safetensors")
    if not (folder / "preprocessor_config.json").is_file():
        raise fail("is missing preprocessor_config.json")
    if tokenizer and not ((folder / "tokenizer.json").is_file()
                          or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise fail("is missing the tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScoreModelError(f"{kind} score model folder {folder}: config.json is unreadable ({exc}); "
                              f"download it again from {upstream}.") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in model_types:
        raise ScoreModelError(
            f"{kind} score model folder {folder} holds a {model_type!r} model, not {' or '.join(model_types)}: "
            f"put {upstream} there ({SCORES_MODELS_DIR}/{name}/)."
        )
    return folder, config


def _load_model(cls: Any, folder: Path, kind: str, **kwargs: Any) -> Any:
    weights = _weights_file(folder)
    try:
        if weights is None:
            # The dtype argument changed name between transformers 4 and 5: cast after loading instead.
            model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, **kwargs)
        else:
            # One file under another name (e.g. clip-vit-large-patch14.safetensors beside its config).
            from safetensors.torch import load_file

            config = cls.config_class.from_pretrained(str(folder), local_files_only=True)
            model = cls(config, **kwargs)
            state = load_file(str(weights))
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing:
                raise ScoreModelError(
                    f"{kind} score model file {weights} lacks {len(missing)} weights the config needs "
                    f"(first: {missing[:3]}): it is not the model config.json describes; download both again."
                )
            if unexpected:
                logger.info("%s: ignored %d extra weights (first: %s)", weights, len(unexpected), unexpected[:3])
    except ScoreModelError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise ScoreModelError(f"{kind} score model folder {folder} could not be loaded: {exc}") from exc
    return model.to(dtype=torch.float32).eval()


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def _rgb(images: Sequence[Any]) -> list[Any]:
    if len(images) == 0:
        raise ValueError("no images given: scoring needs at least one generated and one reference image")
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def _embed_in_batches(images: Sequence[Any], processor: Any, batch_size: int, device: torch.device,
                      embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`embed(pixel_values)` over the images, `batch_size` at a time, as one (N, D) fp32 CPU tensor."""
    rgb = _rgb(images)
    out = []
    for i in range(0, len(rgb), batch_size):
        pixels = processor(images=rgb[i:i + batch_size], return_tensors="pt")["pixel_values"]
        out.append(embed(pixels.to(device, torch.float32)).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- the two embedders


class ClipScorer:
    """A CLIP model (both towers) with its image processor and tokenizer, for CLIP-I and CLIP-T."""

    def __init__(self, model: Any, processor: Any, tokenizer: Any, folder: Path, device: torch.device,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.folder, self.device, self.batch_size = folder, device, batch_size

    @classmethod
    def load(cls, folder: Path | str, device: torch.device | str = "cpu",
             batch_size: int = DEFAULT_BATCH_SIZE) -> ClipScorer:
        path, config = _check_folder("CLIP", folder, ("clip",), CLIP_UPSTREAM, "clip-vit-base-patch32",
                                     tokenizer=True)
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        device = torch.device(device)
        model = _load_model(CLIPModel, path, "CLIP").to(device)
        try:
            processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
            # Folders without tokenizer_config.json report a huge model_max_length; CLIP reads 77.
            max_len = int((config.get("text_config") or {}).get("max_position_embeddings", 77))
            tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True, model_max_length=max_len)
        except (OSError, ValueError) as exc:
            raise ScoreModelError(f"CLIP score model folder {path}: processor or tokenizer files are unreadable "
                                  f"({exc}); download them again from {CLIP_UPSTREAM}.") from exc
        return cls(model, processor, tokenizer, path, device, batch_size)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Projected CLIP image embeddings (N, D), fp32 on the CPU, not normalised."""
        # vision_model + visual_projection is get_image_features in every transformers version
        # (5.x's get_image_features returns an output object, 4.x's a tensor).
        return _embed_in_batches(images, self.processor, self.batch_size, self.device, lambda pixels: (
            self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected CLIP text embeddings (N, D), fp32 on the CPU, not normalised; long prompts are cut at 77 tokens."""
        if len(texts) == 0:
            raise ValueError("no prompts given: CLIP-T needs one prompt per generated image")
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 return_tensors="pt")
            pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)


class DinoScorer:
    """A self-supervised ViT (facebook/dino-vits16) whose last-layer CLS token is the DINO embedding."""

    def __init__(self, model: Any, processor: Any, folder: Path, device: torch.device,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.model, self.processor = model, processor
        self.folder, self.device, self.batch_size = folder, device, batch_size

    @classmethod
    def load(cls, folder: Path | str, device: torch.device | str = "cpu",
             batch_size: int = DEFAULT_BATCH_SIZE) -> DinoScorer:
        path, _ = _check_folder("DINO", folder, ("vit",), DINO_UPSTREAM, "dino-vits16", tokenizer=False)
        from transformers import ViTImageProcessor, ViTModel

        device = torch.device(device)
        # dino-vits16 ships no pooler: without this transformers would add a random one and warn.
        model = _load_model(ViTModel, path, "DINO", add_pooling_layer=False).to(device)
        try:
            processor = ViTImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ScoreModelError(f"DINO score model folder {path}: preprocessor_config.json is unreadable "
                                  f"({exc}); download it again from {DINO_UPSTREAM}.") from exc
        return cls(model, processor, path, device, batch_size)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """CLS tokens of the last layer (after its layer norm, as DINO's own code returns them), (N, D) fp32 CPU."""
        return _embed_in_batches(images, self.processor, self.batch_size, self.device,
                                 lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])


# --------------------------------------------------------------------------- the scores


@dataclass(frozen=True)
class CellScores:
    """The scores of one generated image; a score whose model was not loaded is None."""

    clip_i: float | None
    clip_t: float | None
    dino: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"clip_i": self.clip_i, "clip_t": self.clip_t, "dino": self.dino}


@dataclass
class ScoreModels:
    """The loaded score models; either may be absent, and the scores it needs then say so."""

    clip_model: ClipScorer | None = None
    dino_model: DinoScorer | None = None

    @classmethod
    def load(cls, clip_dir: Path | str | None, dino_dir: Path | str | None,
             device: torch.device | str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE) -> ScoreModels:
        if clip_dir is None and dino_dir is None:
            raise ScoreModelError(
                f"no score model folder given: put {CLIP_UPSTREAM} and/or {DINO_UPSTREAM} in "
                f"{SCORES_MODELS_DIR}/<name>/ and choose them."
            )
        return cls(
            clip_model=None if clip_dir is None else ClipScorer.load(clip_dir, device, batch_size),
            dino_model=None if dino_dir is None else DinoScorer.load(dino_dir, device, batch_size),
        )

    def _need_clip(self, score: str) -> ClipScorer:
        if self.clip_model is None:
            raise ScoreModelError(f"{score} needs a CLIP model: download {CLIP_UPSTREAM} into "
                                  f"{SCORES_MODELS_DIR}/<name>/ and load it.")
        return self.clip_model

    def _need_dino(self) -> DinoScorer:
        if self.dino_model is None:
            raise ScoreModelError(f"DINO needs a DINO model: download {DINO_UPSTREAM} into "
                                  f"{SCORES_MODELS_DIR}/<name>/ and load it.")
        return self.dino_model

    def clip_i(self, generated: Sequence[Any], reference: Sequence[Any]) -> float:
        """Mean CLIP image-embedding cosine over all generated x reference pairs."""
        clip = self._need_clip("CLIP-I")
        return float(_cosine_matrix(clip.embed_images(generated), clip.embed_images(reference)).mean())

    def clip_t(self, generated: Sequence[Any], prompts: Sequence[str]) -> float:
        """Mean CLIP cosine between each generated image and its own prompt (pass prompts without the identifier)."""
        return float(self._clip_t_each(generated, prompts).mean())

    def dino(self, generated: Sequence[Any], reference: Sequence[Any]) -> float:
        """Mean DINO CLS-token cosine over all generated x reference pairs."""
        dino = self._need_dino()
        return float(_cosine_matrix(dino.embed_images(generated), dino.embed_images(reference)).mean())

    def _clip_t_each(self, generated: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        clip = self._need_clip("CLIP-T")
        if len(prompts) != len(generated):
            raise ValueError(f"CLIP-T needs one prompt per generated image: got {len(prompts)} prompts "
                             f"for {len(generated)} images")
        img = torch.nn.functional.normalize(clip.embed_images(generated), dim=-1)
        txt = torch.nn.functional.normalize(clip.embed_texts(prompts), dim=-1)
        return (img * txt).sum(-1)

    def score_cells(self, generated: Sequence[Any], reference: Sequence[Any] | None = None,
                    prompts: Sequence[str] | None = None) -> list[CellScores]:
        """Per generated image: its mean CLIP-I and DINO over the references, and its CLIP-T.

        A score is computed where its model is loaded and its input given (references for CLIP-I and
        DINO, prompts for CLIP-T), else None. The mean of a column of these equals ``clip_i`` /
        ``dino`` / ``clip_t`` over the same images. Each image set is embedded once.
        """
        n = len(generated)
        none = [None] * n
        clip_i: list[float | None] = list(none)
        clip_t: list[float | None] = list(none)
        dino: list[float | None] = list(none)
        has_ref = reference is not None and len(reference) > 0
        has_prompts = prompts is not None and len(prompts) > 0
        if self.clip_model is not None and (has_ref or has_prompts):
            gen = self.clip_model.embed_images(generated)
            if has_ref:
                clip_i = _cosine_matrix(gen, self.clip_model.embed_images(reference)).mean(dim=1).tolist()
            if has_prompts:
                if len(prompts) != n:
                    raise ValueError(f"CLIP-T needs one prompt per generated image: got {len(prompts)} prompts "
                                     f"for {n} images")
                txt = self.clip_model.embed_texts(prompts)
                clip_t = (torch.nn.functional.normalize(gen, dim=-1)
                          * torch.nn.functional.normalize(txt, dim=-1)).sum(-1).tolist()
        if self.dino_model is not None and has_ref:
            dino = _cosine_matrix(self.dino_model.embed_images(generated),
                                  self.dino_model.embed_images(reference)).mean(dim=1).tolist()
        return [CellScores(clip_i=a, clip_t=b, dino=c) for a, b, c in zip(clip_i, clip_t, dino, strict=True)]
