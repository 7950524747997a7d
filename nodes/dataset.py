"""Nodes that say what to train on: the subject photos and, optionally, prior preservation.

The trainer runs in another process and reads files, so every source ends up as a folder: a
subfolder of ComfyUI's input directory, an IMAGE batch written as PNGs into a content-named temp
folder, or (only where the server owner allows it) any folder on disk. A workflow downloaded from
the internet must not be able to read the machine's disk, hence the opt-in for paths outside input/.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image
from typing_extensions import override

from ..trainer import data
from ..trainer.config import TrainConfig
from .options import config_input, number_range
from .types import Dataset, InstanceData, Prior, PriorPreservation

logger = logging.getLogger(__name__)

NONE_FOLDER = "(none: use images or folder_path)"
NONE_CLASS_FOLDER = "(none: generate class images)"
ALLOW_ANY_PATH_ENV = "DREAMBOOTH_ALLOW_ANY_PATH"
DEFAULT_INSTANCE_PROMPT = "a photo of fac dog"  # what DreamBoothIdentifier proposes first for 'dog'
DEFAULT_CLASS_PROMPT = "a photo of dog"
_IMAGES_SUBDIR = "dreambooth_images"
_DONE_MARKER = ".complete"  # hidden, so the image scanner skips it


def _help(name: str) -> str:
    field = TrainConfig.__dataclass_fields__[name]
    return str(field.metadata.get("help", ""))


def _default(name: str) -> Any:
    return TrainConfig.__dataclass_fields__[name].default


# --------------------------------------------------------------------------------------------- paths


def input_root() -> Path:
    return Path(folder_paths.get_input_directory()).resolve()


def any_path_allowed() -> bool:
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip() == "1"


def list_input_folders() -> list[str]:
    """Subfolders of the input directory and their subfolders ("people/alice"), sorted."""
    root = input_root()
    found: list[str] = []
    try:
        tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    for top in tops:
        found.append(top.name)
        try:
            found += [f"{top.name}/{p.name}" for p in sorted(top.iterdir())
                      if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            continue
    return found


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_input_folder(name: str, *, what: str = "folder") -> Path:
    """The real path of input/<name>; refuses absolute paths, '..' and symlinks that lead out of input/."""
    root = input_root()
    rel = Path(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(
            f"{what} {name!r} is not a subfolder of ComfyUI's input folder {root}; pick one of the listed "
            "folders (put your photos into a subfolder of input/ first)."
        )
    path = (root / rel).resolve()
    if not _inside(path, root):
        raise ValueError(
            f"{what} {name!r} leads out of ComfyUI's input folder {root} (a symlink to {path}); "
            f"only folders inside input/ can be read unless the server sets {ALLOW_ANY_PATH_ENV}=1."
        )
    if not path.is_dir():
        raise ValueError(
            f"{what} {name!r} does not exist in ComfyUI's input folder {root}; create it, put your photos "
            "in it and refresh the page, or pick another folder."
        )
    return path


def resolve_folder_path(text: str) -> tuple[Path, Path | None]:
    """(folder, root its files must stay in or None) for the free-text ``folder_path`` input."""
    root = input_root()
    raw = Path(os.path.expanduser(text.strip()))
    path = (raw if raw.is_absolute() else root / raw).resolve()
    if _inside(path, root):
        return path, root
    if not any_path_allowed():
        raise ValueError(
            f"folder_path {text!r} is outside ComfyUI's input folder {root}, and reading other folders is "
            "switched off: a workflow from the internet must not be able to read your disk. Put the photos "
            "into a subfolder of input/ and pick it in 'folder', or, if only you use this server, start "
            f"ComfyUI with the environment variable {ALLOW_ANY_PATH_ENV}=1."
        )
    return path, None


def outside_problems(records: list[data.ImageRecord], root: Path | None) -> list[data.DataError]:
    """A file symlinked from elsewhere must not smuggle a private photo into the LoRA or the preview."""
    if root is None:
        return []
    problems = []
    for record in records:
        real = Path(record.path).resolve()
        if not _inside(real, root):
            problems.append(data.DataError(
                f"{record.path} is a link to {real}, outside ComfyUI's input folder {root}; copy the file "
                f"itself into the folder (or let the server set {ALLOW_ANY_PATH_ENV}=1).",
                Path(record.path),
            ))
    return problems


def check_records_inside(records: list[data.ImageRecord], root: Path | None) -> None:
    problems = outside_problems(records, root)
    if problems:
        raise problems[0]


def scan_checked(folder: Path, root: Path | None, role: str = "instance") -> data.FolderScan:
    """The folder's scan with links that lead out of ``root`` moved to its problems."""
    found = data.scan_folder(folder, role=role)
    outside = outside_problems(found.records, root)
    if outside:
        bad = {p.path for p in outside}
        found.records = [r for r in found.records if Path(r.path) not in bad]
        found.problems += outside
    return found


# --------------------------------------------------------------------------------------------- images


def images_to_folder(images: torch.Tensor) -> Path:
    """Write an IMAGE batch as PNGs into temp/dreambooth_images/<content hash>/ and return that folder.

    The name comes from the pixels, so the same images always give the same folder, and a restarted
    server (which empties temp/) rewrites it as it was. (Resume and reuse compare the files' contents,
    not the folder, so this is about not piling up copies.)
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be an IMAGE batch (B, H, W, C), got shape {tuple(images.shape)}")
    pixels = (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    root = Path(folder_paths.get_temp_directory()) / _IMAGES_SUBDIR
    final = root / digest.hexdigest()[:20]
    if (final / _DONE_MARKER).is_file():
        return final.resolve()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=root))
    try:
        for i, frame in enumerate(pixels):
            mode = {1: "L", 3: "RGB", 4: "RGBA"}[frame.shape[-1]]
            Image.fromarray(frame[..., 0] if mode == "L" else frame, mode=mode).save(tmp / f"image_{i:04d}.png")
        (tmp / _DONE_MARKER).write_text("", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final.resolve()


def to_image_batch(prepared: list[data.PreparedImage]) -> torch.Tensor:
    """The crops as one ComfyUI IMAGE (B, H, W, 3) in [0, 1]: bucket crops of other sizes are centred on the
    largest one's canvas, neutral grey around them (an IMAGE batch has one size)."""
    return ((data.preview_canvas(prepared).permute(0, 2, 3, 1) + 1.0) / 2.0).clamp(0, 1)


# --------------------------------------------------------------------------------------------- sources


def _dataset_source(folder: str, folder_path: str, has_images: bool) -> tuple[str, str]:
    """Which of the three sources is used: ("folder" | "folder_path" | "images", its value)."""
    chosen = [name for name, used in (("folder", folder != NONE_FOLDER), ("folder_path", bool(folder_path.strip())),
                                      ("images", has_images)) if used]
    if len(chosen) > 1:
        raise ValueError(
            f"the training images come from {' and '.join(chosen)}; use exactly one: set 'folder' to "
            f"{NONE_FOLDER!r} to use images or folder_path, clear folder_path, or disconnect images."
        )
    if not chosen:
        raise ValueError(
            "no training images: pick a subfolder of ComfyUI's input folder in 'folder', connect an IMAGE "
            "batch to 'images', or type a folder in 'folder_path'."
        )
    return chosen[0], folder if chosen[0] == "folder" else folder_path


def _resolve_source(kind: str, value: str) -> tuple[Path, Path | None]:
    if kind == "folder":
        return resolve_input_folder(value), input_root()
    return resolve_folder_path(value)


def scan(folder: Path, root: Path | None, role: str = "instance") -> list[data.ImageRecord]:
    records = data.scan_image_folder(folder, role=role)
    check_records_inside(records, root)
    return records


class DreamBoothDataset(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothDataset",
            display_name="DreamBooth Dataset",
            category="DreamBooth/dataset",
            description=(
                "The subject photos to train on (3-20 is typical), with the prompt that names the subject. "
                "Checks every image before training and shows the exact square crops that will be trained."
            ),
            inputs=[
                io.Combo.Input(
                    "folder",
                    options=[NONE_FOLDER, *list_input_folders()],
                    default=NONE_FOLDER,
                    tooltip=(
                        "A subfolder of ComfyUI's input folder holding the photos (refresh the page after "
                        "creating one). Optional '<name>.txt' captions beside the images; kohya-style "
                        f"'N_name' subfolders repeat their images N times. Keep {NONE_FOLDER!r} to use the "
                        "images input or folder_path instead."
                    ),
                ),
                io.String.Input(
                    "instance_prompt",
                    default=DEFAULT_INSTANCE_PROMPT,
                    tooltip=_help("instance_prompt") + " The DreamBooth Identifier node builds one.",
                ),
                io.Boolean.Input("use_captions", default=_default("use_captions"), tooltip=_help("use_captions")),
                io.Int.Input(
                    "resolution",
                    default=_default("resolution"),
                    min=64,
                    max=2048,
                    step=8,
                    tooltip=_help("resolution") + " 512 for SD1.x, 768 for SD2.x 768-v models; a multiple of 8.",
                ),
                io.Combo.Input(
                    "crop",
                    options=list(data.CROP_MODES),
                    default=_default("crop"),
                    tooltip=(
                        "How the square (or bucket) is cut from each photo: 'center'; 'random' (a new crop each "
                        "step; slower, as the latents cannot be cached); 'face' (centred on the largest detected "
                        "face, with the whole face and its context; photos without a face are cut at the center, "
                        "with a warning naming them)."
                    ),
                ),
                io.Image.Input(
                    "images",
                    optional=True,
                    tooltip=(
                        "Photos as an IMAGE batch instead of a folder (e.g. from Load Image); written as PNG "
                        "files into ComfyUI's temp folder for the trainer. Set folder to "
                        f"{NONE_FOLDER!r} when using this."
                    ),
                ),
                io.String.Input(
                    "folder_path",
                    default="",
                    optional=True,
                    tooltip=(
                        "A folder given as a path instead of picking one in 'folder'. Paths outside ComfyUI's "
                        "input folder are refused unless the server was started with the environment "
                        f"variable {ALLOW_ANY_PATH_ENV}=1 (so a shared workflow cannot read your disk)."
                    ),
                ),
                # Last: saved workflows keep widget values by position.
                io.Boolean.Input("aspect_buckets", default=_default("aspect_buckets"), optional=True,
                                 tooltip=_help("aspect_buckets")),
            ],
            outputs=[
                Dataset.Output("dataset", display_name="dataset", tooltip="The checked dataset, for the train node."),
                io.Image.Output(
                    "preview",
                    display_name="preview",
                    tooltip=(
                        "Exactly the crops that will be trained, at their training size (with aspect_buckets "
                        "each on a grey canvas of the largest bucket's size; the log lists each photo's bucket "
                        "and crop box). With crop 'random' this shows the center crop; training cuts a "
                        "different one each step."
                    ),
                ),
            ],
        )

    @classmethod
    @override
    def validate_inputs(cls, folder: str = NONE_FOLDER, folder_path: str = "") -> bool | str:
        # Combo values of V3 nodes are not checked by ComfyUI 0.3.75 itself; and a refused path should
        # fail before anything is queued.
        try:
            if folder != NONE_FOLDER:
                resolve_input_folder(folder)
            if folder_path.strip():
                resolve_folder_path(folder_path)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    @override
    def fingerprint_inputs(cls, folder: str = NONE_FOLDER, folder_path: str = "", **kwargs: Any) -> Any:
        # Same inputs but edited photos or captions must give a new dataset (and a new training).
        if folder == NONE_FOLDER and not folder_path.strip():
            return NONE_FOLDER  # images input: its upstream node's cache key covers it
        kind, value = ("folder", folder) if folder != NONE_FOLDER else ("folder_path", folder_path)
        try:
            path, root = _resolve_source(kind, value)
            return data.dataset_fingerprint(scan(path, root))
        except ValueError as exc:
            return f"error: {exc}"  # execute() reports it; fixing the folder changes this value

    @classmethod
    @override
    def execute(cls, folder: str, instance_prompt: str, use_captions: bool, resolution: int, crop: str,
                images: torch.Tensor | None = None, folder_path: str = "",
                aspect_buckets: bool = _default("aspect_buckets")) -> io.NodeOutput:
        prompt = " ".join(instance_prompt.split())
        if not prompt:
            raise ValueError(
                "instance_prompt is empty: give a prompt that names the subject with a rare identifier, e.g. "
                f"{DEFAULT_INSTANCE_PROMPT!r} (the DreamBooth Identifier node proposes one)."
            )
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {resolution}")
        kind, value = _dataset_source(folder, folder_path or "", images is not None)
        if kind == "images":
            assert images is not None
            path, root = images_to_folder(images), None
        else:
            path, root = _resolve_source(kind, value)
        found = scan_checked(path, root)
        skipped = found.skipped_message()
        if skipped:
            logger.warning("%s", skipped)  # the trainer shows it on the train node as well
        # Every unusable photo in one error (not one per queued prompt).
        prepared = data.read_images(found, resolution, crop="face" if crop == "face" else "center", seed=0,
                                    buckets=aspect_buckets)
        records = found.records
        dataset = InstanceData(folder=path, instance_prompt=prompt, use_captions=use_captions,
                               resolution=resolution, crop=crop, fingerprint=data.dataset_fingerprint(records),
                               num_images=len(records), aspect_buckets=aspect_buckets)
        captions = sum(1 for r in records if r.caption)
        logger.info("dataset %s: %d images (%d with captions), fingerprint %s", path, len(records), captions,
                    dataset.fingerprint[:12])
        crops = [data.crop_summary(p, path) for p in prepared]
        if aspect_buckets or crop == "face":
            logger.info("dataset %s crops:\n%s", path, "\n".join(crops))
        return io.NodeOutput(dataset, to_image_batch(prepared), ui={"text": crops})


class DreamBoothPriorPreservation(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothPriorPreservation",
            display_name="DreamBooth Prior Preservation",
            category="DreamBooth/dataset",
            description=(
                "The paper's class-specific prior-preservation loss: while learning your subject, the model "
                "also keeps reproducing generic images of its class, so 'a dog' stays any dog. Costs about "
                "twice the compute per step, plus generating the class images once (they are cached)."
            ),
            inputs=[
                io.String.Input(
                    "class_prompt",
                    default=DEFAULT_CLASS_PROMPT,
                    tooltip=_help("class_prompt") + " The instance prompt without the identifier.",
                ),
                io.Int.Input(
                    "num_class_images",
                    default=_default("num_class_images"),
                    **number_range("num_class_images", ui_max=10_000),
                    tooltip=(
                        "How many generic class images to train beside the subject. The paper uses 200 per "
                        "subject photo (about 1000 for 5 photos); 100 already keeps the class from drifting "
                        "in a few hundred steps and takes a few minutes to generate on a GPU. Generated once "
                        "per model, prompt and resolution and reused by later runs."
                    ),
                ),
                io.Float.Input(
                    "prior_loss_weight",
                    default=_default("prior_loss_weight"),
                    **number_range("prior_loss_weight", ui_max=10.0),
                    step=0.05,
                    tooltip=_help("prior_loss_weight") + " 1.0 as in the paper.",
                ),
                io.Combo.Input(
                    "class_folder",
                    options=[NONE_CLASS_FOLDER, *list_input_folders()],
                    default=NONE_CLASS_FOLDER,
                    optional=True,
                    tooltip=(
                        "Optional subfolder of ComfyUI's input folder with your own class images (e.g. photos "
                        "of other dogs). If it holds fewer than num_class_images, the rest are generated."
                    ),
                ),
                # Optional and after class_folder: saved workflows keep widget values by position.
                config_input("class_generation_steps", optional=True),
                config_input("class_generation_guidance", optional=True),
                config_input("class_negative_prompt", optional=True,
                             tooltip=_help("class_negative_prompt") + " Generated class images are kept per base "
                                     "model, prompts, resolution, steps and CFG: changing one generates new ones."),
            ],
            outputs=[Prior.Output("prior", display_name="prior", tooltip="Connect to the train node's prior input.")],
        )

    @classmethod
    @override
    def validate_inputs(cls, class_folder: str = NONE_CLASS_FOLDER) -> bool | str:
        if class_folder in (NONE_CLASS_FOLDER, None):
            return True
        try:
            resolve_input_folder(class_folder, what="class_folder")
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    @override
    def fingerprint_inputs(cls, class_folder: str = NONE_CLASS_FOLDER, **kwargs: Any) -> Any:
        if class_folder in (NONE_CLASS_FOLDER, None):
            return class_folder
        try:
            folder = resolve_input_folder(class_folder, what="class_folder")
            return data.dataset_fingerprint(scan(folder, input_root(), role="class"))
        except ValueError as exc:
            return f"error: {exc}"

    @classmethod
    @override
    def execute(cls, class_prompt: str, num_class_images: int, prior_loss_weight: float,
                class_folder: str | None = NONE_CLASS_FOLDER,
                class_generation_steps: int = _default("class_generation_steps"),
                class_generation_guidance: float = _default("class_generation_guidance"),
                class_negative_prompt: str = _default("class_negative_prompt")) -> io.NodeOutput:
        prompt = " ".join(class_prompt.split())
        if not prompt:
            raise ValueError(
                f"class_prompt is empty: describe the generic class, e.g. {DEFAULT_CLASS_PROMPT!r} (the "
                "instance prompt without the identifier)."
            )
        folder: Path | None = None
        fingerprint = ""
        if class_folder not in (NONE_CLASS_FOLDER, None):
            folder = resolve_input_folder(class_folder, what="class_folder")
            fingerprint = data.dataset_fingerprint(scan(folder, input_root(), role="class"))
        return io.NodeOutput(PriorPreservation(class_prompt=prompt, num_class_images=num_class_images,
                                               prior_loss_weight=prior_loss_weight, class_folder=folder,
                                               class_fingerprint=fingerprint,
                                               class_generation_steps=class_generation_steps,
                                               class_generation_guidance=class_generation_guidance,
                                               class_negative_prompt=class_negative_prompt))


NODES: list[type[io.ComfyNode]] = [DreamBoothDataset, DreamBoothPriorPreservation]
