"""ControlNet nodes: a hint preprocessor and a one-node ControlNet txt2img built from core nodes.

The preprocessing itself is ComfyUI-free (`controlnet_aux_core`); this module only resolves the
`annotators` model folder, converts sockets and wires ComfyUI's own nodes together.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

import nodes as core_nodes

from . import controlnet_aux_core as core

logger = logging.getLogger(__name__)

CATEGORY_PREPROCESS = "DreamBooth/controlnet"
CATEGORY_GENERATE = "DreamBooth/generate"


def annotator_dirs() -> list[Path]:
    """The `annotators` model folders, registering `<models_dir>/annotators` on first use.

    Folders added under `annotators:` in extra_model_paths.yaml (read before custom nodes load)
    keep their place in front; the default one is then searched after them.
    """
    default = os.path.join(folder_paths.models_dir, core.ANNOTATORS_FOLDER)
    if core.ANNOTATORS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(core.ANNOTATORS_FOLDER, default, is_default=True)
    else:
        folder_paths.add_model_folder_path(core.ANNOTATORS_FOLDER, default)
    return [Path(p) for p in folder_paths.get_folder_paths(core.ANNOTATORS_FOLDER)]


def _weights_fingerprint(preprocessor: Any) -> Any:
    # Re-run when a weights file appears, changes or disappears, even if no widget changed.
    spec = core.DETECTORS.get(preprocessor) if isinstance(preprocessor, str) else None
    if spec is None or not spec.files:
        return ""
    stamps = []
    for filename in spec.files:
        path = folder_paths.get_full_path(core.ANNOTATORS_FOLDER, filename)
        if path is None:
            stamps.append((filename, None))
        else:
            st = os.stat(path)
            stamps.append((path, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def run_preprocessor(image: torch.Tensor, preprocessor: str, detect_resolution: int,
                     options: core.DetectOptions) -> torch.Tensor:
    """IMAGE -> hint IMAGE of the same size, with progress and interruption between images."""
    dirs = annotator_dirs()
    pixels = core.image_to_numpy(image)
    bar = comfy.utils.ProgressBar(len(pixels))  # reports to the node that is executing

    def before_each(index: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(index, total)

    try:
        hints = core.detect(pixels, preprocessor, dirs, detect_resolution=detect_resolution, options=options,
                            device=comfy.model_management.get_torch_device(), before_each=before_each)
    except core.MissingAnnotatorWeights:
        # Make the folder the message names exist, so a user can drop the file straight in.
        if dirs:
            dirs[0].mkdir(parents=True, exist_ok=True)
        raise
    bar.update_absolute(len(pixels), len(pixels))
    return core.numpy_to_image(hints).to(comfy.model_management.intermediate_device())


def _detector_tooltip() -> str:
    lines = []
    for name, files in core.weights_table():
        need = ", ".join(files) if files else "no weights"
        lines.append(f"{name}: {core.DETECTORS[name].summary} ({need})")
    return ("Which hint to extract. Weights are read only from the 'annotators' model folder, "
            "never downloaded:\n" + "\n".join(lines))


def _detect_resolution_input() -> io.Int.Input:
    return io.Int.Input(
        "detect_resolution", default=512, min=64, max=4096, step=64,
        tooltip="Short side, in pixels, of the image the detector analyses (aspect ratio kept). "
                "The hint is then resized back to the input image's own size.",
    )


class DreamBoothControlNetPreprocessor(io.ComfyNode):
    """Turn an image into a ControlNet hint (edges, depth, pose, ...) of the same size."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        annotator_dirs()
        return io.Schema(
            node_id="DreamBoothControlNetPreprocessor",
            display_name="DreamBooth ControlNet Preprocessor",
            category=CATEGORY_PREPROCESS,
            description="Extracts a ControlNet hint from an image with controlnet_aux's detectors. The hint "
                        "has the image's size and aspect ratio (nothing is cropped). Detectors that need "
                        "weights read them from models/annotators; nothing is downloaded.",
            inputs=[
                io.Image.Input("image", tooltip="The image (or batch) to extract hints from."),
                io.Combo.Input("preprocessor", options=list(core.DETECTOR_NAMES), default="canny",
                               tooltip=_detector_tooltip()),
                _detect_resolution_input(),
                io.Int.Input("low_threshold", default=100, min=0, max=255,
                             tooltip="canny only: gradients below this are never edges."),
                io.Int.Input("high_threshold", default=200, min=0, max=255,
                             tooltip="canny only: gradients above this are always edges."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="shuffle only (the one random detector): the same seed gives the "
                                     "same hint. Image i of a batch uses seed + i."),
            ],
            outputs=[io.Image.Output("hint", display_name="hint",
                                     tooltip="The hint, same batch size and size as the image.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        return _weights_fingerprint(kwargs.get("preprocessor"))

    @classmethod
    def execute(cls, image: torch.Tensor, preprocessor: str, detect_resolution: int, low_threshold: int,
                high_threshold: int, seed: int) -> io.NodeOutput:
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must not exceed high_threshold "
                             f"({high_threshold}); swap them.")
        options = core.DetectOptions(canny_low=low_threshold, canny_high=high_threshold, seed=seed)
        return io.NodeOutput(run_preprocessor(image, preprocessor, detect_resolution, options))


class DreamBoothControlNetGenerate(io.ComfyNode):
    """txt2img under ControlNet guidance, by calling ComfyUI's own nodes in the native order."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothControlNetGenerate",
            display_name="DreamBooth ControlNet Generate",
            category=CATEGORY_GENERATE,
            description="CLIPTextEncode x2 -> ControlNetApplyAdvanced -> EmptyLatentImage -> KSampler -> "
                        "VAEDecode in one node: same result as that chain of core nodes. Use the "
                        "DreamBooth LoRA loader on model/clip first to generate your subject.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (with your LoRA applied, if any)."),
                io.Clip.Input("clip", tooltip="The text encoder that encodes both prompts."),
                io.Vae.Input("vae", tooltip="Decodes the result; also given to the ControlNet."),
                io.ControlNet.Input("control_net", tooltip="The ControlNet (ControlNetLoader) matching the hint type."),
                io.Image.Input("image", tooltip="A hint image, or a photo to turn into one with 'preprocessor'."),
                io.Combo.Input("preprocessor", options=[core.NO_PREPROCESSOR, *core.DETECTOR_NAMES],
                               default=core.NO_PREPROCESSOR,
                               tooltip="'none' uses the image as the hint as it is; otherwise the hint is "
                                       "extracted first (see the Preprocessor node for the weights).\n"
                                       + _detector_tooltip()),
                _detect_resolution_input(),
                io.String.Input("positive", multiline=True, default="",
                                tooltip="What to generate, e.g. 'a photo of sks dog on the beach'."),
                io.String.Input("negative", multiline=True, default="", tooltip="What to avoid."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of denoising steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale: how strongly to follow the prompt."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampling algorithm (as in KSampler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="How the noise level falls over the steps (as in KSampler)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="How strongly the ControlNet steers the image; 0 turns it off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling at which the ControlNet starts acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling at which the ControlNet stops acting."),
                io.Int.Input("width", default=0, min=0, max=core_nodes.MAX_RESOLUTION, step=8,
                             tooltip="Output width; 0 = from the image (keeping its aspect ratio if height "
                                     "is set). Rounded to a multiple of 8. If width and height are both set "
                                     "with another aspect ratio than the image, ComfyUI centre-crops the hint."),
                io.Int.Input("height", default=0, min=0, max=core_nodes.MAX_RESOLUTION, step=8,
                             tooltip="Output height; 0 = from the image (keeping its aspect ratio if width "
                                     "is set). Rounded to a multiple of 8."),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Images to generate at once."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip="The generated images."),
                io.Image.Output("hint", display_name="hint", tooltip="The hint the ControlNet saw."),
                io.Latent.Output("latent", display_name="latent", tooltip="The sampled latent, before decoding."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        return _weights_fingerprint(kwargs.get("preprocessor"))

    @classmethod
    def execute(cls, model: Any, clip: Any, vae: Any, control_net: Any, image: torch.Tensor, preprocessor: str,
                detect_resolution: int, positive: str, negative: str, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, strength: float, start_percent: float, end_percent: float,
                width: int, height: int, batch_size: int) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}).")
        if preprocessor == core.NO_PREPROCESSOR:
            hint = image[..., :3]
        else:
            hint = run_preprocessor(image, preprocessor, detect_resolution, core.DetectOptions(seed=seed))

        img_h, img_w = int(image.shape[1]), int(image.shape[2])
        out_w, out_h = core.hint_size(img_h, img_w, width, height)
        if abs(out_w / out_h - img_w / img_h) > 0.02 * img_w / img_h:
            logger.warning("output %dx%d has another aspect ratio than the %dx%d hint: ComfyUI's ControlNet "
                           "centre-crops the hint to fit", out_w, out_h, img_w, img_h)

        (cond_pos,) = core_nodes.CLIPTextEncode().encode(clip, positive)
        (cond_neg,) = core_nodes.CLIPTextEncode().encode(clip, negative)
        cond_pos, cond_neg = core_nodes.ControlNetApplyAdvanced().apply_controlnet(
            cond_pos, cond_neg, control_net, hint, strength, start_percent, end_percent, vae=vae)
        (latent,) = core_nodes.EmptyLatentImage().generate(out_w, out_h, batch_size)
        (latent,) = core_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler,
                                               cond_pos, cond_neg, latent, denoise=1.0)
        (images,) = core_nodes.VAEDecode().decode(vae, latent)
        return io.NodeOutput(images, hint, latent)


NODES: list[type[io.ComfyNode]] = [DreamBoothControlNetPreprocessor, DreamBoothControlNetGenerate]
