"""Loading Stable Diffusion 1.x / 2.x / XL base models, offline only.

A single-file checkpoint (what users keep in ComfyUI's ``models/checkpoints``) is converted with
diffusers' own LDM converters, but the UNet, VAE and text-encoder *configs* are read off the
tensor shapes (as ComfyUI does) instead of being fetched from the hub. That keeps loading offline
and lets the same code path load a real SD1.5 file and the tiny test checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import ConfigError
from .families import Family, family
from .fileio import sha256_file
from .safetensors_file import SafetensorsFileError, read_tensor_into
from .safetensors_file import read_header as read_safetensors_header
from .tokenizer import load_tokenizer, tokenizers_for

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"
SUPPORTED = "Stable Diffusion 1.x, 2.x and SDXL (single-file .safetensors/.ckpt or a diffusers folder)"
# SDXL's UNet embeds each of its six size / crop numbers in this many channels (diffusers'
# addition_time_embed_dim); with the 1280-wide pooled prompt that makes label_emb's 2816 inputs.
SDXL_TIME_EMBED_DIM = 256
# SD's standard noise schedule, shared by 1.x and 2.x.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def force_offline() -> None:
    """The engine never talks to a model hub: a missing file must be an error, not a download."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass
class BaseModel:
    family: str  # "sd1", "sd2" or "sdxl" (families.FAMILIES)
    prediction_type: str  # "epsilon" or "v_prediction"
    tokenizers: list[Any]  # one per text encoder, in the model's order
    # One per text encoder (SDXL: CLIP-L, OpenCLIP bigG); emptied when the prompts are cached and the
    # encoders freed.
    text_encoders: list[torch.nn.Module]
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: Any
    name: str
    sha256_future: Future[str]

    @property
    def sha256(self) -> str:
        return self.sha256_future.result()

    @property
    def spec(self) -> Family:
        return family(self.family)


# --- reading checkpoints ---------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazySafetensors(Mapping[str, torch.Tensor]):
    """A .safetensors file as a read-only mapping that reads each tensor when it is asked for.

    Tensors are read with plain file reads rather than through a memory map: converting component
    by component then keeps peak memory near the size of the fp32 models, not the half-precision
    file (mapped and touched) *plus* the fp32 models. The header is checked against the file's size
    first (``safetensors_file``): a half-downloaded checkpoint is a config error naming ``setting``,
    never tensors read back as zeros.

    With ``load_dtype`` every floating-point tensor comes back in that dtype. It is read into one
    reused scratch buffer and converted straight into its final tensor, so each weight touches fresh
    memory once: on a CPU, first-touch page faults cost more than the fp16 -> fp32 conversion itself,
    and a half-precision copy per tensor doubled the time to load a 2 GB checkpoint. The file stays
    open between reads until ``release()``. 4-D floating-point tensors (convolution weights) come back
    in ``conv_memory_format``. ``reading(dtype, layout)`` sets both for the tensors read inside it.
    """

    def __init__(self, path: Path, setting: str = "pretrained_model", *, load_dtype: torch.dtype | None = None) -> None:
        self._setting = setting
        try:
            self._header = read_safetensors_header(path)
        except SafetensorsFileError as exc:
            raise ConfigError(setting, str(exc)) from exc
        self._path = path
        self._entries = self._header.tensors
        self._load_dtype = load_dtype
        self._file: BinaryIO | None = None
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self.conv_memory_format = torch.contiguous_format
        for key, entry in self._entries.items():
            if entry.dtype not in _SAFETENSORS_DTYPES:
                raise ConfigError(setting, f"{path.name}: unsupported tensor type {entry.dtype} ({key})")

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        dtype = _SAFETENSORS_DTYPES[entry.dtype]
        size = entry.end - entry.begin
        convert = self._load_dtype is not None and dtype.is_floating_point and dtype != self._load_dtype
        if not size:
            return torch.empty(entry.shape, dtype=self._load_dtype if convert else dtype)
        layout = self.conv_memory_format if len(entry.shape) == 4 and dtype.is_floating_point else None
        if not convert and layout in (None, torch.contiguous_format):
            raw = torch.empty(size, dtype=torch.uint8)  # not zero-filled: the read is its first touch
            self._read(key, raw)
            return raw.view(dtype).reshape(entry.shape)
        if self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=torch.uint8)
        raw = self._scratch[:size]
        self._read(key, raw)
        out = torch.empty(entry.shape, dtype=self._load_dtype if convert else dtype,
                          memory_format=layout or torch.contiguous_format)
        out.copy_(raw.view(dtype).reshape(entry.shape))
        return out

    @contextlib.contextmanager
    def reading(self, dtype: torch.dtype | None, layout: torch.memory_format = torch.contiguous_format) -> Iterator[None]:
        """Tensors read inside come back in ``dtype`` (None: the file's) and, for convolution weights,
        ``layout``; what was set before is set again after."""
        before = self._load_dtype, self.conv_memory_format
        self._load_dtype, self.conv_memory_format = dtype, layout
        try:
            yield
        finally:
            self._load_dtype, self.conv_memory_format = before

    def _read(self, key: str, into: torch.Tensor) -> None:
        try:
            if self._file is None:
                self._file = self._path.open("rb", buffering=0)
            read_tensor_into(self._header, key, self._file, memoryview(into.numpy()))
        except OSError as exc:
            raise ConfigError(self._setting, f"{self._path} cannot be read ({exc.strerror or exc})") from exc
        except SafetensorsFileError as exc:
            raise ConfigError(self._setting, str(exc)) from exc

    def release(self) -> None:
        """Close the file and free the scratch buffer (reading again reopens the file)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._entries.items()}


def read_state_dict(path: Path, *, load_dtype: torch.dtype | None = None) -> Mapping[str, torch.Tensor]:
    """The file's tensors by name; with ``load_dtype`` a .safetensors file's floating-point tensors are read
    in that dtype (see LazySafetensors)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return LazySafetensors(path, load_dtype=load_dtype)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise ConfigError(
                "pretrained_model",
                f"{path} could not be read as plain weights ({exc.__class__.__name__}). Only tensors are "
                "loaded from .ckpt files, for safety; convert it to .safetensors.",
            ) from exc
        return data.get("state_dict", data) if isinstance(data, dict) else data
    raise ConfigError("pretrained_model", f"{path}: unsupported file type '{suffix}'. Supported: {SUPPORTED}.")


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """'sd1', 'sd2' or 'sdxl' from tensor names and shapes; anything else is a clear error."""
    keys = shapes.keys()
    if SDXL_LABEL_EMB in shapes or any(k.startswith("conditioner.embedders.") for k in keys):
        return _detect_sdxl(shapes)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        family = "Flux/SD3/other DiT" if any(k.startswith(("double_blocks", "joint_blocks", "model.diffusion_model.joint")) for k in keys) else "unknown"
        raise ConfigError("pretrained_model", f"no Stable Diffusion UNet found (looks like: {family}); supported: {SUPPORTED}.")
    attn2 = [s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if not attn2:
        raise ConfigError("pretrained_model", f"UNet has no cross-attention layers; supported: {SUPPORTED}.")
    context_dim = attn2[0][1]
    if context_dim == 768 and any(k.startswith(CLIP_L_PREFIX) for k in keys):
        return "sd1"
    if context_dim == 1024 and any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "sd2"
    raise ConfigError(
        "pretrained_model",
        f"unsupported model: cross-attention width {context_dim} with this text encoder; supported: {SUPPORTED}.",
    )


def _detect_sdxl(shapes: Mapping[str, tuple[int, ...]]) -> str:
    keys = shapes.keys()
    has_l = any(k.startswith(SDXL_CLIP_L_PREFIX) for k in keys)
    has_g = any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in keys)
    if not (has_l and has_g):
        # The refiner has only the OpenCLIP encoder; a UNet-only file has neither.
        what = "the SDXL refiner" if has_g else "an SDXL file without its text encoders"
        raise ConfigError("pretrained_model", f"this looks like {what}; DreamBooth needs the SDXL base model with "
                                              f"both text encoders (CLIP-L and OpenCLIP bigG). Supported: {SUPPORTED}.")
    label = shapes.get(SDXL_LABEL_EMB)
    context = [s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if label is None or not context or context[0][1] != 2048:
        raise ConfigError("pretrained_model", f"unsupported SDXL variant (UNet without SDXL's size conditioning or "
                                              f"2048-wide cross-attention); supported: {SUPPORTED}.")
    return "sdxl"


def detect_prediction_type(state_dict: Mapping[str, torch.Tensor], family: str) -> str:
    if family == "sd1":
        return "epsilon"
    if family == "sdxl":
        keys = state_dict.keys()
        if "edm_mean" in keys or any(k.startswith("edm_vpred.") for k in keys):
            raise ConfigError("pretrained_model", "EDM-schedule SDXL models (Playground v2.5, EDM v-prediction "
                                                  "fine-tunes) are not supported; use an epsilon or v-prediction "
                                                  "SDXL model.")
        # The marker key SDXL v-prediction fine-tunes carry (ComfyUI reads the same one).
        return "v_prediction" if "v_pred" in keys else "epsilon"
    # The heuristic ComfyUI uses: SD2 768-v models have a much wider spread in the first norm bias
    # of the last output block's transformer. ComfyUI names output_blocks.11, which is the last
    # block of every real SD2 UNet (4 levels x 3 blocks), so reading the last block present gives
    # the same answer on real files and still works on shallower UNets (the tiny test model's).
    in_channels = state_dict[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1]
    output_block = re.compile(rf"{re.escape(UNET_PREFIX)}output_blocks\.(\d+)\.")
    last = max((int(m.group(1)) for k in state_dict if (m := output_block.match(k))), default=11)
    bias = state_dict.get(f"{UNET_PREFIX}output_blocks.{last}.1.transformer_blocks.0.norm1.bias")
    if in_channels == 4 and bias is not None and torch.std(bias.float(), unbiased=False) > 0.09:
        return "v_prediction"
    return "epsilon"


def _count(keys: list[str], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def unet_config_from_ldm(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config read off LDM tensor shapes."""
    p = UNET_PREFIX
    keys = [k for k in sd if k.startswith(p)]
    conv_in = sd[p + "input_blocks.0.0.weight"]
    model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    levels: list[dict[str, Any]] = [{"res": 0, "attn": False, "depth": 1, "ch": model_channels}]
    block = 1
    while any(k.startswith(f"{p}input_blocks.{block}.") for k in keys):
        if f"{p}input_blocks.{block}.0.op.weight" in sd:  # downsample closes a level
            levels.append({"res": 0, "attn": False, "depth": 1, "ch": None})
        else:
            level = levels[-1]
            level["res"] += 1
            level["ch"] = sd[f"{p}input_blocks.{block}.0.out_layers.3.weight"].shape[0]
            if f"{p}input_blocks.{block}.1.proj_in.weight" in sd:
                level["attn"] = True
                level["depth"] = _count(keys, rf"{re.escape(p)}input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\.")
        block += 1
    proj_in = next(sd[k] for k in keys if k.endswith("1.proj_in.weight"))
    context_dim = next(sd[k] for k in keys if k.endswith("attn2.to_k.weight")).shape[1]
    channels = [lv["ch"] for lv in levels]
    depths = [lv["depth"] for lv in levels]
    if family == "sd1":
        heads: int | list[int] = 8
    else:
        heads = [c // 64 for c in channels]
    down = ["CrossAttnDownBlock2D" if lv["attn"] else "DownBlock2D" for lv in levels]
    up = ["CrossAttnUpBlock2D" if lv["attn"] else "UpBlock2D" for lv in reversed(levels)]
    has_mid_attn = f"{p}middle_block.1.proj_in.weight" in sd
    extra: dict[str, Any] = {}
    if family == "sdxl":
        label_inputs = sd[SDXL_LABEL_EMB].shape[1]
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
                 "projection_class_embeddings_input_dim": label_inputs}
    return {
        **extra,
        "sample_size": {"sd1": 64, "sd2": 96}.get(family, 128),
        "in_channels": in_channels,
        "out_channels": sd[p + "out.2.weight"].shape[0],
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": levels[0]["res"],
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": proj_in.ndim == 2,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if has_mid_attn else None,
    }


def vae_config_from_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    p = VAE_PREFIX + "encoder."
    keys = [k for k in sd if k.startswith(p)]
    n_levels = _count(keys, rf"{re.escape(p)}down\.(\d+)\.")
    n_res = _count(keys, rf"{re.escape(p)}down\.0\.block\.(\d+)\.")
    channels = [sd[f"{p}down.{i}.block.{n_res - 1}.conv2.weight"].shape[0] for i in range(n_levels)]
    return {
        "in_channels": sd[p + "conv_in.weight"].shape[1],
        "out_channels": sd[VAE_PREFIX + "decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * n_levels,
        "up_block_types": ["UpDecoderBlock2D"] * n_levels,
        "block_out_channels": channels,
        "layers_per_block": n_res,
        "latent_channels": sd[p + "conv_out.weight"].shape[0] // 2,
        "sample_size": 512,
        "scaling_factor": 0.18215,  # SDXL's 0.13025 is set by the caller, which knows the family
    }


def _text_encoders_from_ldm(sd: Mapping[str, torch.Tensor], family: str,
                            dtype: torch.dtype = torch.float32) -> list[torch.nn.Module]:
    """The family's text encoders, configs read off the tensor shapes: SD1 CLIP-L; SD2 OpenCLIP ViT-H
    (penultimate layer); SDXL CLIP-L and OpenCLIP bigG with its projection (the pooled embedding)."""
    if family == "sd1":
        return [_clip_l_from_ldm(sd, CLIP_L_PREFIX, dtype)]
    if family == "sd2":
        return [_open_clip_from_ldm(sd, OPEN_CLIP_PREFIX, penultimate=True, dtype=dtype)]
    return [_clip_l_from_ldm(sd, SDXL_CLIP_L_PREFIX, dtype),
            _open_clip_from_ldm(sd, SDXL_OPEN_CLIP_PREFIX, penultimate=False, dtype=dtype)]


def _clip_l_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    converted = sfu.convert_ldm_clip_checkpoint(sd, remove_prefix=prefix)
    hidden = converted["text_model.embeddings.token_embedding.weight"].shape[1]
    n_layers = _count(list(converted), r"text_model\.encoder\.layers\.(\d+)\.")
    config = CLIPTextConfig(
        vocab_size=converted["text_model.embeddings.token_embedding.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=converted["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=n_layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=converted["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
        projection_dim=hidden,
    )
    with torch.device("meta"):
        model = CLIPTextModel(config).to(dtype)
    _load_into(model, converted, what="text encoder")
    return model


def _open_clip_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str, *, penultimate: bool,
                        dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An OpenCLIP text tower as transformers' CLIP. ``penultimate``: SD2 conditions on the penultimate
    layer and diffusers drops the last block, as here; SDXL keeps every block, because its pooled
    embedding is the last layer's end token through ``text_projection``."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width = sd[prefix + "token_embedding.weight"].shape[1]
    n_blocks = _count(list(sd), rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    projection = sd[prefix + "text_projection"].shape[1] if prefix + "text_projection" in sd else 512
    config = CLIPTextConfig(
        vocab_size=sd[prefix + "token_embedding.weight"].shape[0],
        hidden_size=width,
        intermediate_size=sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=n_blocks - 1 if penultimate else n_blocks,
        num_attention_heads=width // 64,
        max_position_embeddings=sd[prefix + "positional_embedding"].shape[0],
        hidden_act="gelu",
        projection_dim=projection,
    )
    cls = CLIPTextModel if penultimate else CLIPTextModelWithProjection
    with torch.device("meta"):
        probe = cls(config)
    converted = sfu.convert_open_clip_checkpoint(probe, sd, prefix=prefix)
    with torch.device("meta"):
        model = cls(config).to(dtype)
    _load_into(model, converted, what="text encoder")
    return model


def _persistent_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The names state_dict() would give, without its per-tensor detach (a quarter second for a
    meta-device SD1.5 UNet, which is all that is asked of it here: names, shapes, dtypes)."""
    tensors = dict(module.named_parameters())
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                tensors[f"{prefix}.{name}" if prefix else name] = buf
    return tensors


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Load converted weights, matching transformers 4.x ('text_model.' level) and 5.x (none).

    ``state`` is emptied as it is read, so each half-precision tensor is freed once cast.
    """
    expected = _persistent_tensors(module)
    fixed: dict[str, torch.Tensor] = {}
    while state:
        key, value = state.popitem()
        if key not in expected and key.startswith("text_model.") and key[len("text_model."):] in expected:
            key = key[len("text_model."):]
        if key in expected:
            fixed[key] = value.to(expected[key].dtype)
    missing = [k for k in expected if k not in fixed and not k.endswith("position_ids")]
    if missing:
        raise ConfigError("pretrained_model", f"{what} weights incomplete: {len(missing)} missing, e.g. {missing[:3]}")
    for key, value in fixed.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConfigError("pretrained_model", f"{what} tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    # Buffers such as position_ids are not in the file: materialise them before assigning.
    for name, buf in list(module.named_buffers()):
        if name not in fixed:
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("position_ids"):
                owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    module.load_state_dict(fixed, strict=False, assign=True)


VAE_DECODER_PARTS = ("decoder", "post_quant_conv")


def drop_vae_decoder(vae: torch.nn.Module) -> None:
    """Training only encodes; without validation samples or class images the decoder (~60% of the
    VAE) would be dead weight in memory."""
    for name in VAE_DECODER_PARTS:
        if hasattr(vae, name):
            delattr(vae, name)


class _Placeholders(Mapping[str, torch.Tensor]):
    """``lazy`` with the tensors under ``prefixes`` given as meta tensors of their real shape (never read)."""

    def __init__(self, lazy: LazySafetensors, prefixes: tuple[str, ...]) -> None:
        self._lazy, self._prefixes, self._shapes = lazy, prefixes, lazy.shapes()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key.startswith(self._prefixes):
            return torch.empty(self._shapes[key], device="meta")
        return self._lazy[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._lazy)

    def __len__(self) -> int:
        return len(self._lazy)


class _SingleFileSource:
    def __init__(self, path: Path) -> None:
        # Tensors are read in the dtype of the component being built (``_reading``), fp32 by default.
        self.sd = read_state_dict(path, load_dtype=torch.float32)
        shapes = self.sd.shapes() if isinstance(self.sd, LazySafetensors) else {k: tuple(v.shape) for k, v in self.sd.items()}
        self.family = detect_family(shapes)
        self.prediction = detect_prediction_type(self.sd, self.family)
        self._release()

    def _release(self) -> None:
        """Between components: no open file or scratch buffer held while the caller trains."""
        if isinstance(self.sd, LazySafetensors):
            self.sd.release()

    @contextlib.contextmanager
    def _reading(self, dtype: torch.dtype, layout: torch.memory_format = torch.contiguous_format) -> Iterator[None]:
        """Read the tensors of the component being built straight in its dtype (and convolution
        weights in ``layout``): an fp16 file trained in fp16 is never widened to fp32 and back - for
        SDXL's UNet that is 10 GB of RAM and seconds of copying saved."""
        if not isinstance(self.sd, LazySafetensors):
            yield  # a .ckpt's tensors are in memory already; _load_into casts them once
            return
        with self.sd.reading(dtype, layout):
            yield

    def unet(self, channels_last: bool, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel
        from diffusers.loaders import single_file_utils as sfu

        cfg = unet_config_from_ldm(self.sd, self.family)
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg).to(dtype)
        lazy = isinstance(self.sd, LazySafetensors)
        # Read straight into the channels-last layout: no second copy.
        with self._reading(dtype, torch.channels_last if channels_last else torch.contiguous_format):
            _load_into(unet, sfu.convert_ldm_unet_checkpoint(self.sd, cfg), what="UNet")
        self._release()
        return unet.to(memory_format=torch.channels_last) if channels_last and not lazy else unet

    def vae(self, decoder: bool) -> torch.nn.Module:
        from diffusers import AutoencoderKL
        from diffusers.loaders import single_file_utils as sfu

        cfg = {**vae_config_from_ldm(self.sd), "scaling_factor": family(self.family).vae_scaling}
        with torch.device("meta"):
            vae = AutoencoderKL(**cfg)
        source: Mapping[str, torch.Tensor] = self.sd
        if not decoder and isinstance(self.sd, LazySafetensors):
            # The converter touches every VAE key; the decoder's come back as shape-only placeholders, so
            # ~100M weights (0.3 GB in fp32) are never read only to be dropped below.
            source = _Placeholders(self.sd, tuple(VAE_PREFIX + part for part in VAE_DECODER_PARTS))
        state = sfu.convert_ldm_vae_checkpoint(source, cfg)
        if not decoder:
            drop_vae_decoder(vae)
            state = {k: v for k, v in state.items() if not k.startswith(VAE_DECODER_PARTS)}
        _load_into(vae, state, what="VAE")
        self._release()
        return vae

    def text_encoders(self, dtype: torch.dtype) -> list[torch.nn.Module]:
        with self._reading(dtype):
            models = _text_encoders_from_ldm(self.sd, self.family, dtype)
        self._release()
        return models


class _DiffusersFolderSource:
    def __init__(self, path: Path) -> None:
        from diffusers import UNet2DConditionModel

        missing = [sub for sub in ("unet", "vae", "text_encoder") if not (path / sub).is_dir()]
        if missing:
            raise ConfigError("pretrained_model", f"{path} is not a diffusers model folder (missing {', '.join(missing)}/).")
        self.path = path
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", local_files_only=True)
        context, addition = unet_config.get("cross_attention_dim"), unet_config.get("addition_embed_type")
        if context == 2048 and addition == "text_time":
            if not (path / "text_encoder_2").is_dir():
                raise ConfigError("pretrained_model", f"{path} is an SDXL folder without text_encoder_2/ (the refiner?); "
                                                      "DreamBooth needs the SDXL base model with both text encoders.")
            self.family = "sdxl"
        elif context in (768, 1024) and not addition:
            self.family = "sd1" if context == 768 else "sd2"
        else:
            raise ConfigError("pretrained_model", f"unsupported UNet in {path}; supported: {SUPPORTED}.")
        self.prediction = "epsilon"
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            self.prediction = json.loads(sched.read_text(encoding="utf-8")).get("prediction_type", "epsilon")

    def unet(self, channels_last: bool, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        # The asked dtype whatever the folder stores (SDXL folders are often fp16; transformers 5 keeps a
        # file's dtype).
        unet = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", local_files_only=True).to(dtype)
        return unet.to(memory_format=torch.channels_last) if channels_last else unet

    def vae(self, decoder: bool) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", local_files_only=True).float()
        if not decoder:
            drop_vae_decoder(vae)
        return vae

    def text_encoders(self, dtype: torch.dtype) -> list[torch.nn.Module]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        first = CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", local_files_only=True).to(dtype)
        if self.family != "sdxl":
            return [first]
        return [first, CLIPTextModelWithProjection.from_pretrained(self.path, subfolder="text_encoder_2",
                                                                   local_files_only=True).to(dtype)]


class ModelSource:
    """A base model opened for loading: each component is built when asked for, frozen, on the CPU, in
    fp32 unless asked for another dtype (the VAE always in fp32). Loading one at a time lets a caller
    free what it no longer needs (e.g. the text encoder once prompt embeddings are cached) before the
    next one is in memory."""

    def __init__(self, pretrained: str, *, prediction_type: str = "auto", cache_dir: Path | None = None) -> None:
        force_offline()
        path = Path(pretrained).expanduser()
        if not path.exists():
            raise ConfigError("pretrained_model", f"{path} does not exist. Supported: {SUPPORTED}.")
        # Hashing a 2 GB checkpoint takes a second or two; hashlib releases the GIL, so it overlaps
        # with loading instead of delaying the first step.
        hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-hash")
        self.sha256_future = hasher.submit(file_sha256, path, cache_dir)
        hasher.shutdown(wait=False)
        self._impl: _SingleFileSource | _DiffusersFolderSource = (
            _DiffusersFolderSource(path) if path.is_dir() else _SingleFileSource(path))
        self.name = path.name
        self.family = self._impl.family
        self.prediction_type = self._impl.prediction if prediction_type == "auto" else prediction_type

    @property
    def spec(self) -> Family:
        return family(self.family)

    @staticmethod
    def _frozen(module: torch.nn.Module) -> torch.nn.Module:
        module.requires_grad_(False)
        return module.eval()

    def unet(self, *, channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The UNet in ``dtype``; ``channels_last`` stores its convolution weights in NHWC layout
        (Runtime.channels_last)."""
        return self._frozen(self._impl.unet(channels_last, dtype))

    def vae(self, *, decoder: bool = True) -> torch.nn.Module:
        return self._frozen(self._impl.vae(decoder))

    def text_encoders(self, *, dtype: torch.dtype = torch.float32) -> list[torch.nn.Module]:
        """The family's text encoders in the model's order (SDXL: CLIP-L, then OpenCLIP bigG), in ``dtype``."""
        return [self._frozen(m) for m in self._impl.text_encoders(dtype)]

    def tokenizers(self) -> list[Any]:
        return tokenizers_for(self.family)

    def noise_scheduler(self) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler(**SCHEDULER_CONFIG, prediction_type=self.prediction_type)

    def assemble(self, *, text_encoders: list[torch.nn.Module], unet: Any, vae: Any) -> BaseModel:
        logger.info("loaded %s (%s, %s)", self.name, self.family, self.prediction_type)
        return BaseModel(family=self.family, prediction_type=self.prediction_type, tokenizers=self.tokenizers(),
                         text_encoders=text_encoders, unet=unet, vae=vae, noise_scheduler=self.noise_scheduler(),
                         name=self.name, sha256_future=self.sha256_future)


def import_model_libraries() -> None:
    """Import what loading a model imports (diffusers, transformers, peft: ~4 s on a CPU core) and
    read the SD1 tokenizer. A warm trainer does this before its config arrives."""
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import single_file_utils  # noqa: F401
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: F401

    load_tokenizer("sd1")


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 of a model file (folders: of their UNet weights), memoised by size and mtime."""
    target = path
    if path.is_dir():
        candidates = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*.bin"))
        if not candidates:
            return hashlib.sha256(str(path.resolve()).encode()).hexdigest()
        target = candidates[0]
    stat = target.stat()
    memo_key = f"{target.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = cache_dir / "model_hashes.json" if cache_dir else None
    memo: dict[str, str] = {}
    if memo_file and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = sha256_file(target)
    if memo_file:
        memo[memo_key] = digest
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1), encoding="utf-8")
        os.replace(tmp, memo_file)
    return digest


def load_base_model(pretrained: str, *, prediction_type: str = "auto", cache_dir: Path | None = None) -> BaseModel:
    """Load tokenizer, text encoder, UNet, VAE and the training noise scheduler, on the CPU in fp32."""
    source = ModelSource(pretrained, prediction_type=prediction_type, cache_dir=cache_dir)
    return source.assemble(text_encoders=source.text_encoders(), unet=source.unet(), vae=source.vae())
