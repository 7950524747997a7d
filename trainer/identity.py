"""Is this the same training? The one answer, used by the trainer to resume and by the node to reuse.

A training is identified by what determines its weights, never by where things are on disk:

- the base model's content (sha256 of the file, memoised by ``models.file_sha256``);
- the photos' content, captions, repeats and order (``data.dataset_fingerprint``), and the user's
  class images when prior preservation reads a folder;
- the content of the LoRA the training starts from (``init_lora``), when there is one;
- every setting that changes the trained weights (``TrainConfig.training_signature``) without the
  paths, which the fingerprints above replace;
- the number of steps.

Moving or renaming the photo folder or the model file therefore keeps both resume and reuse. The
identity is stored in each checkpoint's ``state.json`` and in the LoRA's header
(``dreambooth.identity``), so a later run compares against what was actually trained.

A checkpoint continues a training when everything but the step count matches, it is at or below the
requested steps, and the learning-rate schedule reaches the same rate at the same step: schedules
whose rate at step k depends on the total (linear, cosine, restarts, polynomial) do not continue
across a change of total steps; constant ones do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IDENTITY_VERSION = 1
METADATA_KEY = "dreambooth.identity"  # in the LoRA's safetensors header

# Paths: replaced by the content fingerprints of what they point at.
PATH_SETTINGS = ("pretrained_model", "instance_data_dir", "class_data_dir", "init_lora")
INIT_LORA_SETTING = "init_lora"
STEPS_SETTING = "max_train_steps"
# Settings that only matter when a feature is on; a value left over from an earlier run must not
# make two identical trainings look different.
_PRIOR_SETTINGS = ("class_prompt", "num_class_images", "prior_loss_weight", "class_generation_steps",
                   "class_generation_guidance", "class_negative_prompt")
_TEXT_ENCODER_SETTINGS = ("text_encoder_rank", "text_encoder_alpha", "text_encoder_lr", "text_encoder_target")
METHOD_SETTING = "training_method"
# Off, the square-only training it has always been: no trace, so LoRAs and checkpoints from before the
# setting existed still match; on, a different training (other crops, other batches).
BUCKETS_SETTING = "aspect_buckets"
# What shapes LoRA layers, meaningless when every weight is trained (training_method 'full').
_LORA_SETTINGS = ("rank", "alpha", "unet_target", "lora_dropout", "text_encoder_rank", "text_encoder_alpha",
                  "text_encoder_target")
# Learning-rate schedules whose rate at step k does not depend on the total number of steps.
STEP_COUNT_FREE_SCHEDULES = frozenset({"constant", "constant_with_warmup"})

# What a difference is called when it is shown to a person.
_LABELS = {
    "base_model_sha256": "the base model file has other contents",
    "instance_images": "the training images or captions changed",
    "class_images": "the class images changed",
}


@dataclass(frozen=True)
class Difference:
    key: str  # a config key ("rank", "max_train_steps") or an identity field ("instance_images")
    then: Any
    now: Any

    def describe(self, where: str = "in the file", names: Mapping[str, str] | None = None) -> str:
        if self.key in _LABELS:
            return _LABELS[self.key]
        name = (names or {}).get(self.key, self.key)
        if self.key == INIT_LORA_SETTING:  # content hashes: meaningless to a person
            if self.then and self.now:
                return f"{name}: a LoRA with other contents {where}"
            return f"{name}: {'a LoRA' if self.then else 'empty'} {where}, {'a LoRA' if self.now else 'empty'} now"
        return f"{name}: {self.then!r} {where}, {self.now!r} now"


def describe(differences: list[Difference], where: str = "in the file",
             names: Mapping[str, str] | None = None) -> str:
    return "; ".join(d.describe(where, names) for d in differences)


@dataclass(frozen=True)
class TrainingIdentity:
    settings: dict[str, Any]  # JSON values, no paths and no step count
    base_model_sha256: str
    instance_images: str
    class_images: str  # "" when no class images are read from a folder
    steps: int
    init_lora_sha256: str = ""  # "" when the LoRA starts from zero

    # --- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        # init_lora_sha256 only when set: a training from zero keeps the identity (and hashes) it had
        # before init_lora existed, so earlier LoRAs and checkpoints still match.
        out = {"version": IDENTITY_VERSION, "settings": self.settings, "base_model_sha256": self.base_model_sha256,
               "instance_images": self.instance_images, "class_images": self.class_images, "steps": self.steps}
        if self.init_lora_sha256:
            out["init_lora_sha256"] = self.init_lora_sha256
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> TrainingIdentity:
        """Raises ValueError for anything that is not an identity this version wrote."""
        if not isinstance(data, dict) or data.get("version") != IDENTITY_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise ValueError(f"identity version {version!r}, this trainer reads version {IDENTITY_VERSION}")
        try:
            settings = data["settings"]
            if not isinstance(settings, dict):
                raise TypeError("settings is not a table")
            return cls(settings=settings, base_model_sha256=str(data["base_model_sha256"]),
                       instance_images=str(data["instance_images"]), class_images=str(data["class_images"]),
                       steps=int(data["steps"]), init_lora_sha256=str(data.get("init_lora_sha256", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"damaged identity ({exc})") from exc

    @classmethod
    def from_json(cls, text: str) -> TrainingIdentity:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"identity is not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    # --- comparing ----------------------------------------------------------------------------
    def _without_steps(self) -> dict[str, Any]:
        out = self.to_dict()
        del out["steps"]
        return out

    def lineage(self) -> str:
        """Hash of everything but the step count: the trainings one run's checkpoints can belong to."""
        return _hash(self._without_steps())

    def key(self) -> str:
        return _hash(self.to_dict())

    def differences(self, earlier: TrainingIdentity, *, steps: bool = True) -> list[Difference]:
        """What ``earlier`` (a file's or checkpoint's identity) has that this one does not."""
        found = [Difference(k, earlier.settings.get(k), self.settings.get(k))
                 for k in sorted(set(self.settings) | set(earlier.settings))
                 if self.settings.get(k) != earlier.settings.get(k)]
        if self.init_lora_sha256 != earlier.init_lora_sha256:
            found.append(Difference(INIT_LORA_SETTING, earlier.init_lora_sha256, self.init_lora_sha256))
        for name in ("instance_images", "class_images", "base_model_sha256"):
            if getattr(self, name) != getattr(earlier, name):
                found.append(Difference(name, getattr(earlier, name), getattr(self, name)))
        if steps and self.steps != earlier.steps:
            found.append(Difference(STEPS_SETTING, earlier.steps, self.steps))
        return found

    def resume_problem(self, saved: TrainingIdentity, step: int) -> str | None:
        """Why a checkpoint of ``saved`` at ``step`` cannot continue this training; None when it can."""
        diffs = self.differences(saved, steps=False)
        if diffs:
            return f"it was made with other settings or data ({describe(diffs[:4], 'then')})"
        if step > self.steps:
            return f"it is at step {step}, beyond the {self.steps} steps asked for"
        schedule = self.settings.get("lr_scheduler")
        if saved.steps != self.steps and schedule not in STEP_COUNT_FREE_SCHEDULES:
            return (f"its '{schedule}' learning-rate schedule was laid out for {saved.steps} steps, now "
                    f"{self.steps}: the rate at each step depends on the total, so continuing would change it "
                    "mid-run (constant schedules continue across a change of steps)")
        return None

    def same_trajectory(self, other: TrainingIdentity) -> bool:
        """Checkpoints of both are points of one and the same training (for rotating old ones away)."""
        if self.lineage() != other.lineage():
            return False
        return self.steps == other.steps or self.settings.get("lr_scheduler") in STEP_COUNT_FREE_SCHEDULES


def _hash(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- building


def result_settings(config: Any) -> dict[str, Any]:
    """The settings part of the identity: ``training_signature`` without paths, steps and unused options."""
    settings = config.training_signature()
    for key in (*PATH_SETTINGS, STEPS_SETTING):
        settings.pop(key, None)
    if not config.with_prior_preservation:
        for key in _PRIOR_SETTINGS:
            settings.pop(key, None)
    if not config.train_text_encoder:
        for key in _TEXT_ENCODER_SETTINGS:
            settings.pop(key, None)
    if not settings.get(BUCKETS_SETTING, False):
        settings.pop(BUCKETS_SETTING, None)
    if settings.get(METHOD_SETTING) == "lora":
        # The default method leaves no trace: LoRAs and checkpoints from before it existed still match.
        del settings[METHOD_SETTING]
    elif METHOD_SETTING in settings:
        for key in _LORA_SETTINGS:
            settings.pop(key, None)
    return json.loads(json.dumps(settings))  # tuples -> lists: equal to what comes back from a file


def build(config: Any, *, base_model_sha256: str, instance_images: str, class_images: str,
          init_lora_sha256: str | None = None) -> TrainingIdentity:
    """``init_lora_sha256`` None: hashed here from the config's ``init_lora`` (memoised)."""
    init = init_lora_sha256 if init_lora_sha256 is not None else init_lora_fingerprint(config)
    return TrainingIdentity(settings=result_settings(config), base_model_sha256=base_model_sha256,
                            instance_images=instance_images, class_images=class_images,
                            steps=int(config.max_train_steps), init_lora_sha256=init)


def class_images_fingerprint(config: Any) -> str:
    """Fingerprint of the user's class images the run reads (the first ``num_class_images``), "" for none.

    Generated class images need none: they follow from the base model and the class settings.
    """
    if not config.with_prior_preservation or not config.class_data_dir:
        return ""
    from . import data

    return data.dataset_fingerprint(data.scan_image_folder(Path(config.class_data_dir), role="class",
                                                           limit=config.num_class_images))


def instance_images_fingerprint(config: Any) -> str:
    from . import data

    return data.dataset_fingerprint(data.scan_image_folder(Path(config.instance_data_dir), role="instance"))


def init_lora_fingerprint(config: Any) -> str:
    """SHA-256 of the ``init_lora`` file's content, "" when the training starts from zero."""
    if not config.init_lora:
        return ""
    from .models import file_sha256

    path = Path(config.init_lora)
    if not path.is_file():
        from .config import ConfigError

        raise ConfigError(INIT_LORA_SETTING, f"{path} is not a file: choose an existing LoRA file, or leave "
                          "init_lora empty to start from zero")
    return file_sha256(path, Path(config.cache_dir) if config.cache_dir else None)


def model_sha256(config: Any) -> str:
    from .models import file_sha256  # memoised in the shared cache: a second look costs a stat

    return file_sha256(Path(config.pretrained_model), Path(config.cache_dir) if config.cache_dir else None)


def compare(stored: TrainingIdentity, config: Any, *, instance_images: str | None = None,
            class_images: str | None = None,
            base_model_sha256: Callable[[], str] | None = None) -> list[Difference]:
    """How ``config`` would train differently from ``stored`` ([] when it is the same training).

    Fingerprints not given are computed from the config's folders. The base model is hashed last
    and only when everything else matches: hashing a multi-gigabyte file to learn that the rank
    changed would waste the user's time.
    """
    instance = instance_images if instance_images is not None else instance_images_fingerprint(config)
    klass = class_images if class_images is not None else class_images_fingerprint(config)
    provisional = build(config, base_model_sha256=stored.base_model_sha256, instance_images=instance,
                        class_images=klass)
    found = provisional.differences(stored)
    if found:
        return found
    sha = (base_model_sha256 or (lambda: model_sha256(config)))()
    if sha != stored.base_model_sha256:
        found.append(Difference("base_model_sha256", stored.base_model_sha256, sha))
    return found
