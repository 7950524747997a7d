"""Device and precision choices, and the GPU state a checkpoint must carry, checked on the CPU.

The decisions are pure functions fed the facts about a machine (CUDA present, native bf16, MPS
built/usable), so every branch runs here; what only a GPU or a Mac can execute (bf16/fp16 kernels,
the CUDA generators, MPS) is covered by these decisions and by injected setters, not run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_dreambooth_lora.trainer import checkpoint, protocol, sampling
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from comfyui_dreambooth_lora.trainer.models import ModelSource
from comfyui_dreambooth_lora.trainer.run import train
from comfyui_dreambooth_lora.trainer.runtime import plan_device, plan_precision, upcast_attention
from dreambooth_test_support.paths import DREAMBENCH_DIR
from dreambooth_test_support.tiny_models import tiny_sd2_checkpoint
from safetensors.torch import load_file


# --- mixed precision ----------------------------------------------------------------------------
def test_auto_picks_bf16_only_on_gpus_with_native_bf16() -> None:
    ampere = plan_precision("cuda", "auto", bf16_native=True)
    assert (ampere.mixed_precision, ampere.weight_dtype, ampere.grad_scaler) == ("bf16", torch.bfloat16, False)
    turing = plan_precision("cuda", "auto", bf16_native=False)  # e.g. a T4 or a GTX 10xx: bf16 only emulated
    assert (turing.mixed_precision, turing.weight_dtype, turing.grad_scaler) == ("fp16", torch.float16, True)
    assert "loss scaling" in turing.note


def test_explicit_choices_are_kept_and_slow_ones_are_called_out() -> None:
    emulated = plan_precision("cuda", "bf16", bf16_native=False)
    assert emulated.mixed_precision == "bf16" and emulated.level == "warning" and "emulated" in emulated.note
    assert plan_precision("cuda", "fp16", bf16_native=True).grad_scaler
    assert plan_precision("cuda", "no", bf16_native=True).weight_dtype == torch.float32
    cpu = plan_precision("cpu", "auto", bf16_native=False)
    assert (cpu.mixed_precision, cpu.grad_scaler) == ("no", False)
    assert plan_precision("cpu", "bf16", bf16_native=False).mixed_precision == "bf16"  # trains fine on CPUs
    assert plan_precision("cpu", "fp16", bf16_native=False).level == "warning"


@pytest.mark.parametrize("requested", ["auto", "no", "fp16", "bf16"])
def test_mps_trains_in_fp32_and_says_so_when_asked_otherwise(requested: str) -> None:
    plan = plan_precision("mps", requested, bf16_native=False)
    assert (plan.mixed_precision, plan.weight_dtype, plan.grad_scaler) == ("no", torch.float32, False)
    assert plan.level == ("warning" if requested in ("fp16", "bf16") else "info")


# --- device ---------------------------------------------------------------------------------------
def _device(requested: str = "auto", **facts: Any) -> Any:
    values = {"cuda_available": False, "mps_built": False, "mps_available": False, "mps_error": None,
              "platform": "linux", "machine": "x86_64"}
    values.update(facts)
    return plan_device(requested, **values)


def test_auto_prefers_cuda_then_the_apple_gpu() -> None:
    assert _device(cuda_available=True).device == "cuda"
    mac = _device(mps_built=True, mps_available=True, platform="darwin", machine="arm64")
    assert mac.device == "mps" and "Apple GPU" in mac.note


def test_cpu_fallback_is_never_silent() -> None:
    cases = {
        "broken op": _device(mps_built=True, mps_available=True, mps_error="NotImplementedError: aten::foo",
                             platform="darwin", machine="arm64"),
        "no mps in torch": _device(platform="darwin", machine="arm64"),
        "old macos": _device(mps_built=True, platform="darwin", machine="arm64"),
        "intel mac": _device(platform="darwin", machine="x86_64"),
        "no gpu": _device(),
    }
    for name, plan in cases.items():
        assert plan.device == "cpu" and plan.level == "warning" and "CPU" in plan.note, name
    assert "aten::foo" in cases["broken op"].note
    assert "no MPS support" in cases["no mps in torch"].note
    assert "macOS 12.3" in cases["old macos"].note
    assert "CUDA" in cases["no gpu"].note


def test_explicit_devices_fail_loudly_when_missing() -> None:
    assert _device("cpu", cuda_available=True).device == "cpu"
    assert _device("cuda:1", cuda_available=True).device == "cuda:1"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        _device("cuda")
    with pytest.raises(ConfigError, match="Apple GPU"):
        _device("mps", platform="darwin", machine="arm64")
    with pytest.raises(ConfigError, match="aten::foo"):
        _device("mps", mps_built=True, mps_available=True, mps_error="aten::foo")
    assert _device("mps", mps_built=True, mps_available=True).device == "mps"
    assert TrainConfig.from_dict({"pretrained_model": "m", "instance_data_dir": "d", "instance_prompt": "p",
                                  "output_dir": "o", "device": "mps"}).device == "mps"


# --- GPU state in checkpoints -----------------------------------------------------------------------
def _scaler_after_overflow() -> torch.amp.GradScaler:
    """A real loss scaler (the CPU one is the same class a GPU run uses) that has backed off once."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    for factor in (float("inf"), 1.0, 1.0):
        optimizer.zero_grad()
        scaler.scale((param * factor).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    return scaler


def test_checkpoint_carries_the_loss_scale_and_the_gpu_generators(tmp_path: Path) -> None:
    scaler = _scaler_after_overflow()
    assert scaler.get_scale() == 2.0**15  # backed off once: the state a resume must not lose
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    fake_cuda = [torch.randint(0, 255, (16,), dtype=torch.uint8) for _ in range(2)]
    path = checkpoint.save_checkpoint(
        tmp_path, step=7, signature="sig", trainable={"w": param.detach()}, optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(), lora_tensors={"x": torch.zeros(1)}, lora_metadata={}, keep=0,
        data_position={}, scaler_state=scaler.state_dict(),
        rng_state={"torch_rng": torch.get_rng_state(), "cuda_rng": fake_cuda})
    step, _, extra = checkpoint.load_checkpoint(path)
    assert step == 7

    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    warnings = checkpoint.restore_training_state(extra, optimizer=optimizer, scheduler=scheduler, scaler=resumed)
    assert resumed.state_dict() == scaler.state_dict()
    assert warnings == ["the checkpoint was made on a GPU and is resumed without one: training continues, but "
                        "not bit-for-bit as the GPU run would have"]

    restored: dict[int, torch.Tensor] = {}
    assert checkpoint.restore_rng_state(extra, cuda_device_count=2, set_cuda_state=restored.__setitem__) == []
    assert sorted(restored) == [0, 1] and all(torch.equal(restored[i], fake_cuda[i]) for i in (0, 1))
    restored.clear()
    warnings = checkpoint.restore_rng_state(extra, cuda_device_count=1, set_cuda_state=restored.__setitem__)
    assert list(restored) == [0] and "2 GPU generator(s)" in warnings[0]


def test_cpu_checkpoint_has_no_gpu_state_and_resumes_without_warnings(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = checkpoint.save_checkpoint(
        tmp_path, step=1, signature="sig", trainable={"w": param.detach()}, optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(), lora_tensors={"x": torch.zeros(1)}, lora_metadata={}, keep=0,
        data_position={})
    expected = torch.rand(4)  # what the generator gives next from the saved state
    _, _, extra = checkpoint.load_checkpoint(path)
    assert "grad_scaler" not in extra and "cuda_rng" not in extra
    assert checkpoint.restore_training_state(extra, optimizer=optimizer, scheduler=scheduler, scaler=None) == []
    assert torch.equal(torch.rand(4), expected)


# --- SD2 attention in fp32 ---------------------------------------------------------------------------
def test_sd2_unet_is_upcast_and_its_plain_attention_stays_finite_in_fp16(comfyui_root: Path) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor

    source = ModelSource(str(tiny_sd2_checkpoint(comfyui_root)))
    assert source.family == "sd2"
    unet = source.unet()
    assert upcast_attention(unet, source.family)
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert layers and all(m.upcast_attention for m in layers) and unet.config.upcast_attention

    # What the flag prevents: SD2-sized query-key products overflow fp16 on the plain attention path.
    def attention() -> Attention:
        torch.manual_seed(0)
        layer = Attention(query_dim=64, heads=1, dim_head=64, processor=AttnProcessor()).half()
        with torch.no_grad():
            layer.to_q.weight.mul_(100)  # scores near 170,000: past fp16's 65,504
            layer.to_k.weight.mul_(100)
        return layer

    x = torch.randn(1, 8, 64).half() * 4
    plain, upcast = attention(), attention()
    upcast.upcast_attention = True
    with torch.no_grad():
        assert not torch.isfinite(plain(x)).all()
        assert torch.isfinite(upcast(x)).all()


def test_sd1_unet_is_left_alone(tiny_checkpoint: Path) -> None:
    source = ModelSource(str(tiny_checkpoint))
    unet = source.unet()
    assert not upcast_attention(unet, source.family)
    assert not unet.config.upcast_attention


# --- sampling hands the training state back -----------------------------------------------------------
def test_inference_state_turns_dropout_off_and_restores_modes_and_generator() -> None:
    training = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    frozen = torch.nn.Linear(4, 4).eval()
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    with sampling.inference_state(training, frozen, None):
        assert not training.training and not training[1].training
        x = torch.ones(2, 4)
        assert torch.equal(training(x), training(x)), "dropout must be off while sampling"
        torch.rand(100)  # sampling draws from the global generator
    assert training.training and training[1].training and not frozen.training
    assert torch.equal(torch.rand(5), expected), "the training generator must be handed back unchanged"


def test_validation_samples_do_not_change_what_is_trained(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """With LoRA dropout, a sampler that left dropout on or used the training generator would shift
    every later dropout mask: the LoRA with samples every step must equal the one sampled only at the end."""
    def run(name: str, every: int) -> dict[str, torch.Tensor]:
        config = TrainConfig.from_dict({
            "pretrained_model": str(tiny_checkpoint), "instance_data_dir": str(DREAMBENCH_DIR / "dog"),
            "instance_prompt": "a photo of qzx dog", "output_dir": str(tmp_path / name), "resolution": 64,
            "max_train_steps": 3, "rank": 4, "alpha": 4, "train_text_encoder": False, "lora_dropout": 0.3,
            "learning_rate": 1e-3, "cache_dir": str(tmp_path / "cache"), "save_precision": "fp32",
            "validation_prompts": ["a qzx dog"], "validation_steps": every, "validation_inference_steps": 2,
            "resume": "none"})
        stream = io.StringIO()
        result = train(config, protocol.EventWriter(stream), protocol.Commands())
        samples = [json.loads(line) for line in stream.getvalue().splitlines() if '"sample"' in line]
        assert samples, "the run must have sampled"
        return load_file(str(result.lora_path))

    often, once = run("often", 1), run("once", 0)
    assert often.keys() == once.keys()
    assert all(torch.equal(often[k], once[k]) for k in often)
