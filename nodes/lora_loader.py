"""LoRA loader with split UNet / text-encoder strengths that refuses LoRAs which do not fit.

Core's LoraLoader applies whatever keys happen to match and only logs "lora key not loaded" for
the rest, so an SDXL LoRA on an SD1.5 checkpoint is a silent no-op, and a LoRA with the right
names but wrong shapes is only noticed (as a log line) when the weights are patched. This node
runs the same core machinery (key maps, format conversion, adapters, ModelPatcher patches) but
checks every key and every shape first, and fails with a message that says what the LoRA was
made for and how to fix it.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter
import folder_paths
import torch
from comfy_api.latest import io
from typing_extensions import override

from ..trainer.safetensors_file import SafetensorsFileError
from ..trainer.safetensors_file import read_header as read_safetensors_header
from .types import LoraFile, TrainedLora

logger = logging.getLogger(__name__)

# First dropdown entry: a value that exists on every machine, so a saved workflow whose LoRA
# comes from the train node validates even where models/loras is empty or holds other files.
FROM_INPUT = "(use the lora input)"
_STRENGTH = {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01}
_EXAMPLES = 5  # keys quoted in an error message

# A LoRA is a few hundred MB at most; two entries cover "same LoRA in two loader nodes" and an
# A/B swap without keeping a whole collection in RAM.
_CACHE_SIZE = 2
_tensor_cache: OrderedDict[tuple[str, int, int], dict[str, torch.Tensor]] = OrderedDict()

_MODEL_FAMILIES = {
    "SD15": "SD1.x", "SD20": "SD2.x", "SD21UnclipL": "SD2.x", "SD21UnclipH": "SD2.x",
    "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner", "SSD1B": "SDXL (SSD-1B)", "Segmind_Vega": "SDXL (Vega)",
    "SD3": "SD3", "Flux": "Flux", "FluxSchnell": "Flux",
}
# Input width of cross-attention keys and of the text encoder's attention, per family.
_CONTEXT_DIM_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_TEXT_WIDTH_FAMILY = {768: "SD1.x (CLIP-L)", 1024: "SD2.x (OpenCLIP-H)", 1280: "SDXL (CLIP-G)"}
# Suffixes that belong to one LoRA module; stripped to count modules rather than tensors.
_MODULE_SUFFIX = re.compile(
    r"(\.lora_(up|down|mid|A|B)(\.default)?\.weight|\.lora\.(up|down)\.weight|_lora\.(up|down)\.weight"
    r"|\.lora_linear_layer\.(up|down)\.weight|\.alpha|\.dora_scale|\.hada_\w+|\.lokr_\w+|\.diff(_b)?"
    r"|\.w_norm|\.b_norm|\.set_weight|\.reshape_weight|\.lora_[AB])$"
)


class _ReadTracker(dict):
    """A LoRA state dict that remembers which keys core's loader actually read.

    `comfy.lora.load_lora` reports unused keys only as log lines; whatever it read is what it
    loaded, so the complement is the set of keys that would silently do nothing. The overrides
    cost a Python call per look-up, which is cheap only because `_entries_for` keeps the
    look-ups to the LoRA's own modules.
    """

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return default


def _entries_for(key_map: Mapping[str, Any], lora_keys: Iterable[str]) -> dict[str, Any]:
    """The key-map entries that some LoRA key starts with, in key-map order.

    Core's loader tries every entry of the key map (about 3,000 for SD1.x, mostly aliases of the
    same weights) under a dozen or more names each, all of them the entry plus a suffix. An entry
    that no LoRA key starts with can match nothing, so leaving it out changes no patch and no
    read key; it only saves ~15,000 look-ups per application. Order is kept because where two
    aliases of one weight both match, the later one wins, as in core.
    """
    keys = sorted(lora_keys)
    n = len(keys)
    out = {}
    for entry, target in key_map.items():
        # Keys that start with `entry` sort right at or after it, so the first key >= entry tells.
        i = bisect.bisect_left(keys, entry)
        if i < n and keys[i].startswith(entry):
            out[entry] = target
    return out


def file_signature(path: Path) -> tuple[str, int, int]:
    """(resolved path, mtime, size): changes when the file is rewritten or its name points at another file."""
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def load_tensors(path: Path, input_name: str = "lora_name") -> dict[str, torch.Tensor]:
    """The file's tensors, re-read only when the file changed (a retrain under the same name).
    ``input_name``: the node input a broken file is reported under."""
    sig = file_signature(path)
    hit = _tensor_cache.get(sig)
    if hit is not None:
        _tensor_cache.move_to_end(sig)
        return hit
    if path.suffix.lower() == ".safetensors":
        # A half-written or half-downloaded LoRA: say so and name the input, before the library's
        # own error (which names neither) or a partial read.
        try:
            read_safetensors_header(path)
        except SafetensorsFileError as exc:
            raise ValueError(f"{input_name}: {exc}") from exc
    tensors = comfy.utils.load_torch_file(str(path), safe_load=True)
    for stale in [k for k in _tensor_cache if k[0] == sig[0]]:
        del _tensor_cache[stale]
    _tensor_cache[sig] = tensors
    while len(_tensor_cache) > _CACHE_SIZE:
        _tensor_cache.popitem(last=False)
    return tensors


def _module_name(key: str) -> str:
    return _MODULE_SUFFIX.sub("", key)


def _modules(keys: Iterable[str]) -> set[str]:
    return {_module_name(k) for k in keys}


def model_family(model: Any) -> str:
    """Readable family of a ComfyUI ModelPatcher's model, e.g. "SD1.x"."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    name = type(config).__name__ if config is not None else "unknown"
    return _MODEL_FAMILIES.get(name, name)


def guess_lora_family(lora: Mapping[str, torch.Tensor]) -> tuple[str | None, str]:
    """Guess which model family a LoRA was trained for, from its key names and tensor shapes.

    Returns (family or None, the evidence in words).
    """
    keys = list(lora)
    joined = "\n".join(keys)
    if re.search(r"^(lora_transformer_|transformer\.transformer_blocks\.)", joined, re.M) and (
        "joint" in joined or "context_block" in joined or "lora_transformer_" in joined
    ):
        return "SD3", "MMDiT transformer keys (lora_transformer_*)"
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", joined):
        return "Flux", "Flux double/single block keys"
    if "lora_prior_unet_" in joined:
        return "Stable Cascade", "lora_prior_unet_* keys"
    for key in keys:
        if re.search(r"attn2[._]to_[kv]", key) and re.search(r"(lora_down|lora\.down|lora_A)", key):
            width = int(lora[key].shape[1]) if lora[key].ndim >= 2 else 0
            family = _CONTEXT_DIM_FAMILY.get(width)
            if family:
                return family, f"cross-attention input width {width} ({key})"
    if re.search(r"^(lora_te2_|text_encoder_2\.)", joined, re.M):
        return "SDXL", "second text encoder keys (lora_te2_*)"
    for key in keys:
        if re.search(r"self_attn[._]q_proj", key) and re.search(r"(lora_down|lora\.down|lora_A)", key):
            width = int(lora[key].shape[1]) if lora[key].ndim >= 2 else 0
            family = _TEXT_WIDTH_FAMILY.get(width)
            if family:
                return family, f"text-encoder width {width} ({key})"
    return None, "no telltale keys"


_UNREAD_FORMAT = re.compile(r"\.lora\.(down|up)\.weight$|\.lora_[AB](\.default)?\.weight$")


def _unread_format(unused: Iterable[str]) -> bool:
    """Whether ignored keys are diffusers-script or raw peft names (core reads only some of those)."""
    return any(_UNREAD_FORMAT.search(k) for k in unused)


def _expected_shape(patch: Any) -> tuple[tuple[int, ...], str] | None:
    """(out, flattened in) that a patch needs of its target weight, or None where it cannot tell."""
    # Sizes come from .shape, not from flatten()/indexing: those make a tensor view each, and this
    # runs for every patched layer on every application.
    if isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        up, down, _alpha, mid, _dora, reshape = patch.weights
        if reshape is not None:
            return None  # the adapter pads the target to this shape itself
        rank_up, rank_down = math.prod(up.shape[1:]), down.shape[0]
        if rank_up != rank_down:
            return (-1, -1), f"inconsistent rank: up {tuple(up.shape)} vs down {tuple(down.shape)}"
        fan_in = math.prod(down.shape[1:]) if mid is None else down.shape[1] * math.prod(mid.shape[2:])
        return (int(up.shape[0]), int(fan_in)), f"{up.shape[0]}x{fan_in}"
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] in ("diff", "set"):
        tensor = patch[1][0]
        return tuple(int(s) for s in tensor.shape), "x".join(str(s) for s in tensor.shape)
    return None  # LoHa/LoKr/OFT/...: rare for SD1.x LoRAs; core reports those at patch time


def _weight_shapes(root: torch.nn.Module, targets: Iterable[str]) -> dict[str, torch.Size]:
    """Shapes of the weights of `root` named by `targets`, the names of its state dict; names not in
    it are left out.

    Looked up one by one: state_dict() walks all ~1,100 tensors of an SD1.x UNet to find the ~130
    a LoRA patches. A name that is not a registered parameter (a buffer, or no such layer) is
    settled by the state dict itself, the reference core's add_patches uses, built at most once.
    """
    shapes: dict[str, torch.Size] = {}
    state: dict[str, torch.Tensor] | None = None
    for target in targets:
        try:
            shapes[target] = root.get_parameter(target).shape
        except AttributeError:
            if state is None:
                state = root.state_dict()
            if target in state:
                shapes[target] = state[target].shape
    return shapes


def _shape_errors(
    patches: Mapping[Any, Any], root: torch.nn.Module, key_map: Mapping[str, Any], lora_keys: Iterable[str]
) -> list[str]:
    # (key, offset) targets patch a slice; only Flux uses them.
    shapes = _weight_shapes(root, [target for target in patches if isinstance(target, str)])
    problems: list[tuple[str, str | None]] = []  # (target, mismatch text; None: no such weight)
    for target, patch in patches.items():
        if not isinstance(target, str):
            continue
        have = shapes.get(target)
        if have is None:
            problems.append((target, None))
            continue
        expected = _expected_shape(patch)
        if expected is None:
            continue
        shape, text = expected
        if isinstance(patch, tuple):
            ok = shape == tuple(have)
            have_text = "x".join(str(s) for s in have)
        else:
            fan_in = math.prod(have[1:])
            ok = shape[0] == have[0] and shape[1] == fan_in
            have_text = f"{have[0]}x{fan_in}"
        if not ok:
            problems.append((target, f"the LoRA gives {text}, the model's layer is {have_text}"))
    if not problems:
        return []
    # Name each mismatch after the LoRA's own key: that is what the user can look up in the file.
    present = _modules(lora_keys)
    lora_name_of = {target: x for x, target in key_map.items() if x in present and isinstance(target, str)}
    return [
        f"{target}: no such weight in the model" if text is None else f"{lora_name_of.get(target, target)}: {text}"
        for target, text in problems
    ]


def _spread(items: list[str], n: int = _EXAMPLES) -> list[str]:
    """Up to n items spread over a sorted list, so the examples show each kind of key, not one."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def _mismatch_message(
    name: str, family: str, lora: Mapping[str, torch.Tensor], unused: set[str], shape_errors: list[str]
) -> str:
    guess, evidence = guess_lora_family(lora)
    total_mod, bad_mod = len(_modules(lora)), len(_modules(unused))
    lines = []
    if unused:
        lines.append(
            f"LoRA {name!r} does not fit this {family} model: {len(lora) - len(unused)} of {len(lora)} "
            f"tensors ({total_mod - bad_mod} of {total_mod} modules) match its layers."
        )
        lines.append("Modules that would be ignored, e.g.: " + ", ".join(_spread(sorted(_modules(unused)))))
    if shape_errors:
        lines.append(
            f"LoRA {name!r}: {len(shape_errors)} layers match by name but not by shape in this {family} "
            f"model, e.g.: " + "; ".join(shape_errors[:_EXAMPLES])
        )
    if guess and guess != family:
        lines.append(f"It looks made for {guess} ({evidence}).")
        lines.append(
            f"Fix: use this LoRA with a checkpoint of its family ({guess}), or pick a LoRA trained for {family} "
            "(for example one from the DreamBooth train node on this checkpoint)."
        )
    elif unused and _unread_format(unused):
        lines.append(
            "Its ignored keys are diffusers/peft names (*.lora.down.weight, *.lora_A.weight), a layout "
            "ComfyUI does not read for these layers."
        )
        lines.append(
            "Fix: convert it to kohya format (lora_unet_* / lora_te_* keys), or retrain it with "
            "the DreamBooth train node, which writes keys ComfyUI reads."
        )
    elif guess == family:
        lines.append(
            f"Its keys are those of a LoRA for {family} ({evidence}), so it was probably trained on a variant of "
            f"{family} with other layer sizes, or the file is damaged or incomplete."
        )
        lines.append(
            "Fix: use it with the checkpoint it was trained on, or retrain it on this checkpoint "
            "(for example with the DreamBooth train node)."
        )
    else:
        lines.append(f"Its family could not be told ({evidence}{'; closest guess ' + guess if guess else ''}).")
        lines.append(
            f"Fix: use a LoRA trained for {family} (kohya or ComfyUI format), or the checkpoint it was "
            "trained on; a partly matching file may have been cut short or trained for a variant model."
        )
    return "\n".join(lines)


def apply_lora(
    model: Any,
    clip: Any,
    lora: Mapping[str, torch.Tensor],
    name: str,
    strength_model: float,
    strength_clip: float,
) -> tuple[Any, Any, str]:
    """Patch clones of `model` and `clip` with `lora`, or raise ValueError if any part of it does not fit.

    A side whose strength is 0 is returned as it came in (no clone, no patches), so both at 0
    reproduce the unpatched result exactly.
    """
    family = model_family(model)
    if not lora:
        raise ValueError(
            f"LoRA {name!r} holds no tensors: the file is empty or was not written completely. "
            "Save or train it again."
        )
    converted = comfy.lora_convert.convert_lora(dict(lora))
    # Fresh dicts on purpose: both key-map functions have a shared mutable default argument.
    unet_map = _entries_for(comfy.lora.model_lora_keys_unet(model.model, {}), converted)
    clip_map = _entries_for(comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), converted)
    unet_reader, clip_reader = _ReadTracker(converted), _ReadTracker(converted)
    unet_patches = comfy.lora.load_lora(unet_reader, unet_map, log_missing=False)
    clip_patches = comfy.lora.load_lora(clip_reader, clip_map, log_missing=False)
    unused = set(converted) - unet_reader.read - clip_reader.read
    shape_errors = _shape_errors(unet_patches, model.model, unet_map, converted)
    shape_errors += _shape_errors(clip_patches, clip.patcher.model, clip_map, converted)
    if unused or shape_errors or not (unet_patches or clip_patches):
        raise ValueError(_mismatch_message(name, family, converted, unused, shape_errors))

    new_model, new_clip = model, clip
    if strength_model != 0 and unet_patches:
        new_model = model.clone()
        applied = new_model.add_patches(unet_patches, strength_model)
        _check_applied(name, "UNet", unet_patches, applied)
    if strength_clip != 0 and clip_patches:
        new_clip = clip.clone()
        applied = new_clip.add_patches(clip_patches, strength_clip)
        _check_applied(name, "text encoder", clip_patches, applied)

    def side(label: str, patches: Mapping[Any, Any], strength: float) -> str:
        if not patches:
            return f"{label}: no layers in this LoRA"
        state = f"strength {strength:g}" if strength != 0 else "strength 0, skipped"
        return f"{label}: {len(patches)} layers, {state}"

    report = (
        f"LoRA {name!r} ({family}): {side('UNet', unet_patches, strength_model)}; "
        f"{side('text encoder', clip_patches, strength_clip)}."
    )
    return new_model, new_clip, report


def _check_applied(name: str, label: str, patches: Mapping[Any, Any], applied: Iterable[Any]) -> None:
    missing = set(patches) - set(applied)
    if missing:
        raise ValueError(
            f"LoRA {name!r}: {len(missing)} {label} patches found no weight to attach to, e.g. "
            + ", ".join(str(k) for k in sorted(missing, key=str)[:_EXAMPLES])
            + ". This ComfyUI's model layout differs from the one the key map describes; please report it."
        )


def _resolve(lora_name: str, lora: TrainedLora | None) -> tuple[Path, str, str]:
    """(path, name for messages, note for the report)."""
    if lora is not None:
        path = Path(lora.path)
        if not path.is_file():
            raise FileNotFoundError(
                f"The connected LoRA {lora.name!r} points to {path}, which does not exist (deleted or "
                "moved since training?). Re-run the train node or pick the file in lora_name."
            )
        note = "" if lora_name == FROM_INPUT else f" (the connected lora input wins over lora_name {lora_name!r})"
        return path, lora.name or path.name, note
    if lora_name == FROM_INPUT:
        raise ValueError(
            f"lora_name is {FROM_INPUT!r} but the lora input brings no LoRA: nothing is connected, or the train "
            "node made a full fine-tune without extracting a LoRA (set extract_lora_rank in DreamBooth Options: Full "
            "Fine-tune, or load its checkpoint output instead). Connect the lora output of a train node, or choose "
            "a file from models/loras in lora_name."
        )
    return Path(folder_paths.get_full_path_or_raise("loras", lora_name)), lora_name, ""


class DreamBoothLoraLoader(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothLoraLoader",
            display_name="DreamBooth LoRA Loader (split strengths)",
            category="DreamBooth/lora",
            description=(
                "Applies a LoRA to the UNet and the text encoder with separate strengths. Unlike the "
                "core loader it fails, with the reason and a fix, when the LoRA does not fit the model "
                "(another model family, missing or misshapen layers) instead of silently doing nothing."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (UNet) the LoRA will be applied to."),
                io.Clip.Input("clip", tooltip="The text encoder (CLIP) the LoRA will be applied to."),
                io.Combo.Input(
                    "lora_name",
                    options=[FROM_INPUT, *folder_paths.get_filename_list("loras")],
                    default=FROM_INPUT,
                    tooltip=(
                        "A LoRA file from models/loras. Keep the first entry when the lora input is "
                        "connected (a connected lora input always wins)."
                    ),
                ),
                io.Float.Input(
                    "strength_model",
                    **_STRENGTH,
                    tooltip="How strongly to modify the UNet. 0 leaves it untouched; may be negative or above 1.",
                ),
                io.Float.Input(
                    "strength_clip",
                    **_STRENGTH,
                    tooltip=(
                        "How strongly to modify the text encoder. 0 leaves it untouched; may be "
                        "negative or above 1."
                    ),
                ),
                LoraFile.Input(
                    "lora",
                    optional=True,
                    tooltip="A freshly trained LoRA from the train node; no page reload needed. Wins over lora_name.",
                ),
            ],
            outputs=[
                io.Model.Output("patched_model", display_name="model", tooltip="The patched diffusion model."),
                io.Clip.Output("patched_clip", display_name="clip", tooltip="The patched text encoder."),
                io.String.Output("report", display_name="report", tooltip="What was applied, layer counts per side."),
            ],
        )

    @classmethod
    @override
    def validate_inputs(cls, lora_name: str = FROM_INPUT) -> bool | str:
        # ComfyUI 0.3.75 checks combo values only for V1 nodes; without this an unknown file name
        # (a workflow from another machine) would be queued and fail mid-run instead of up front.
        # No **kwargs on purpose: that would switch off core's min/max checks of the strengths.
        if lora_name == FROM_INPUT or folder_paths.get_full_path("loras", lora_name) is not None:
            return True
        return (
            f"LoRA file {lora_name!r} is not in models/loras. Put it there and refresh, pick another "
            f"file, or choose {FROM_INPUT!r} and connect the lora input."
        )

    @classmethod
    @override
    def fingerprint_inputs(cls, lora_name: str = FROM_INPUT, **kwargs: Any) -> Any:
        # A retrain that overwrites the same file must not be served from ComfyUI's cache.
        if lora_name == FROM_INPUT:
            return lora_name
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            return lora_name
        try:
            return file_signature(Path(path))
        except OSError:
            return lora_name

    @classmethod
    @override
    def execute(
        cls,
        model: Any,
        clip: Any,
        lora_name: str,
        strength_model: float,
        strength_clip: float,
        lora: TrainedLora | None = None,
    ) -> io.NodeOutput:
        path, name, note = _resolve(lora_name, lora)
        tensors = load_tensors(path)
        new_model, new_clip, report = apply_lora(model, clip, tensors, name, strength_model, strength_clip)
        logger.info("%s", report)
        return io.NodeOutput(new_model, new_clip, report + note)


NODES: list[type[io.ComfyNode]] = [DreamBoothLoraLoader]
