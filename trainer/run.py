"""One DreamBooth training run (LoRA, or every weight with training_method 'full'): set-up, caches and
the optimisation loop.

Reading order: ``train()`` at the bottom is the whole story; ``TrainingRun`` holds the pieces.
Everything random is derived from ``config.seed`` and the micro-batch index (never from a global
generator), which is what makes a resumed run bit-for-bit the run that was interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from . import __version__, checkpoint, data, fileio, full_finetune, identity, lora, sampling
from . import buckets as bucketing
from .config import ConfigError, TrainConfig
from .fileio import long_path
from .latents import LatentCache, draw
from .models import BaseModel, ModelSource, drop_vae_decoder
from .prompts import Conditioning, encode_prompts, size_ids, token_ids, unet_kwargs
from .protocol import Commands, EventWriter, StopRequested
from .run_folder import sample_path
from .runtime import Runtime, free_accelerator_memory, peak_memory_gb, resolve_runtime, upcast_attention

logger = logging.getLogger(__name__)


_T = TypeVar("_T")

# How often a save that waits for disk space tries again.
DISK_RETRY_S = 5.0


@dataclass
class RunResult:
    status: str  # "done" or "stopped"
    step: int
    # The LoRA to use: the final one, the checkpoint's when stopped, the extracted one of a full fine-tune;
    # None when there is none (stopped before the first step; a full fine-tune without extraction).
    lora_path: Path | None
    checkpoint_path: Path | None = None  # training_method 'full': the single-file model, when done


class TrainingRun:
    def __init__(self, config: TrainConfig, events: EventWriter, commands: Commands) -> None:
        from accelerate import Accelerator

        self.config = config
        self.events = events
        self.commands = commands
        self.runtime: Runtime = resolve_runtime(config.device, config.mixed_precision, config.attention)
        for level, message in self.runtime.notes:
            events.status(message, level=level)
        if self.runtime.device.type == "cuda" and self.runtime.device.index is not None:
            torch.cuda.set_device(self.runtime.device)
        _forget_previous_single_process_run()
        self.accelerator = Accelerator(mixed_precision=self.runtime.mixed_precision,
                                       cpu=self.runtime.device.type == "cpu")
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.output_dir = Path(config.output_dir)
        self.full = config.training_method == "full"
        self.step = 0

    # --- set-up ------------------------------------------------------------------------------
    def check_model(self) -> None:
        """Open the base model (and the LoRA to start from) before any photo is read: a wrong or
        half-downloaded file is reported at once (header and size, ``safetensors_file``), not after
        scanning every photo."""
        cfg = self.config
        self.events.status(f"checking {Path(cfg.pretrained_model).name}")
        self.source = ModelSource(cfg.pretrained_model, prediction_type=cfg.prediction_type,
                                  cache_dir=Path(cfg.cache_dir))
        spec = self.source.spec  # half the side the family learned at or less: a quarter of its pixels
        if cfg.resolution * 2 <= spec.default_resolution:
            self.events.status(f"{spec.label} was trained at {spec.default_resolution} px; {cfg.resolution} px gives "
                               f"blurry results: set resolution to {spec.default_resolution} (or "
                               f"{spec.default_resolution * 3 // 4} on small cards)", level="warning")
        if self.full:
            full_finetune.check_source(cfg.pretrained_model, self.source.family, cfg.train_text_encoder)
        self.init_lora = lora.open_init_lora(cfg.init_lora) if cfg.init_lora else None
        for level, message in lora.check_init_lora(self.init_lora, cfg, self.source.spec) if self.init_lora else []:
            self.events.status(message, level=level)
        self.init_lora_sha256 = identity.init_lora_fingerprint(cfg)

    def load_data(self) -> None:
        """Read every photo (instance, and the user's class images) before the model is loaded; all
        unusable files of both folders are named in one error."""
        cfg = self.config
        self.events.status("reading instance images")
        scans = [data.scan_folder(Path(cfg.instance_data_dir), role="instance")]
        if cfg.with_prior_preservation and cfg.class_data_dir:
            scans.append(data.scan_folder(Path(cfg.class_data_dir), role="class", limit=cfg.num_class_images))
        prepared: list[list[data.PreparedImage]] = []
        problems: list[data.DataError] = []
        for scan in scans:
            skipped = scan.skipped_message()
            if skipped:
                self.events.status(skipped, level="warning")
            instance = scan.role == "instance"
            # Class images stay squares at the resolution (generated ones are); with aspect buckets they are
            # cut to each instance batch's bucket when their latents are cached (build_caches).
            crop = "face" if instance and cfg.crop == "face" else "center"
            try:
                prepared.append(data.read_images(scan, cfg.resolution, crop=crop, background=cfg.background,
                                                 seed=cfg.seed, buckets=instance and cfg.aspect_buckets))
            except data.DataError as exc:
                problems.append(exc)
        if problems:
            raise problems[0] if len(problems) == 1 else data.DataError(
                "\n".join(str(p) for p in problems), problems[0].path)
        self.instance_records = scans[0].records
        self.instance_prepared = prepared[0]
        self.user_class_records = scans[1].records if len(scans) > 1 else []
        self.user_class_prepared = prepared[1] if len(scans) > 1 else []
        for item in (*self.instance_prepared, *self.user_class_prepared):
            for warning in item.warnings:
                self.events.status(warning, level="warning")
        self.epoch_list = data.expand_repeats(self.instance_records)
        # The bucket of each sample of an epoch; every micro-batch is drawn from one of them.
        self.epoch_buckets = [self.instance_prepared[i].bucket for i in self.epoch_list]
        if cfg.aspect_buckets:
            counts: dict[bucketing.Bucket, int] = {}
            for item in self.instance_prepared:
                counts[item.bucket] = counts.get(item.bucket, 0) + 1
            self.events.status("aspect buckets: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(counts.items())))
        self.fingerprint = data.dataset_fingerprint(self.instance_records)
        self.class_fingerprint = data.dataset_fingerprint(self.user_class_records) if len(scans) > 1 else ""
        self.captions = [r.caption if (cfg.use_captions and r.caption) else cfg.instance_prompt
                         for r in self.instance_records]
        self.events.status(f"{len(self.instance_records)} instance images, {len(self.epoch_list)} per epoch")
        if cfg.crop == "random":
            self.instance_originals = [data.load_image(r.path, background=cfg.background)
                                       for r in self.instance_records]

    def load_model(self) -> None:
        """Build the components one at a time, so memory never holds more than the run needs.

        The text encoder comes first: when it is frozen and nothing will sample, the prompt
        embeddings are cached and it is freed before the UNet and VAE exist. The VAE decoder is
        only built when validation samples or class images will be decoded.
        """
        cfg = self.config
        self.events.status(f"loading {Path(cfg.pretrained_model).name}")
        source = self.source
        self.tokenizers = source.tokenizers()
        # A full fine-tune trains the weights themselves: they stay in fp32 (autocast computes in half
        # precision); a LoRA training keeps the frozen base in the run's weight dtype.
        trained_dtype = torch.float32 if self.full else self.runtime.weight_dtype
        te_dtype = trained_dtype if cfg.train_text_encoder else self.runtime.weight_dtype
        text_encoders = [te.to(self.device) for te in source.text_encoders(dtype=te_dtype)]
        self.commands.check_stop()  # each component takes seconds to minutes: a stop need not wait for all
        self.token_ids = {p: token_ids(self.tokenizers, p) for p in self._training_prompts()}
        self.embedding_cache: dict[str, Conditioning] | None = None
        if not cfg.train_text_encoder and not cfg.validation_prompts and not cfg.with_prior_preservation:
            self._cache_embeddings(text_encoders)
            # Training without samples never uses them again: 123M parameters (SD1.5), 818M (SDXL).
            text_encoders = []
            free_accelerator_memory()
        self.commands.check_stop()
        unet = source.unet(channels_last=self.runtime.channels_last, dtype=trained_dtype).to(self.device)
        self.commands.check_stop()
        needs_decoder = bool(cfg.validation_prompts) or cfg.with_prior_preservation
        # The VAE always runs in fp32 (it is never trained): SDXL's overflows to NaN in fp16, and the
        # encode is a one-off cost with cached latents.
        vae = source.vae(decoder=needs_decoder).to(self.device)
        if not source.spec.vae_fp16_safe and self.runtime.weight_dtype != torch.float32:
            self.events.status(f"{source.spec.label} VAE: latents encoded and samples decoded in fp32 (it overflows "
                               "in fp16)")
        self.vae_scaling = float(vae.config.scaling_factor)
        self.base: BaseModel = source.assemble(text_encoders=text_encoders, unet=unet, vae=vae)
        if upcast_attention(unet, self.base.family):
            logger.info("%s: attention computed in fp32 (upcast_attention), as its reference code does",
                        self.base.family)
        if self.runtime.use_xformers:
            unet.enable_xformers_memory_efficient_attention()

    def _training_prompts(self) -> list[str]:
        cfg = self.config
        return sorted(set(self.captions) | ({cfg.class_prompt} if cfg.with_prior_preservation else set()))

    @torch.no_grad()
    def _cache_embeddings(self, text_encoders: list[torch.nn.Module]) -> None:
        self.embedding_cache = {p: self._encode(text_encoders, [p]).row(0) for p in self.token_ids}

    def _encode(self, text_encoders: list[torch.nn.Module], prompts: list[str]) -> Conditioning:
        for p in prompts:
            if p not in self.token_ids:
                self.token_ids[p] = token_ids(self.tokenizers, p)
        ids = [torch.stack([self.token_ids[p][i] for p in prompts]).to(self.device) for i in range(len(self.tokenizers))]
        return encode_prompts(self.source.spec, text_encoders, ids)

    def prepare_class_images(self) -> None:
        cfg = self.config
        self.class_records: list[data.ImageRecord] = []
        if not cfg.with_prior_preservation:
            return
        self.class_records = list(self.user_class_records)  # read and checked in load_data
        missing = cfg.num_class_images - len(self.class_records)
        if missing > 0:
            folder = sampling.class_cache_folder(
                Path(cfg.cache_dir), model_sha256=self.base.sha256, prompt=cfg.class_prompt,
                negative_prompt=cfg.class_negative_prompt, resolution=cfg.resolution,
                steps=cfg.class_generation_steps, guidance=cfg.class_generation_guidance, seed=cfg.seed)
            self.events.status(f"preparing {missing} class images with the base model in {folder}")

            def progress(done: int, total: int) -> None:
                self.events.emit("progress", phase="class_images", step=done, total=total)
                self.commands.check_stop()

            paths = self._main_process_first(lambda: sampling.ensure_class_images(
                folder, missing, self._pipeline, prompt=cfg.class_prompt,
                negative_prompt=cfg.class_negative_prompt, seed=cfg.seed, steps=cfg.class_generation_steps,
                guidance=cfg.class_generation_guidance, size=cfg.resolution,
                autocast_dtype=self._autocast_dtype(), on_progress=progress, should_stop=self.commands.stop.is_set))
            generated = [data.ImageRecord(p, None, 1) for p in paths]
            self.class_records += generated
        else:
            generated = []
        self.class_prepared = self.user_class_prepared + data.prepare_images(
            generated, cfg.resolution, crop="center", background=cfg.background, seed=cfg.seed)
        if not cfg.validation_prompts:
            drop_vae_decoder(self.base.vae)  # the class images were its last use
            free_accelerator_memory()

    @torch.no_grad()
    def _encode_images(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for chunk in torch.stack(pixels).split(4):
            dist = self.base.vae.encode(chunk.to(self.device, torch.float32)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        return torch.cat(means), torch.cat(stds)

    def build_caches(self) -> None:
        cfg = self.config
        self.events.status("caching latents and prompts")

        def cache(prepared: list[data.PreparedImage], recrop: Any = None) -> LatentCache:
            return LatentCache([p.pixels for p in prepared], self._encode_images, keep=cfg.cache_latents,
                               flips=cfg.random_flip, recrop=recrop)

        # 'face' is a fixed crop per image, like 'center': its latents are cached too.
        fixed_crop = cfg.crop != "random"
        self.instance_latents = cache(self.instance_prepared) if fixed_crop else None
        self.class_latents = (cache(self.class_prepared, self._class_in_bucket if cfg.aspect_buckets else None)
                              if cfg.with_prior_preservation else None)
        used = sorted(set(self.epoch_buckets)) if cfg.aspect_buckets else None
        for latents, wanted in ((self.instance_latents, None), (self.class_latents, used)):
            if latents is not None and latents.keep:
                self.commands.check_stop()
                latents.fill(wanted)
        if fixed_crop and cfg.cache_latents and not cfg.validation_prompts:
            self.base.vae = None  # every latent is cached: give its memory back before training
            free_accelerator_memory()
        if not cfg.train_text_encoder and self.embedding_cache is None:
            self._cache_embeddings(self.base.text_encoders)
            if not cfg.validation_prompts:
                # Only the cached embeddings are needed from here on: 123M parameters freed.
                self.base.text_encoders = []
                free_accelerator_memory()

    def _class_in_bucket(self, index: int, bucket: bucketing.Bucket) -> torch.Tensor:
        """Class image ``index`` (a square) cut at the center to ``bucket``: an instance batch and its class
        half share one shape, so one UNet call serves both."""
        square = data.tensor_to_image(self.class_prepared[index].pixels)
        return data.image_to_tensor(data.crop_image(square, bucket, crop="center")[0])

    def setup_training(self) -> None:
        """Make what is trained trainable (LoRA layers, or every weight), then the optimizer and schedule."""
        cfg = self.config
        groups = self._full_groups() if self.full else self._lora_groups()
        if cfg.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            for te in self.base.text_encoders if cfg.train_text_encoder else []:
                # transformers 5.x renamed it (the old name goes in 6.x); 4.x only has the old one.
                if hasattr(te, "activation_checkpointing_enable"):
                    te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = self._make_optimizer(groups)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps)
        trained_tes = self.base.text_encoders if cfg.train_text_encoder else []
        models = [self.base.unet, *trained_tes]
        prepared = self.accelerator.prepare(*models, self.optimizer)
        self.unet, *rest = prepared
        self.text_encoders = rest[:-1] if cfg.train_text_encoder else self.base.text_encoders
        self.optimizer = rest[-1]
        self.trainable_models = models

    def _full_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        n_unet = sum(p.numel() for p in self.base.unet.parameters())
        groups = [{"params": self._all_params(self.base.unet), "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            groups.append({"params": [p for te in self.base.text_encoders for p in self._all_params(te)],
                           "lr": cfg.text_encoder_lr})
        self.events.status(f"full fine-tune: all {n_unet / 1e6:.0f}M UNet weights"
                           + (" and the text encoder's" if cfg.train_text_encoder else "") + " are trained")
        return groups

    @staticmethod
    def _all_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        model.requires_grad_(True)
        return list(model.parameters())

    def _lora_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        # peft draws the LoRA down-weights from the global generator (and dropout uses it later).
        torch.manual_seed(derived_seed(cfg.seed, "lora-init"))
        lora.add_lora(self.base.unet, rank=cfg.rank, alpha=cfg.alpha, targets=lora.UNET_TARGETS[cfg.unet_target],
                      dropout=cfg.lora_dropout)
        groups = [{"params": self._lora_params(self.base.unet), "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            assert cfg.text_encoder_rank is not None and cfg.text_encoder_alpha is not None
            # One parameter group for every text encoder (SDXL: both), at text_encoder_lr.
            for te in self.base.text_encoders:
                lora.add_lora(te, rank=cfg.text_encoder_rank, alpha=cfg.text_encoder_alpha,
                              targets=lora.TEXT_ENCODER_TARGETS[cfg.text_encoder_target], dropout=cfg.lora_dropout)
            groups.append({"params": [p for te in self.base.text_encoders for p in self._lora_params(te)],
                           "lr": cfg.text_encoder_lr})
        if self.init_lora is not None:  # before resume: a checkpoint of this training holds later weights
            te = self.base.text_encoders if cfg.train_text_encoder else []
            self.events.status(lora.load_init_lora(self.init_lora, self.base.unet, te, self.base.spec, cfg))
        return groups

    def _lora_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # LoRA weights train in fp32 even when the base is half precision
        return params

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        cfg = self.config
        kwargs = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon,
                  "weight_decay": cfg.weight_decay}
        if cfg.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise ConfigError("optimizer", "'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from exc
            if self.device.type != "cuda":
                raise ConfigError("optimizer", "'adamw8bit' needs a CUDA GPU; use 'adamw' on the CPU")
            return bnb.optim.AdamW8bit(groups, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    # --- checkpoints ---------------------------------------------------------------------------
    def signature(self) -> str:
        return self.identity.key()

    def resume_if_possible(self) -> None:
        """Continue from a checkpoint of this very training (``identity``), or say why not."""
        cfg = self.config
        self.identity = identity.build(cfg, base_model_sha256=self.base.sha256, instance_images=self.fingerprint,
                                       class_images=self.class_fingerprint, init_lora_sha256=self.init_lora_sha256)
        try:
            choice = checkpoint.find_resume_checkpoint(self.output_dir, cfg.resume, self.identity)
        except ValueError as exc:
            raise ConfigError("resume", str(exc)) from exc
        found = choice.checkpoint
        if choice.passed_over:
            newest, reason = choice.passed_over[0]
            others = len(choice.passed_over) - 1
            more = f" ({others} older checkpoint(s) cannot either)" if others else ""
            start = f"continuing from {found.path.name} instead" if found else "training from step 0"
            self.events.status(f"not resuming from {newest.path.name}: {reason}{more}; {start}", level="warning",
                               resume_refused=newest.path.name)
        if found is None:
            return
        step, trainable, extra = checkpoint.load_checkpoint(found.path)
        for prefix, model in self._named_models():
            lora.load_trainable_state(model, {k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix)})
        for warning in checkpoint.restore_training_state(extra, optimizer=self.optimizer, scheduler=self.lr_scheduler,
                                                         scaler=self.accelerator.scaler):
            self.events.status(f"resume: {warning}", level="warning")
        self.step = step
        self.events.status(f"resumed from {found.path.name} (step {step})")

    def _named_models(self) -> list[tuple[str, torch.nn.Module]]:
        named = [("unet.", self.accelerator.unwrap_model(self.unet))]
        if self.config.train_text_encoder:
            named += [(lora.TEXT_ENCODER_PARTS[i] + ".", self.accelerator.unwrap_model(te))
                      for i, te in enumerate(self.text_encoders)]
        return named

    def _kohya(self) -> dict[str, torch.Tensor] | None:
        """The LoRA as a file's tensors; None for a full fine-tune (no LoRA until it is extracted)."""
        if self.full:
            return None
        tes = [self.accelerator.unwrap_model(te) for te in self.text_encoders] if self.config.train_text_encoder else []
        return lora.kohya_state_dict(self.accelerator.unwrap_model(self.unet), tes, self.base.spec,
                                     lora.SAVE_DTYPES[self.config.save_precision])

    def save_checkpoint(self) -> Path | None:
        """This step's checkpoint; None where none was saved (another process, or no room on the disk)."""
        path = None
        if self.accelerator.is_main_process:
            trainable = {prefix + k: v for prefix, m in self._named_models()
                         for k, v in lora.trainable_state(m).items()}
            path = self._room_for(lambda: checkpoint.save_checkpoint(
                self.output_dir, step=self.step, signature=self.signature(), trainable=trainable,
                optimizer_state=self.optimizer.state_dict(), scheduler_state=self.lr_scheduler.state_dict(),
                lora_tensors=self._kohya(), lora_metadata=self._metadata(),
                keep=self.config.checkpoints_total_limit, data_position=self.data_position(),
                scaler_state=self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                identity=self.identity), f"the checkpoint of step {self.step}", wait=False)
            if path is not None:
                self.events.emit("checkpoint", step=self.step, path=str(path),
                                 lora_path=None if self.full else str(path / checkpoint.LORA_FILE))
        self.accelerator.wait_for_everyone()
        return path

    def _room_for(self, save: Callable[[], _T], what: str, *, wait: bool) -> _T | None:
        """``save()``, with a full disk handled; on the main process only (the caller's barrier follows).

        A checkpoint (``wait=False``) that does not fit is skipped with a warning: the training goes on,
        and what it exists for is much smaller. The files the run exists for (``wait=True``: the LoRA,
        the model, the LoRAs asked for at steps) wait for room instead - hours of training are not
        thrown away for want of a few MB. The run says so once and tries again every DISK_RETRY_S
        until there is room, or until it is stopped, which ends it with the disk error.
        """
        waiting = False
        while True:
            try:
                result = save()
            except Exception as exc:
                if not fileio.is_disk_full(exc):
                    raise
                reason = fileio.disk_full_reason(exc)
                if not wait:
                    self.events.status(f"{what} was skipped: {reason}. The training goes on, but cannot resume "
                                       "from this step", level="warning")
                    return None
                if not waiting:
                    waiting = True
                    self.events.status(f"waiting for disk space: {reason}. Free space on that disk and the save "
                                       f"is tried again every {DISK_RETRY_S:.0f} s; stop the training to give up",
                                       level="warning", waiting="disk")  # the live view keeps it shown
                if self.commands.stop.wait(DISK_RETRY_S):
                    raise
            else:
                if waiting:
                    self.events.status(f"{what}: saved (the disk had room again)")
                return result

    def data_position(self) -> dict[str, int]:
        """Where the next micro-batch starts in the (epoch-shuffled) instance stream."""
        cfg = self.config
        consumed = self.step * cfg.gradient_accumulation_steps * self.world * cfg.train_batch_size
        epoch, offset = data.stream_position(self._stream_length(), consumed)
        return {"epoch": epoch, "offset": offset, "images_seen": consumed}

    def _stream_length(self) -> int:
        """Samples per epoch: with aspect buckets each bucket's samples are rounded up to whole batches."""
        cfg = self.config
        if cfg.aspect_buckets:
            return bucketing.epoch_length(self.epoch_buckets, cfg.train_batch_size)
        return len(self.epoch_list)

    def _stream(self, start: int, count: int) -> list[int]:
        """Indices into ``epoch_list`` of samples [start, start + count) of the run's sample stream."""
        cfg = self.config
        if cfg.aspect_buckets:
            return bucketing.bucketed_stream(self.epoch_buckets, cfg.train_batch_size, cfg.seed, start, count)
        return data.sample_stream(len(self.epoch_list), cfg.seed, start, count)

    def _metadata(self) -> dict[str, str]:
        return lora.lora_metadata(self.config, self.base, step=self.step, version=__version__,
                                  identity=self.identity)

    def check_intermediate_loras(self) -> None:
        """Refuse, before the first step, to replace an intermediate LoRA of another training.

        The same rule as the final LoRA: a file this run would write that holds a different training
        (its identity header differs, or it has none) is replaced only with ``overwrite``; otherwise the
        error names it. A file of this very training (written before a crash, rewritten identically) and
        files at steps this run does not write (before the step it resumes from) are left as they are.
        """
        cfg = self.config
        if cfg.overwrite:
            return
        for step in cfg.intermediate_lora_steps():
            path = cfg.intermediate_lora_path(step)
            if step < self.step or not Path(long_path(path)).exists():
                continue
            if not self._holds_this_training(path):
                raise ConfigError("overwrite", f"{path} already exists and holds another training; set overwrite to "
                                  "replace it, move it away, or choose another name (save_lora_every_n_steps "
                                  "saves a LoRA there at that step)")

    def check_disk_space(self) -> None:
        """Warn before the first step where a disk will not hold what this run saves: said at the start, not
        hours later when a checkpoint is skipped or the LoRA has to wait for room (see ``_room_for``).

        Sizes from the trained weights: a checkpoint holds them in fp32 with adamw's two fp32 moments (or
        adamw8bit's two 8-bit ones) and the LoRA file; the result is the LoRA at save_precision, or for a
        full fine-tune the whole base checkpoint at save_precision.
        """
        if not self.accelerator.is_main_process:
            return
        cfg = self.config
        params = [p for model in self.trainable_models for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        save_bytes = lora.SAVE_DTYPES[cfg.save_precision].itemsize
        if self.full:
            from .safetensors_file import read_header

            tensors = read_header(Path(long_path(cfg.pretrained_model))).tensors.values()
            result, result_name = sum(math.prod(t.shape) for t in tensors) * save_bytes, "the model"
        else:
            result, result_name = count * save_bytes, "the LoRA"
        moments = count * (8 if cfg.optimizer == "adamw" else 2)
        each_checkpoint = sum(p.numel() * p.element_size() for p in params) + moments + (0 if self.full else result)
        output = Path(cfg.output_path)
        for folder, needed, what, then in (
                (checkpoint.checkpoint_root(self.output_dir), each_checkpoint, "each checkpoint",
                 "checkpoints will be skipped while there is no room, and the training cannot resume from those "
                 "steps"),
                (output.parent, result, f"{result_name} {output.name}", "it will wait for room when the training ends")):
            free = fileio.free_bytes(folder)
            if free < needed + fileio.disk_margin(folder):
                self.events.status(f"the disk holding {folder} has {fileio.size_text(free)} free, and {what} of this "
                                   f"training needs about {fileio.size_text(needed)}: {then}. Free space there before "
                                   "it comes to that", level="warning")

    def _holds_this_training(self, path: Path) -> bool:
        return _identity_key(path) == self.identity.key()

    def save_intermediate_lora(self, *, keep_this_trainings: bool = False) -> None:
        """The LoRA at this step as a file of its own, written like the final one (atomically, same header).

        ``keep_this_trainings``: leave a file of this training at this step as it is. Decided by the main
        process alone: another process could look after the file is written.
        """
        path = self.config.intermediate_lora_path(self.step)
        if self.accelerator.is_main_process and not (
                keep_this_trainings and Path(long_path(path)).exists() and self._holds_this_training(path)):
            # check_intermediate_loras already refused another training's file; this training's is rewritten.
            self._room_for(lambda: lora.write_safetensors_atomic(self._kohya(), path, self._metadata(), overwrite=True),
                           f"the LoRA of step {self.step}", wait=True)
            self.events.status(f"saved the LoRA of step {self.step} as {path.name}")
        self.accelerator.wait_for_everyone()

    def save_final_lora(self) -> Path:
        path = Path(self.config.output_path)
        if self.accelerator.is_main_process:
            self._room_for(lambda: lora.write_safetensors_atomic(self._kohya(), path, self._metadata(),
                                                                 overwrite=self.config.overwrite),
                           f"the LoRA {path.name}", wait=True)
        self.accelerator.wait_for_everyone()
        return path

    def save_final_model(self) -> tuple[Path, Path | None]:
        """A full fine-tune's single-file checkpoint (and its extracted LoRA): (checkpoint, LoRA or None)."""
        cfg = self.config
        path = Path(cfg.output_path)
        lora_path = Path(cfg.extracted_lora_path) if cfg.extract_lora_rank else None
        if self.accelerator.is_main_process:
            unet = self.accelerator.unwrap_model(self.unet)
            # check_source allows a text encoder in a full fine-tune of SD1.x only: there is one.
            te = self.accelerator.unwrap_model(self.text_encoders[0]) if cfg.train_text_encoder else None
            self.events.status(f"saving the fine-tuned model as {path.name}")
            dtype = lora.SAVE_DTYPES[cfg.save_precision]
            meta = full_finetune.checkpoint_metadata(self._metadata())
            tensors = full_finetune.checkpoint_tensors(Path(cfg.pretrained_model), self.base.family, unet, te, dtype)
            self._room_for(lambda: lora.write_safetensors_atomic(tensors, path, meta, overwrite=cfg.overwrite),
                           f"the model {path.name}", wait=True)
            del tensors
            if lora_path is not None:
                self.events.status(f"extracting a rank-{cfg.extract_lora_rank} LoRA from the weight change")
                self.optimizer = None  # type: ignore[assignment]  # its state is twice the model: not needed now
                free_accelerator_memory()
                pairs = [("lora_unet", self.source.unet().to(self.device), unet)]
                if te is not None:
                    pairs.append(("lora_te", self.source.text_encoders()[0].to(self.device), te))
                extracted, layers = full_finetune.extract_lora(pairs, cfg.extract_lora_rank, dtype)
                extracted_metadata = full_finetune.extracted_lora_metadata(self._metadata(), cfg.extract_lora_rank,
                                                                           path.name)
                self._room_for(lambda: lora.write_safetensors_atomic(extracted, lora_path, extracted_metadata,
                                                                     overwrite=cfg.overwrite),
                               f"the extracted LoRA {lora_path.name}", wait=True)
                self.events.status(f"saved {lora_path.name}: {layers} layers at rank <= {cfg.extract_lora_rank}")
        self.accelerator.wait_for_everyone()
        return path, lora_path

    # --- validation ------------------------------------------------------------------------------
    def _autocast_dtype(self) -> torch.dtype | None:
        return None if self.runtime.mixed_precision == "no" else self.runtime.weight_dtype

    def _pipeline(self) -> Any:
        unet = self.accelerator.unwrap_model(getattr(self, "unet", self.base.unet))
        tes = [self.accelerator.unwrap_model(te) for te in getattr(self, "text_encoders", self.base.text_encoders)]
        return sampling.build_pipeline(self.base, unet, tes, self.device)

    def _main_process_first(self, fn: Any) -> Any:
        with self.accelerator.main_process_first():
            return fn()

    def sample(self) -> None:
        cfg = self.config
        if not cfg.validation_prompts or not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        try:
            pipe = self._pipeline()
            with sampling.inference_state(*sampling.pipeline_modules(pipe)):
                for i, prompt in enumerate(cfg.validation_prompts):
                    image = sampling.generate(pipe, prompt, negative_prompt=cfg.validation_negative_prompt,
                                              seed=cfg.validation_seed + i, steps=cfg.validation_inference_steps,
                                              guidance=cfg.validation_guidance, size=cfg.resolution,
                                              autocast_dtype=self._autocast_dtype(),
                                              should_stop=self.commands.stop.is_set)
                    out = sample_path(self.output_dir, self.step, i)
                    Path(long_path(out.parent)).mkdir(parents=True, exist_ok=True)
                    image.save(long_path(out))
                    self.events.emit("sample", step=self.step, index=i, prompt=prompt, path=str(out))
        except StopRequested:
            # The stop flag stays set: the loop saves a checkpoint at its next check.
            self.events.status(f"validation samples at step {self.step} cut short: stop requested")
        except Exception as exc:  # noqa: BLE001 - a failed sample must never stop training
            logger.exception("validation sampling failed")
            self.events.status(f"validation sample failed at step {self.step}: {exc}", level="warning")
        self.accelerator.wait_for_everyone()

    # --- one optimisation step -------------------------------------------------------------------
    def _batch(self, micro: int) -> tuple[torch.Tensor, list[str], list[data.CropGeometry]]:
        """Latents, prompts and crop geometry (SDXL's size conditioning) of global micro-batch ``micro``
        for this process; every sample has the same size (one aspect bucket)."""
        cfg = self.config
        bs = cfg.train_batch_size
        start = (micro * self.world + self.rank) * bs
        gen = torch.Generator(device="cpu").manual_seed(derived_seed(cfg.seed, micro, self.rank, "latents"))
        picks = [self.epoch_list[i] for i in self._stream(start, bs)]
        flips = [cfg.random_flip and random.Random(f"{cfg.seed}:{micro}:{self.rank}:{j}").random() < 0.5
                 for j in range(bs)]
        bucket = self.instance_prepared[picks[0]].bucket
        if self.instance_latents is not None:
            latents = self.instance_latents.sample(picks, flips, gen)
            geometry = [self.instance_prepared[i].geometry for i in picks]
        else:
            pixels, geometry = [], []
            for j, idx in enumerate(picks):
                crop, where = data.crop_image(self.instance_originals[idx], bucket, crop="random",
                                              rng=random.Random(f"{cfg.seed}:{micro}:{self.rank}:{j}:crop"))
                t = data.image_to_tensor(crop)
                pixels.append(t.flip(-1) if flips[j] else t)
                geometry.append(where)
            latents = draw(*self._encode_images(pixels), gen)
        geometry = [g.flipped() if flip else g for g, flip in zip(geometry, flips, strict=True)]
        prompts = [self.captions[i] for i in picks]
        if self.class_latents is not None:
            class_picks = data.sample_stream(len(self.class_records), cfg.seed + 1, start, bs)
            in_bucket = bucket if cfg.aspect_buckets else None
            latents = torch.cat([latents, self.class_latents.sample(class_picks, flips, gen, in_bucket)])
            prompts += [cfg.class_prompt] * bs
            for i, flip in zip(class_picks, flips, strict=True):
                square = self.class_prepared[i].geometry
                # A class image cut to the bucket: its crop of the square, the square standing for the photo.
                where = (bucketing.crop_box(square.target_size[1], square.target_size[0], bucket, crop="center")[1]
                         if cfg.aspect_buckets else square)
                geometry.append(where.flipped() if flip else where)
        return latents * self.vae_scaling, prompts, geometry

    def _embeddings(self, prompts: list[str]) -> Conditioning:
        if self.embedding_cache is not None:
            return Conditioning.stack([self.embedding_cache[p] for p in prompts])
        return self._encode(self.text_encoders, prompts)

    def _size_ids(self, geometry: list[bucketing.CropGeometry]) -> torch.Tensor | None:
        """SDXL's per-image size conditioning, from each sample's real crop; None for SD1.x/2.x."""
        if not self.base.spec.size_conditioning:
            return None
        return torch.stack([size_ids(g.original_size, g.crop_top_left, g.target_size) for g in geometry])

    def loss_for_micro_batch(self, micro: int) -> tuple[torch.Tensor, float, float]:
        cfg = self.config
        latents, prompts, geometry = self._batch(micro)
        gen = torch.Generator(device="cpu").manual_seed(derived_seed(cfg.seed, micro, self.rank, "noise"))
        noise = torch.randn(latents.shape, generator=gen)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        sched = self.base.noise_scheduler
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        noise, timesteps = noise.to(self.device, latents.dtype), timesteps.to(self.device)
        noisy = sched.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            cond = unet_kwargs(self.base.spec, self._embeddings(prompts), self._size_ids(geometry))
            pred = self.unet(noisy.to(self.runtime.weight_dtype), timesteps, **cond).sample
        target = noise if self.base.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            per_sample = per_sample * self._snr_weights(timesteps)
        bs = cfg.train_batch_size
        instance = per_sample[:bs].mean()
        prior = per_sample[bs:].mean() if cfg.with_prior_preservation else torch.zeros((), device=self.device)
        loss = instance + cfg.prior_loss_weight * prior
        return loss, instance.item(), prior.item()

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.base.noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.config.min_snr_gamma)
        return clipped / (snr + 1 if self.base.prediction_type == "v_prediction" else snr)

    def optimisation_step(self) -> dict[str, float]:
        cfg = self.config
        accum = cfg.gradient_accumulation_steps
        totals = [0.0, 0.0, 0.0]
        for k in range(accum):
            micro = self.step * accum + k
            with contextlib.ExitStack() as stack:
                if k < accum - 1 and self.world > 1:
                    for model in (self.unet, *self.text_encoders) if cfg.train_text_encoder else (self.unet,):
                        stack.enter_context(self.accelerator.no_sync(model))
                loss, inst, prior = self.loss_for_micro_batch(micro)
                self.accelerator.backward(loss / accum)
            for i, v in enumerate((loss.item(), inst, prior)):
                totals[i] += v / accum
        if cfg.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not math.isfinite(totals[0]):
            raise FloatingPointError(f"loss became {totals[0]} at step {self.step}; lower the learning rate "
                                     "or use bf16/fp32 instead of fp16")
        return {"loss": totals[0], "instance_loss": totals[1], "prior_loss": totals[2]}

    def take_commands(self) -> tuple[bool, bool, bool]:
        """(stop, sample, save) agreed by every process: rank 0's stdin decides."""
        flags = torch.tensor([self.commands.take(n) for n in ("stop", "sample", "save")], dtype=torch.int32)
        if self.world > 1:
            from accelerate.utils import broadcast

            flags = broadcast(flags.to(self.device), from_process=0).cpu()
        stop, sample_now, save_now = (bool(x) for x in flags.tolist())
        return stop, sample_now, save_now

    # --- the run -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything before the first step: model check, data, model, class images, caches, LoRA, resume.

        A stop command is honoured between phases: loading a real model or generating class images
        takes minutes, and a cancel must not wait for all of it.
        """
        # Checks before work, cheapest first: the config is valid already; then the model file's
        # header and size, then every photo; only then is anything loaded.
        for phase in (self.check_model, self.load_data, self.load_model, self.prepare_class_images,
                      self.build_caches, self.setup_training, self.resume_if_possible, self.check_intermediate_loras,
                      self.check_disk_space):
            self.commands.check_stop()
            phase()
        for model in self.trainable_models:
            model.train()

    def loop(self) -> RunResult:
        cfg, events = self.config, self.events
        total = cfg.max_train_steps
        events.emit("progress", phase="train", step=self.step, total=total)
        train_seconds, first = 0.0, self.step
        if self.step in cfg.intermediate_lora_steps():
            # Resumed at a step whose LoRA file is missing: a run that ended there (it was then the final
            # LoRA) and now trains longer, or a crash right after the checkpoint. The weights are that step's.
            self.save_intermediate_lora(keep_this_trainings=True)
        while self.step < total:
            stop, sample_now, save_now = self.take_commands()
            if stop:
                path = self.save_checkpoint()
                saved = path is not None or not self.accelerator.is_main_process
                events.status(f"stopped at step {self.step}; " + (
                    "checkpoint saved" if saved else "no room on the disk for its checkpoint: it cannot resume here"))
                return RunResult("stopped", self.step, path / checkpoint.LORA_FILE if path and not self.full else None)
            started = time.perf_counter()
            metrics = self.optimisation_step()
            train_seconds += time.perf_counter() - started  # samples and checkpoints not included
            ms_per_step = 1000 * train_seconds / (self.step - first)
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            events.emit("progress", phase="train", step=self.step, total=total)
            events.emit("metrics", step=self.step, **metrics, lr_unet=lrs[0],
                        lr_text_encoder=lrs[1] if len(lrs) > 1 else 0.0, ms_per_step=round(ms_per_step, 2),
                        eta_s=round(ms_per_step * (total - self.step) / 1000, 1), **peak_memory_gb(self.device))
            if self.step < total:
                # Before the checkpoint: a checkpoint at this step then implies its LoRA file exists.
                if cfg.save_lora_every_n_steps and self.step % cfg.save_lora_every_n_steps == 0:
                    self.save_intermediate_lora()
                if save_now or (cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0):
                    self.save_checkpoint()
                if sample_now or (cfg.validation_steps and self.step % cfg.validation_steps == 0):
                    self.sample()
        self.save_checkpoint()  # lets a later run with more steps continue from here
        self.sample()
        if self.full:
            model_path, lora_path = self.save_final_model()
            return RunResult("done", self.step, lora_path, checkpoint_path=model_path)
        return RunResult("done", self.step, self.save_final_lora())


def _forget_previous_single_process_run() -> None:
    """accelerate keeps process-wide state and refuses a second run with other precision settings;
    a launcher that trains several times in one process (tests, notebooks) needs a clean slate.
    Under ``accelerate launch`` the state belongs to the launch and is left alone."""
    import os

    from accelerate.state import AcceleratorState, GradientState

    if "WORLD_SIZE" not in os.environ and AcceleratorState._shared_state:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _identity_key(path: Path) -> str | None:
    """The training identity key in a LoRA's header; None when it has none or cannot be read."""
    from .safetensors_file import read_header

    try:
        text = dict(read_header(Path(long_path(path))).metadata).get(identity.METADATA_KEY)
        return identity.TrainingIdentity.from_json(text).key() if text else None
    except Exception:  # noqa: BLE001 - an unreadable file is not this training's
        return None


def derived_seed(*parts: object) -> int:
    """A seed from the run seed and a position; unlike hash(), stable across processes."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def train(config: TrainConfig, events: EventWriter, commands: Commands) -> RunResult:
    """Run training to ``max_train_steps`` or until a stop command; return where the LoRA is."""
    out = Path(config.output_path)
    if out.exists() and not config.overwrite:
        raise ConfigError("output_path", f"{out} already exists; choose another name or set overwrite")
    run = TrainingRun(config, events, commands)
    try:
        run.prepare()
    except StopRequested:
        events.status("stopped before training started; nothing to save")
        return RunResult("stopped", 0, None)
    return run.loop()
