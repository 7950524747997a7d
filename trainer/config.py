"""The training run's configuration: one validated dataclass, read from JSON.

Every knob has a ``help`` text (the CLI's ``--help`` and the node tooltips come from it). Unknown
keys and bad values are errors naming the key, never silently ignored: a typo in a shared workflow
must not train with a default the user did not choose.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value. ``key`` names the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config '{key}': {message}")
        self.key = key


UnetTarget = Literal["attn", "attn_ff", "full"]
TextEncoderTarget = Literal["attn", "attn_mlp"]
LrSchedule = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


# Settings that do not change the trained weights. gradient_checkpointing, attention and cache_latents
# compute the same training another way (a user who turns checkpointing on after running out of memory
# must still resume and reuse); device is where it runs.
NOT_IN_TRAINING_SIGNATURE = frozenset({
    "validation_prompts", "validation_steps", "validation_seed", "validation_inference_steps",
    "validation_guidance", "validation_negative_prompt", "output_path", "overwrite", "checkpointing_steps",
    "checkpoints_total_limit", "resume", "cache_dir", "lora_name", "identifier", "metadata", "device",
    "output_dir", "gradient_checkpointing", "attention", "cache_latents", "save_lora_every_n_steps",
    "intermediate_lora_dir", "extract_lora_rank", "extracted_lora_path",
})


def _help(text: str, *, min: float | None = None, max: float | None = None, **kwargs: Any) -> Any:
    """A field with its help text and, for numbers, its valid range (inclusive; None: unbounded).

    The range lives here only: validation reads it, and so do the node widgets (``bounds``), so the
    graph never offers a value the engine refuses, nor refuses one it accepts.
    """
    return field(metadata={"help": text, "min": min, "max": max}, **kwargs)


def bounds(name: str) -> tuple[float | None, float | None]:
    """(min, max) of a numeric setting, inclusive; None where it is unbounded."""
    meta = TrainConfig.__dataclass_fields__[name].metadata
    return meta.get("min"), meta.get("max")


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    pretrained_model: str = _help(
        "Base model: a single-file SD1.x/SD2.x checkpoint (.safetensors, or .ckpt read with "
        "weights_only) or a diffusers model folder.",
        default="",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = _help(
        "What the UNet predicts. 'auto' reads it from the checkpoint (SD2 768-v models are v-prediction).",
        default="auto",
    )
    # --- data --------------------------------------------------------------------------------
    instance_data_dir: str = _help("Folder of subject photos (3-20 is typical).", default="")
    instance_prompt: str = _help(
        "Prompt with a rare identifier naming the subject, e.g. 'a photo of zwx dog'.", default=""
    )
    use_captions: bool = _help(
        "Use a per-image '<name>.txt' caption instead of the instance prompt when one exists.", default=True
    )
    resolution: int = _help(
        "Training resolution in pixels: the side of the square crops, or with aspect_buckets the pixel budget "
        "of each bucket (about resolution x resolution).", default=512, min=64)
    crop: Literal["center", "random", "face"] = _help(
        "How the square (or bucket) is cut from each photo: 'center'; 'random' (a new crop each step, no latent "
        "caching); 'face' (centred on the largest detected face, whole face plus context; photos without a "
        "detected face are cut at the center, with a warning naming them).", default="center"
    )
    aspect_buckets: bool = _help(
        "Train each photo at the aspect ratio nearest its own (kohya-style buckets: sides multiples of 64 px "
        "between half and twice the resolution, never more pixels than resolution x resolution, e.g. 448x576 at "
        "512) instead of a square crop, so portraits keep heads and feet. Each batch holds one bucket; "
        "class images of prior preservation are cut to the batch's bucket.", default=False
    )
    random_flip: bool = _help("Randomly mirror images left-right (doubles the cached latents).", default=False)
    background: tuple[int, int, int] = _help(
        "RGB colour transparent images are composited on.", default=(255, 255, 255)
    )
    # --- prior preservation ------------------------------------------------------------------
    with_prior_preservation: bool = _help(
        "Add the paper's class-specific prior-preservation loss (keeps 'a dog' a generic dog).", default=False
    )
    class_prompt: str = _help("Prompt for the generic class, e.g. 'a photo of dog'.", default="")
    class_data_dir: str | None = _help(
        "Optional folder of class images; missing ones are generated by the frozen base model.", default=None
    )
    num_class_images: int = _help("How many class images to use (the paper uses 200 x number of subjects).", default=100,
                                   min=1)
    prior_loss_weight: float = _help("Weight (lambda) of the prior-preservation loss.", default=1.0, min=0.0)
    class_generation_steps: int = _help("Sampling steps when generating class images.", default=25, min=1)
    class_generation_guidance: float = _help("CFG scale when generating class images.", default=7.5, min=0.0)
    class_negative_prompt: str = _help("Negative prompt when generating class images.", default="")
    # --- LoRA --------------------------------------------------------------------------------
    training_method: Literal["lora", "full"] = _help(
        "'lora': train LoRA adapters (a small file; the default). 'full': fine-tune every UNet weight (and every "
        "text-encoder weight with train_text_encoder), the DreamBooth paper's original method; output_path is then "
        "a single-file checkpoint (a .safetensors base model is needed) and learning_rate / text_encoder_lr apply "
        "to all weights (the paper used 5e-6).", default="lora")
    extract_lora_rank: int = _help(
        "With training_method 'full': also save a LoRA of this rank extracted from the weight change (SVD), which "
        "any LoRA loader reads. 0: none.", default=0, min=0, max=1024)
    extracted_lora_path: str = _help(
        "Where the extracted LoRA goes. Default: beside output_path as <name>_lora_rank<R>.safetensors.", default="")
    rank: int = _help("UNet LoRA rank.", default=16, min=1)
    alpha: float = _help("UNet LoRA alpha (scale = alpha / rank).", default=16.0, min=0.01)
    unet_target: UnetTarget = _help(
        "UNet layers that get LoRA: 'attn' (q/k/v/out), 'attn_ff' (+ proj and feed-forward), "
        "'full' (+ resnet convs).",
        default="attn",
    )
    train_text_encoder: bool = _help("Also train a text-encoder LoRA.", default=True)
    text_encoder_rank: int | None = _help("Text-encoder LoRA rank (default: rank).", default=None, min=1)
    text_encoder_alpha: float | None = _help("Text-encoder LoRA alpha (default: alpha).", default=None, min=0.01)
    text_encoder_target: TextEncoderTarget = _help(
        "Text-encoder layers that get LoRA: 'attn' (q/k/v/out_proj) or 'attn_mlp' (+ fc1/fc2).",
        default="attn",
    )
    lora_dropout: float = _help("Dropout inside LoRA layers.", default=0.0, min=0.0, max=0.99)
    init_lora: str = _help(
        "Optional LoRA file (.safetensors, e.g. an earlier training of this subject) whose weights the new "
        "LoRA starts from instead of zero; its ranks and layers must match rank, text_encoder_rank, "
        "unet_target and text_encoder_target. Empty: start from zero.",
        default="",
    )
    # --- optimisation ------------------------------------------------------------------------
    max_train_steps: int = _help("Optimizer steps to train.", default=500, min=1)
    learning_rate: float = _help("UNet LoRA learning rate.", default=1e-4, min=1e-7)
    text_encoder_lr: float = _help("Text-encoder LoRA learning rate.", default=5e-5, min=0.0)
    lr_scheduler: LrSchedule = _help("Learning-rate schedule.", default="constant")
    lr_warmup_steps: int = _help("Linear warm-up steps.", default=0, min=0)
    optimizer: Literal["adamw", "adamw8bit"] = _help(
        "AdamW, or 8-bit AdamW (needs bitsandbytes and a GPU).", default="adamw"
    )
    adam_beta1: float = _help("AdamW beta1.", default=0.9, min=0.0, max=0.9999)
    adam_beta2: float = _help("AdamW beta2.", default=0.999, min=0.0, max=0.9999)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8, min=1e-10)
    weight_decay: float = _help("AdamW weight decay.", default=1e-2, min=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", default=1.0, min=0.0)
    train_batch_size: int = _help("Instance images per micro-batch (class images are added on top).", default=1,
                                  min=1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1, min=1)
    gradient_checkpointing: bool = _help("Trade compute for memory in the UNet and text encoder.", default=False)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _help(
        "Compute precision. 'auto' = bf16 on GPUs with native bf16, else fp16 with loss scaling on GPU; "
        "fp32 on the CPU and the Apple GPU (MPS).",
        default="auto",
    )
    attention: Literal["auto", "sdpa", "xformers"] = _help(
        "Attention kernel. 'auto' = xformers when installed on a GPU, else PyTorch SDPA.", default="auto"
    )
    min_snr_gamma: float = _help("Min-SNR loss weighting gamma (0 disables; 5 is the paper's value).", default=0.0,
                                min=0.0)
    noise_offset: float = _help("Noise offset (helps very dark/bright images; 0.05-0.1). 0 disables.", default=0.0,
                               min=0.0)
    cache_latents: bool = _help("Encode images with the VAE once and free it (faster, less memory).", default=True)
    seed: int = _help("Seed for everything random: same seed and data give the same LoRA.", default=0)
    device: str = _help("'auto' (a CUDA GPU, else the Apple GPU (MPS), else the CPU; the log says which and "
                        "why), 'cpu', 'cuda', 'cuda:N' or 'mps'.", default="auto")
    # --- validation samples ------------------------------------------------------------------
    validation_prompts: list[str] = _help("Prompts to sample during training.", default_factory=list)
    validation_steps: int = _help("Sample every N steps (0: only at the end).", default=0, min=0)
    validation_seed: int = _help("Seed for validation samples (fixed, so samples are comparable).", default=1234)
    validation_inference_steps: int = _help("Sampling steps for validation images.", default=25, min=1)
    validation_guidance: float = _help("CFG scale for validation images.", default=7.5, min=0.0)
    validation_negative_prompt: str = _help("Negative prompt for validation images.", default="")
    # --- checkpoints and output --------------------------------------------------------------
    output_dir: str = _help("Run folder: checkpoints, samples and logs go here.", default="")
    output_path: str = _help("Final LoRA file (.safetensors); with training_method 'full' the single-file checkpoint. "
                             "Default: <output_dir>/lora.safetensors (model.safetensors).", default="")
    overwrite: bool = _help("Replace an existing output_path (otherwise that is an error).", default=False)
    checkpointing_steps: int = _help("Save a resumable checkpoint every N steps (0 disables).", default=0, min=0)
    checkpoints_total_limit: int = _help(
        "Keep only the newest K checkpoints of this training (0 keeps all); checkpoints of other trainings "
        "in output_dir are left alone.", default=2, min=0)
    resume: str = _help(
        "'auto' continues from the newest checkpoint in output_dir that is this training (same base model "
        "and images by content, same settings) at or below max_train_steps, and whose learning-rate "
        "schedule allows it; 'none' starts fresh; or a checkpoint folder path.",
        default="auto",
    )
    save_lora_every_n_steps: int = _help(
        "Also save the LoRA every N steps as a file of its own in intermediate_lora_dir (the same format and "
        "metadata as the final LoRA, with its step), to compare the stages of a training; the last step is the "
        "final LoRA itself. 0 disables.", default=0, min=0)
    intermediate_lora_dir: str = _help(
        "Folder of the LoRAs saved every save_lora_every_n_steps steps, named "
        "<output_path's name>_step<NNNNNN>.safetensors. Default: <output_dir>/loras.", default="")
    cache_dir: str = _help(
        "Shared cache (generated class images, model hashes). Default: <output_dir>/cache.", default=""
    )
    save_precision: Literal["fp16", "bf16", "fp32"] = _help(
        "Precision of the saved LoRA tensors (fp16 halves the file; training is unaffected).", default="fp16"
    )
    lora_name: str = _help("Name written into the LoRA metadata.", default="")
    identifier: str = _help("The rare identifier in the instance prompt (metadata only).", default="")
    metadata: dict[str, str] = _help("Extra string metadata written into the LoRA header.", default_factory=dict)

    def __post_init__(self) -> None:
        self._check_required()
        self._check_ranges()
        self._fill_defaults()

    # --- validation ------------------------------------------------------------------------------
    def _check_required(self) -> None:
        for key in ("pretrained_model", "instance_data_dir", "instance_prompt", "output_dir"):
            if not str(getattr(self, key)).strip():
                raise ConfigError(key, "is required and empty")
        if self.with_prior_preservation and not self.class_prompt.strip():
            raise ConfigError("class_prompt", "is required when with_prior_preservation is true (e.g. 'a photo of dog')")

    def _check_ranges(self) -> None:
        for f in dataclasses.fields(self):
            low, high = f.metadata.get("min"), f.metadata.get("max")
            value = getattr(self, f.name)
            if value is None or (low is None and high is None):
                continue
            if low is not None and value < low:
                raise ConfigError(f.name, f"must be >= {low:g}, got {value:g}")
            if high is not None and value > high:
                raise ConfigError(f.name, f"must be <= {high:g}, got {value:g}")
        # Cross-field and non-numeric rules, which a range cannot say.
        if self.resolution % 8:
            raise ConfigError("resolution", f"must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        if any(not 0 <= c <= 255 for c in self.background):
            raise ConfigError("background", f"must be three values 0-255, got {list(self.background)}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise ConfigError("device", f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        for key in ("output_path", "extracted_lora_path"):
            value = getattr(self, key)
            if value and not value.endswith(".safetensors"):
                raise ConfigError(key, f"must end in .safetensors, got {value!r}")
        if self.training_method == "full":
            for key, why in (("init_lora", "a full fine-tune starts from the base model's weights"),
                             ("save_lora_every_n_steps", "intermediate files are LoRAs; a full fine-tune saves "
                                                         "one checkpoint at the end")):
                if getattr(self, key):
                    raise ConfigError(key, f"cannot be used with training_method 'full' ({why}); clear it or "
                                      "use training_method 'lora'")
        elif self.extract_lora_rank:
            raise ConfigError("extract_lora_rank", "extracts a LoRA from a full fine-tune; set training_method "
                              "'full', or 0 (a LoRA training already saves a LoRA)")

    def _fill_defaults(self) -> None:
        if not self.output_path:
            name = "model.safetensors" if self.training_method == "full" else "lora.safetensors"
            self.output_path = str(Path(self.output_dir) / name)
        if self.extract_lora_rank and not self.extracted_lora_path:
            out = Path(self.output_path)
            self.extracted_lora_path = str(out.with_name(f"{out.stem}_lora_rank{self.extract_lora_rank}.safetensors"))
        if not self.cache_dir:
            self.cache_dir = str(Path(self.output_dir) / "cache")
        if not self.intermediate_lora_dir:
            self.intermediate_lora_dir = str(Path(self.output_dir) / "loras")
        if self.text_encoder_rank is None:
            self.text_encoder_rank = self.rank
        if self.text_encoder_alpha is None:
            self.text_encoder_alpha = self.alpha
        if not self.lora_name:
            self.lora_name = Path(self.output_path).stem

    def intermediate_lora_path(self, step: int) -> Path:
        """Where the LoRA of ``step`` is saved (save_lora_every_n_steps); zero-padded so names sort by step."""
        return Path(self.intermediate_lora_dir) / f"{Path(self.output_path).stem}_step{step:06d}.safetensors"

    def intermediate_lora_steps(self) -> list[int]:
        """The steps whose LoRA is saved as an intermediate file: never the last, which is the final LoRA."""
        every = self.save_lora_every_n_steps
        return list(range(every, self.max_train_steps, every)) if every else []

    # --- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError("<root>", f"must be a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in data.items():
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(key, f"unknown setting{hint}")
            values[key] = _coerce(key, raw, hints[key])
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError("--config", f"file not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["background"] = list(self.background)
        return out

    def training_signature(self) -> dict[str, Any]:
        """Settings that change what is trained, with the input paths (``identity`` replaces them by
        content fingerprints) and without the step count (``identity`` keeps it apart: a checkpoint of a
        shorter run can continue a longer one). Left out: where results go, what is logged or sampled,
        and the memory/speed choices that compute the same training."""
        return {k: v for k, v in self.to_dict().items()
                if k not in NOT_IN_TRAINING_SIGNATURE and k != "max_train_steps"}

    @classmethod
    def help_text(cls) -> str:
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            low, high = f.metadata.get("min"), f.metadata.get("max")
            limits = "".join(part for part in (f", >= {low:g}" if low is not None else "",
                                               f", <= {high:g}" if high is not None else ""))
            lines.append(f"  {f.name} (default {json.dumps(default)}{limits}): {f.metadata.get('help', '')}")
        return "\n".join(lines)


def intermediate_loras(folder: Path, stem: str) -> list[tuple[int, Path]]:
    """(step, path) of the intermediate LoRAs named after ``stem`` in ``folder``, in step order."""
    found = []
    pattern = re.compile(re.escape(stem) + r"_step(\d{6,})\.safetensors")
    for path in folder.glob("*.safetensors") if folder.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a JSON value against a field's type hint; convert only where JSON cannot express it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(key, f"must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be an object, got {value!r}")
        return {str(k): _coerce(key, v, args[1]) for k, v in value.items()}
    raise ConfigError(key, f"unsupported type {hint}")  # pragma: no cover - a bug in this module
