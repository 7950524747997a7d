"""LoRA layers (peft) and the one file format we write: kohya-style keys with the true alpha.

Kohya keys are what ComfyUI's native LoraLoader, A1111/Forge and diffusers' ``load_lora_weights``
all read. diffusers' own ``convert_state_dict_to_kohya`` is not used: it writes alpha = rank, which
is wrong whenever alpha != rank, and with transformers 5 it drops the ``text_model`` level that
ComfyUI's key map needs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import fileio
from .config import ConfigError
from .families import Family
from .identity import METADATA_KEY, TrainingIdentity
from .safetensors_file import SafetensorsFileError, SafetensorsHeader, read_header, read_tensor_bytes

logger = logging.getLogger(__name__)

UNET_TARGETS: dict[str, list[str]] = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
}
UNET_TARGETS["attn_ff"] = UNET_TARGETS["attn"] + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_TARGETS["full"] = UNET_TARGETS["attn_ff"] + [
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
]
TEXT_ENCODER_TARGETS: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
TEXT_ENCODER_TARGETS["attn_mlp"] = TEXT_ENCODER_TARGETS["attn"] + ["fc1", "fc2"]

ADAPTER = "default"
# How a training checkpoint names each text encoder's LoRA weights, in the model's order.
TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_lora(model: torch.nn.Module, *, rank: int, alpha: float, targets: list[str], dropout: float) -> None:
    """Inject LoRA layers in place; only they are trainable afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights=True)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA parameters by their in-model names (what checkpoints store)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(state) != trainable:
        missing, extra = sorted(trainable - set(state)), sorted(set(state) - trainable)
        raise ValueError(f"checkpoint does not match this LoRA layout (missing {missing[:2]}, extra {extra[:2]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def kohya_modules(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
                  spec: Family) -> dict[str, tuple[str, Any]]:
    """Kohya module name (``lora_unet_...``, ``lora_te_...``; SDXL ``lora_te1_...`` / ``lora_te2_...``)
    -> (part, peft LoRA layer); part is "unet" or "text_encoder" (every text encoder: they share one rank,
    alpha and learning rate). ``text_encoders`` is empty when no text-encoder LoRA is trained.

    The one map between in-model names and file names: saving walks it, and ``init_lora`` reads a
    file back through it, so a LoRA this pack wrote always loads into the layers it came from.
    """
    out: dict[str, tuple[str, Any]] = {}
    parts: list[tuple[str, str, torch.nn.Module]] = [("unet", "lora_unet", unet)]
    if text_encoders:
        if len(text_encoders) != spec.text_encoder_count:
            raise ValueError(f"{spec.label} has {spec.text_encoder_count} text encoder(s), got {len(text_encoders)}")
        parts += [("text_encoder", prefix, te) for prefix, te in zip(spec.text_encoder_prefixes, text_encoders,
                                                                       strict=True)]
    for part, prefix, model in parts:
        for name, layer in lora_layers(model):
            out[kohya_module_name(prefix, name)] = (part, layer)
    return out


def kohya_module_name(prefix: str, module_path: str) -> str:
    """``lora_unet_<path with _>`` / ``lora_te_text_model_<path>`` for a module of the UNet or a text encoder."""
    if prefix.startswith("lora_te") and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path  # transformers 5 has no text_model level; the format does
    return f"{prefix}_{module_path.replace('.', '_')}"


def kohya_state_dict(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], spec: Family,
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, (_, layer) in kohya_modules(unet, text_encoders, spec).items():
        out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=dtype)
    return out


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """About the size of the file ``save_file(tensors, metadata=metadata)`` writes: the data, plus a
    generous bound on the JSON header (a key, a dtype, a shape and two offsets per tensor)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = sum(len(key) + 128 for key in tensors) + len(json.dumps(metadata or {}))
    return data + header


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], *,
                             overwrite: bool, replace: Callable[[str, str], None] = os.replace,
                             link: Callable[[str, str], None] = os.link,
                             replace_attempts: int = fileio.REPLACE_ATTEMPTS,
                             replace_delay_s: float = fileio.REPLACE_DELAY_S) -> None:
    """Write to a temp file in the same folder, fsync, then move into place.

    A disk without room for the file is a DiskFullError before anything is written. A crash mid-write
    leaves only the temp file. An existing file is replaced only when
    ``overwrite`` is set, retrying while another program holds it open (Windows refuses to replace
    a LoRA that ComfyUI has loaded); when that never succeeds, the old file is unchanged, the new one
    stays in the temp file and FileInUseError names both. Without ``overwrite`` an existing file
    raises FileExistsError, atomically: the no-clobber create either lands whole or fails.
    ``replace`` and ``link`` are the operations used (tests inject failing ones).
    """
    from safetensors.torch import save_file

    Path(fileio.long_path(path.parent)).mkdir(parents=True, exist_ok=True)
    fileio.ensure_free_space(path.parent, safetensors_bytes(tensors, metadata), path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    keep_tmp = False
    try:
        save_file(tensors, fileio.long_path(tmp), metadata=metadata)
        with open(fileio.long_path(tmp), "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            try:
                fileio.replace_with_retry(tmp, path, replace=replace, attempts=replace_attempts,
                                          delay_s=replace_delay_s)
            except fileio.FileInUseError:
                keep_tmp = True  # the only copy of the new LoRA: never delete it
                raise
        else:
            fileio.create_no_clobber(tmp, path, link=link)  # FileExistsError rather than replacing a good file
    finally:
        if not keep_tmp:
            Path(fileio.long_path(tmp)).unlink(missing_ok=True)


def metadata_signature(config: Any) -> dict[str, Any]:
    """The training signature as ``dreambooth.config`` stores it: user paths cut to their basenames.

    For people and other tools to read. Whether a LoRA is what a config would train is decided by
    ``dreambooth.identity`` (``identity.compare``), which uses contents, not names.
    """
    training = config.training_signature()
    for key in ("pretrained_model", "instance_data_dir", "class_data_dir", "init_lora"):
        if training.get(key):
            training[key] = Path(training[key]).name
    return json.loads(json.dumps(training))


def lora_metadata(config: Any, base: Any, *, step: int, version: str,
                  identity: TrainingIdentity | None = None) -> dict[str, str]:
    """Header metadata in the keys LoRA tools already read (kohya ``ss_*``, SAI ``modelspec.*``).

    Only basenames of user paths are written: a shared LoRA must not leak someone's folders.
    ``identity`` is written as ``dreambooth.identity``: hashes and settings, no paths; the train node
    reuses the file only when it matches.
    """
    spec: Family = base.spec
    arch = spec.modelspec_architecture
    if spec.name == "sd2" and base.prediction_type == "v_prediction":
        arch = "stable-diffusion-v2-768-v"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_text_encoder_dim": str(config.text_encoder_rank) if config.train_text_encoder else "",
        "ss_text_encoder_alpha": str(config.text_encoder_alpha) if config.train_text_encoder else "",
        "ss_base_model_version": spec.kohya_version,
        "ss_v2": str(base.family == "sd2"),
        "ss_v_parameterization": str(base.prediction_type == "v_prediction"),
        "ss_sd_model_name": base.name,
        "ss_sd_model_hash": base.sha256[:10],
        "ss_new_sd_model_hash": base.sha256,
        "ss_output_name": config.lora_name,
        "ss_steps": str(step),
        "ss_max_train_steps": str(config.max_train_steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else 0),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_seed": str(config.seed),
        "ss_prior_loss_weight": str(config.prior_loss_weight if config.with_prior_preservation else 0),
        "ss_training_comment": f"DreamBooth-LoRA: {config.instance_prompt}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": config.lora_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "dreambooth.trainer_version": version,
        "dreambooth.instance_prompt": config.instance_prompt,
        "dreambooth.identifier": config.identifier,
        "dreambooth.class_prompt": config.class_prompt if config.with_prior_preservation else "",
        "dreambooth.base_model": base.name,
        "dreambooth.base_model_sha256": base.sha256,
        "dreambooth.prediction_type": base.prediction_type,
        "dreambooth.unet_target": config.unet_target,
        "dreambooth.text_encoder_target": config.text_encoder_target if config.train_text_encoder else "",
    }
    meta["dreambooth.config"] = json.dumps(metadata_signature(config), sort_keys=True)
    if identity is not None:
        meta[METADATA_KEY] = identity.to_json()
    meta.update({f"user.{k}": v for k, v in config.metadata.items()})
    return meta


# --------------------------------------------------------------------------------------------- init_lora
# Starting a training from an existing LoRA (config ``init_lora``): the file is read back through
# ``kohya_modules``, the inverse of how it was written. Only the kohya layout is read, as the pack's
# own LoRA loader does; diffusers/peft-named files are refused there too.

_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te[12]?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ALPHA_DTYPES = {**_TORCH_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16}  # some tools: ints
_PART_NAMES = {"unet": "UNet", "text_encoder": "text-encoder"}
_FROM_ZERO = "or leave init_lora empty to start from zero"


@dataclass(frozen=True)
class InitModule:
    part: str  # "unet" | "text_encoder"
    down: str  # tensor names in the file
    up: str
    alpha: str | None  # kohya files without alpha mean alpha = rank
    rank: int


@dataclass(frozen=True)
class InitLora:
    """A checked ``init_lora`` file: its header and its LoRA layers by kohya module name."""

    path: Path
    header: SafetensorsHeader
    modules: dict[str, InitModule]
    # What the text-encoder keys say: "sdxl" (lora_te2_ present), "sd" (one text encoder: SD1.x/2.x), or
    # None for a UNet-only file (its layer names and shapes tell the family instead).
    text_encoders: str | None = None

    def part(self, part: str) -> dict[str, InitModule]:
        return {k: m for k, m in self.modules.items() if m.part == part}


def _init_error(message: str) -> ConfigError:
    return ConfigError("init_lora", message)


def open_init_lora(path: str | Path) -> InitLora:
    """Check the file and its layout (cheap: the header only), before any model is loaded."""
    path = Path(path)
    if not path.exists():
        raise _init_error(f"{path} does not exist: choose an existing LoRA file, {_FROM_ZERO}")
    if path.is_dir():
        raise _init_error(f"{path} is a folder: choose a LoRA file (.safetensors), {_FROM_ZERO}")
    try:
        header = read_header(path)
    except SafetensorsFileError as exc:
        raise _init_error(f"{exc.path}: {exc.problem}. {exc.fix}, {_FROM_ZERO}") from exc
    parsed: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    # Two text encoders (lora_te2_ keys) make an SDXL LoRA, whose lora_te1_ keys keep their name; an SD1.x
    # LoRA may call its one text encoder lora_te1_ too: read as lora_te_, what this pack writes for SD1.x.
    sdxl = any(k.startswith("lora_te2_") for k in header.tensors)
    for key in sorted(header.tensors):
        match = _KOHYA_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        prefix, module, kind = match.groups()
        parsed.setdefault(f"{'lora_te' if prefix == 'lora_te1' and not sdxl else prefix}_{module}", {})[kind] = key
    if unknown:
        raise _init_error(_unknown_keys_message(path, unknown))
    modules: dict[str, InitModule] = {}
    for name, keys in parsed.items():
        if "lora_down.weight" not in keys or "lora_up.weight" not in keys:
            half = "lora_up" if "lora_down.weight" in keys else "lora_down"
            raise _init_error(f"{path.name} has layer {name} without its {half} weight: the file is damaged or not "
                              f"a plain LoRA; choose another LoRA file, {_FROM_ZERO}")
        down, up = header.tensors[keys["lora_down.weight"]], header.tensors[keys["lora_up.weight"]]
        for entry, key in ((down, keys["lora_down.weight"]), (up, keys["lora_up.weight"])):
            if entry.dtype not in _TORCH_DTYPES:
                raise _init_error(f"{path.name}: tensor {key} holds {entry.dtype} values, not floating-point "
                                  f"weights; choose another LoRA file, {_FROM_ZERO}")
        alpha = header.tensors.get(keys.get("alpha", ""))
        if alpha is not None and (alpha.dtype not in _ALPHA_DTYPES or math.prod(alpha.shape) != 1):
            raise _init_error(f"{path.name}: {keys['alpha']} is not one number ({alpha.dtype}, shape "
                              f"{list(alpha.shape)}); choose another LoRA file, {_FROM_ZERO}")
        if len(down.shape) < 2 or down.shape[0] < 1:
            raise _init_error(f"{path.name}: layer {name} has a down weight of shape {list(down.shape)}, not a "
                              f"LoRA's; choose another LoRA file, {_FROM_ZERO}")
        part = "unet" if name.startswith("lora_unet_") else "text_encoder"
        modules[name] = InitModule(part, keys["lora_down.weight"], keys["lora_up.weight"], keys.get("alpha"),
                                   down.shape[0])
    if not modules:
        raise _init_error(f"{path.name} holds no LoRA layers; choose a LoRA file, {_FROM_ZERO}")
    has_te = any(m.part == "text_encoder" for m in modules.values())
    return InitLora(path, header, modules, "sdxl" if sdxl else "sd" if has_te else None)


def _unknown_keys_message(path: Path, unknown: list[str]) -> str:
    examples = ", ".join(unknown[:3])
    if any(re.search(r"(lora_[AB]|lora\.(down|up))\.weight$", k) for k in unknown):
        return (f"{path.name} uses diffusers/peft key names (e.g. {examples}), which the pack's LoRA loader does "
                "not read either; convert it to the kohya layout (lora_unet_* / lora_te_* keys), use a LoRA "
                f"this pack trained, {_FROM_ZERO}")
    return (f"{path.name} has {len(unknown)} tensors that are not plain LoRA layers in the kohya layout "
            f"(e.g. {examples}; LoHa, LoKr, DoRA and LoCon files cannot be started from); use a LoRA this pack "
            f"trained, {_FROM_ZERO}")


def _guess_target(module_names: list[str], choices: dict[str, list[str]]) -> str | None:
    """The smallest target set whose layer names (peft matches them as name suffixes) cover the file's."""
    for choice, targets in choices.items():  # ordered smallest first
        endings = tuple("_" + t.replace(".", "_") for t in targets)
        if all(n.endswith(endings) for n in module_names):
            return choice
    return None


def _alpha_text(value: float) -> str:
    return f"{value:.4g}"


def _part_settings(config: Any, part: str) -> tuple[str, int, str, float, str, str]:
    """(rank key, rank, alpha key, alpha, target key, target) of one part of the LoRA."""
    if part == "unet":
        return "rank", config.rank, "alpha", config.alpha, "unet_target", config.unet_target
    return ("text_encoder_rank", config.text_encoder_rank, "text_encoder_alpha", config.text_encoder_alpha,
            "text_encoder_target", config.text_encoder_target)


def _used_parts(config: Any) -> list[str]:
    return ["unet"] + (["text_encoder"] if config.train_text_encoder else [])


def check_init_lora(init: InitLora, config: Any, spec: Family) -> list[tuple[str, str]]:
    """Check what the header alone shows (model family, kinds of layers, ranks, alphas) against the base
    model's family and the settings, before any model is loaded. One ConfigError names every problem with
    its fix; else (level, message) notes.
    """
    if init.text_encoders is not None and (init.text_encoders == "sdxl") != (spec.name == "sdxl"):
        found = ("an SDXL LoRA (it has lora_te2_ layers)" if init.text_encoders == "sdxl"
                 else "an SD1.x/SD2.x LoRA (one text encoder)")
        raise _init_error(f"{init.path.name} is {found}, and the base model is {spec.label}: choose a LoRA trained on "
                          f"this base model's family, {_FROM_ZERO}")
    notes: list[tuple[str, str]] = []
    te_in_file = init.part("text_encoder")
    if te_in_file and not config.train_text_encoder:
        # Not an error: turning train_text_encoder off is what the out-of-memory advice asks for, and
        # the UNet half is still a good start. The new LoRA has no text-encoder part, so say so.
        notes.append(("warning", f"init_lora: {init.path.name} also holds a text-encoder LoRA ({len(te_in_file)} "
                      "layers); train_text_encoder is off, so only its UNet layers are used and the new LoRA "
                      "will have no text-encoder part"))
    problems: list[str] = []
    for part in _used_parts(config):
        rank_key, rank, alpha_key, alpha, target_key, target = _part_settings(config, part)
        modules = init.part(part)
        label = _PART_NAMES[part]
        if not modules:
            fix = ("set train_text_encoder to false, or choose a LoRA trained with the text encoder"
                   if part == "text_encoder" else "choose a LoRA with UNet layers")
            problems.append(f"it has no {label} LoRA layers: {fix}")
            continue
        choices = UNET_TARGETS if part == "unet" else TEXT_ENCODER_TARGETS
        declared = init.header.metadata.get(f"dreambooth.{target_key}") or _guess_target(sorted(modules), choices)
        if declared and declared != target:
            problems.append(f"its {label} layers are {target_key} '{declared}', this training's are '{target}': "
                            f"set {target_key} to '{declared}'")
        ranks = sorted({m.rank for m in modules.values()})
        if len(ranks) > 1:
            problems.append(f"its {label} layers have different ranks ({', '.join(map(str, ranks))}); this trainer "
                            f"uses one {rank_key} for all of them: choose a LoRA with one rank")
        elif ranks[0] != rank:
            problems.append(f"the file has {label} rank {ranks[0]}, {rank_key} is {rank}: set {rank_key} to {ranks[0]}")
        problems += _alpha_problems(init, list(modules.values()), label, alpha_key, alpha)
    if problems:
        raise _init_error(f"{init.path.name} does not fit this training: " + "; ".join(problems))
    return notes


def load_init_lora(init: InitLora, unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
                   spec: Family, config: Any) -> str:
    """Copy ``init``'s weights into the freshly made LoRA layers; the status line that says so.

    ``text_encoders`` is empty when no text-encoder LoRA is trained. Runs ``check_init_lora`` first, then
    compares the file's layers and shapes with the model's: a file of another model family (or with
    layers this model does not have) is a ConfigError naming them.
    """
    check_init_lora(init, config, spec)
    targets = kohya_modules(unet, text_encoders, spec)
    problems: list[str] = []
    used: dict[str, InitModule] = {}
    for part in _used_parts(config):
        modules = init.part(part)
        used.update(modules)
        wanted = {k for k, (p, _) in targets.items() if p == part}
        extra, missing = sorted(set(modules) - wanted), sorted(wanted - set(modules))
        if extra or missing:
            problems.append(_layer_problem(_PART_NAMES[part], extra, missing, len(wanted),
                                           *_part_settings(config, part)[4:]))
        else:
            problems += _shape_problems(init, {k: targets[k][1] for k in sorted(modules)}, _PART_NAMES[part])
    if problems:
        raise _init_error(f"{init.path.name} does not fit this training: " + "; ".join(problems))
    with torch.no_grad():
        for key, module in used.items():
            layer = targets[key][1]
            for weight, tensor_name in ((layer.lora_A[ADAPTER].weight, module.down),
                                        (layer.lora_B[ADAPTER].weight, module.up)):
                weight.copy_(_read_tensor(init, tensor_name).to(weight.device, weight.dtype))
    counts = {p: sum(1 for m in used.values() if m.part == p) for p in ("unet", "text_encoder")}
    ranks_text = f"rank {config.rank}"
    if counts["text_encoder"] and config.text_encoder_rank != config.rank:
        ranks_text += f", text-encoder rank {config.text_encoder_rank}"
    return (f"starting from LoRA {init.path.name} ({counts['unet']} UNet + {counts['text_encoder']} text-encoder "
            f"modules, {ranks_text})")


def _layer_problem(label: str, extra: list[str], missing: list[str], total: int, target_key: str,
                   target: str) -> str:
    """The file's layers of one part are not this model's although their kind (target) matches."""
    found = []
    if extra:
        found.append(f"{len(extra)} {label} layers this model does not have (e.g. {', '.join(extra[:3])})")
    if missing:
        found.append(f"lacks {len(missing)} of this training's {total} {label} layers (e.g. {', '.join(missing[:3])})")
    return (f"it has {' and '.join(found)}: it was trained on another base model family or with other "
            f"{target_key} layers; choose a LoRA trained on this base model with {target_key} '{target}'")


def _alpha_problems(init: InitLora, modules: list[InitModule], label: str, alpha_key: str,
                    alpha: float) -> list[str]:
    values = sorted({_read_tensor(init, m.alpha).float().item() if m.alpha else float(m.rank) for m in modules})
    if values[-1] - values[0] > 1e-3 * max(1.0, abs(values[-1])):
        return [f"its {label} layers have different alphas ({', '.join(map(_alpha_text, values))}); this trainer "
                f"uses one {alpha_key}: choose a LoRA with one alpha"]
    # The LoRA's effect is (alpha / rank) * up @ down: under another alpha the same weights would mean a
    # stronger or weaker LoRA than the one the file holds, so this is an error, not a silent rescale.
    if abs(values[0] - alpha) > 1e-3 * max(1.0, abs(alpha)):
        return [f"the file has {label} alpha {_alpha_text(values[0])}, {alpha_key} is {_alpha_text(alpha)}: set "
                f"{alpha_key} to {_alpha_text(values[0])}"]
    return []


def _shape_problems(init: InitLora, layers: dict[str, Any], label: str) -> list[str]:
    for key, layer in layers.items():
        module = init.modules[key]
        for tensor_name, weight in ((module.down, layer.lora_A[ADAPTER].weight),
                                    (module.up, layer.lora_B[ADAPTER].weight)):
            shape = init.header.tensors[tensor_name].shape
            if tuple(shape) != tuple(weight.shape):
                return [f"{label} layer {key} has shape {list(shape)} in the file, {list(weight.shape)} in this "
                        "model: it was trained on another base model family (e.g. SD2 instead of SD1); choose a "
                        "LoRA trained on this base model"]
    return []


def _read_tensor(init: InitLora, name: str) -> torch.Tensor:
    entry = init.header.tensors[name]
    try:
        raw = read_tensor_bytes(init.header, name)
    except SafetensorsFileError as exc:
        raise _init_error(f"{exc.path}: {exc.problem}. {exc.fix}, {_FROM_ZERO}") from exc
    if not raw:
        return torch.zeros(entry.shape, dtype=_ALPHA_DTYPES[entry.dtype])
    tensor = torch.frombuffer(raw, dtype=_ALPHA_DTYPES[entry.dtype]).reshape(entry.shape)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise _init_error(f"{init.path.name}: tensor {name} holds NaN or infinite values (the LoRA it was saved "
                          f"from had diverged); choose another LoRA file, {_FROM_ZERO}")
    return tensor
