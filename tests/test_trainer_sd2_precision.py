"""The SD2.x-v path end to end on a tiny checkpoint, and precision settings on the tiny SD1.5 one.

SD2 differs from SD1 where it is easy to get silently wrong: an OpenCLIP text encoder read at its
penultimate layer, "!" padding, linear proj_in with 64-channel heads, and a velocity loss target.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from comfyui_dreambooth_lora.trainer import protocol
from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.models import detect_prediction_type, load_base_model
from comfyui_dreambooth_lora.trainer.run import RunResult, TrainingRun, derived_seed, train
from dreambooth_test_support.paths import DREAMBENCH_DIR, child_env
from dreambooth_test_support.tiny_models import tiny_sd2_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
DOG = DREAMBENCH_DIR / "dog"
PROBE = Path(__file__).resolve().parent / "support" / "comfy_lora_probe.py"
OPEN_CLIP = "cond_stage_model.model."
UNET = "model.diffusion_model."

# Run with ComfyUI's root on sys.path: what ComfyUI makes of the tiny SD2 file, and what its own
# v-prediction heuristic (SD20.model_type) says about the UNet layouts in a second file.
COMFY_DETECT = r"""
import json, logging, sys
root, ckpt, layouts = sys.argv[1:4]
sys.path.insert(0, root)
from comfy.cli_args import args
args.cpu = True
args.fp32_text_enc = True
import comfy.sd, comfy.utils
warnings = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger().addHandler(handler)
model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
config = model.model.model_config
sd = comfy.utils.load_torch_file(layouts, safe_load=True)
names = sorted({k.split("/")[0] for k in sd})
json.dump({
    "config": type(config).__name__,
    "model_type": model.model.model_type.name,
    "clip": type(clip.cond_stage_model).__name__,
    "verdicts": {n: config.model_type(sd, prefix=n + "/" + "model.diffusion_model.").name for n in names},
    "warnings": warnings,
}, sys.stdout)
"""


def make_config(ckpt: Path, out: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "pretrained_model": str(ckpt), "instance_data_dir": str(DOG), "instance_prompt": "a photo of qzx dog",
        "output_dir": str(out), "resolution": 64, "max_train_steps": 2, "rank": 4, "alpha": 4,
        "train_text_encoder": True, "learning_rate": 1e-3, "text_encoder_lr": 1e-3,
        "cache_dir": str(out.parent / "shared-cache"), "resume": "none",
    }
    values.update(overrides)
    return TrainConfig.from_dict(values)


def prepared(config: TrainConfig) -> TrainingRun:
    run = TrainingRun(config, protocol.EventWriter(io.StringIO()), protocol.Commands())
    run.prepare()
    return run


def up_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.endswith("lora_up.weight")}


@pytest.fixture(scope="module")
def sd2_checkpoint(comfyui_root: Path) -> Path:
    return tiny_sd2_checkpoint(comfyui_root)


@pytest.fixture(scope="module")
def sd2_lora(sd2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert DOG.is_dir(), f"missing {DOG}: the DreamBench photos are part of the repository (tests/assets)"
    out = tmp_path_factory.mktemp("sd2 run")
    result = train(make_config(sd2_checkpoint, out / "run"), protocol.EventWriter(io.StringIO()), protocol.Commands())
    assert result.status == "done" and result.step == 2
    return result.lora_path


def open_clip_penultimate(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    """What SD2 conditions on, computed straight from the file's OpenCLIP tensors: every resblock
    but the last (the penultimate layer), then ln_final, with a causal mask and exact GELU."""
    with safe_open(str(ckpt), "pt") as fh:
        sd = {k[len(OPEN_CLIP):]: fh.get_tensor(k).float() for k in fh.keys() if k.startswith(OPEN_CLIP)}
    width = sd["token_embedding.weight"].shape[1]
    heads = width // 64
    blocks = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(blocks - 1):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (t.unflatten(-1, (heads, 64)).transpose(1, 2) for t in
                   F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        x = x + F.linear(attn, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return F.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"])


# --- SD2 ------------------------------------------------------------------------------------------
def test_tiny_sd2_loads_as_v_prediction_with_openclip_penultimate_layer(sd2_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    base = load_base_model(str(sd2_checkpoint), cache_dir=tmp_path)
    assert (base.family, base.prediction_type) == ("sd2", "v_prediction")
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    unet = base.unet.config
    assert unet.cross_attention_dim == 1024 and unet.use_linear_projection
    assert base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 5  # 320 / 64
    with safe_open(str(sd2_checkpoint), "pt") as fh:
        blocks = {k.split(".")[4] for k in fh.keys() if k.startswith(OPEN_CLIP + "transformer.resblocks.")}
    assert base.text_encoders[0].config.num_hidden_layers == len(blocks) - 1 == 2, "the last block is dropped"

    ids = base.tokenizers[0](["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    end = ids[0].tolist().index(49407)
    assert ids.shape == (1, 77) and ids[0, 0].item() == 49406
    assert base.tokenizers[0].pad_token == "!" and set(ids[0, end + 1:].tolist()) == {0}, "SD2 pads with '!' (id 0)"
    with torch.no_grad():
        hidden = base.text_encoders[0](ids)[0]
    assert hidden.shape == (1, 77, 1024)
    torch.testing.assert_close(hidden, open_clip_penultimate(sd2_checkpoint, ids), rtol=1e-4, atol=1e-4)


def test_sd2_loss_target_is_the_velocity(sd2_checkpoint: Path, tmp_path: Path) -> None:
    run = prepared(make_config(sd2_checkpoint, tmp_path / "run"))
    cfg, sched = run.config, run.base.noise_scheduler
    with torch.no_grad():
        loss, instance, _ = run.loss_for_micro_batch(0)
        # The same micro-batch by hand: latents, noise and timesteps come from seeds fixed by its index.
        latents, prompts, _geometry = run._batch(0)
        gen = torch.Generator().manual_seed(derived_seed(cfg.seed, 0, 0, "noise"))
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        pred = run.unet(noisy, t, run._embeddings(prompts).hidden).sample
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    expected = F.mse_loss(pred, velocity)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5), (loss.item(), expected.item())
    assert math.isclose(instance, expected.item(), rel_tol=1e-5)
    eps_loss = F.mse_loss(pred, noise).item()
    assert not math.isclose(loss.item(), eps_loss, rel_tol=1e-2), "the check must tell velocity from noise"


def test_sd2_lora_has_text_model_keys_and_v2_metadata(sd2_lora: Path) -> None:
    tensors = load_file(str(sd2_lora))
    te = {k.split(".")[0] for k in tensors if k.startswith("lora_te")}
    assert te and all(m.startswith("lora_te_text_model_encoder_layers_") for m in te), sorted(te)[:3]
    assert {m.split("_")[6] for m in te} == {"0", "1"}, "both kept OpenCLIP layers are trained"
    assert any(k.startswith("lora_unet_") for k in tensors)
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())
    assert any(torch.any(v != 0) for v in up_weights(tensors).values()), "the LoRA was trained"
    with safe_open(str(sd2_lora), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_v_parameterization"] == "True", meta
    assert meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["dreambooth.prediction_type"] == "v_prediction"


@pytest.mark.comfy
def test_sd2_lora_patches_every_module_in_comfyui(sd2_lora: Path, sd2_checkpoint: Path, comfyui_root: Path) -> None:
    proc = subprocess.run([sys.executable, str(PROBE), str(comfyui_root), str(sd2_checkpoint), str(sd2_lora)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=comfyui_root,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    modules = {k.split(".")[0] for k in load_file(str(sd2_lora))}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert not [w for w in report["warnings"] if "lora key not loaded" in w], report["warnings"]
    assert report["patches"] == len(modules)
    assert report["unet_patched"] == len(unet)
    assert report["clip_patched"] == len(modules - unet)


@pytest.mark.comfy
def test_comfyui_reads_the_tiny_file_as_sd2_and_agrees_on_v_prediction(
    sd2_checkpoint: Path, comfyui_root: Path, tmp_path: Path
) -> None:
    """ComfyUI's heuristic reads output_blocks.11, which the 2-block tiny UNet lacks (ComfyUI calls
    it EPS); ours reads the last output block. On real SD2 layouts (12 output blocks) both agree."""
    gen = torch.Generator().manual_seed(0)
    layouts: dict[str, dict[str, torch.Tensor]] = {}
    for name, spread in (("v", 0.3), ("eps", 0.02)):
        sd = {UNET + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
        for i in range(12):  # SD2: 4 levels x 3 output blocks; the lowest level has no attention
            sd[f"{UNET}output_blocks.{i}.0.out_layers.3.bias"] = torch.zeros(4)
            if i >= 3:
                sd[f"{UNET}output_blocks.{i}.1.transformer_blocks.0.norm1.bias"] = torch.randn(320, generator=gen) * 0.02
        sd[f"{UNET}output_blocks.11.1.transformer_blocks.0.norm1.bias"] = torch.randn(320, generator=gen) * spread
        layouts[name] = sd
    file = tmp_path / "layouts.safetensors"
    save_file({f"{n}/{k}": v for n, sd in layouts.items() for k, v in sd.items()}, str(file))
    proc = subprocess.run([sys.executable, "-c", COMFY_DETECT, str(comfyui_root), str(sd2_checkpoint), str(file)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=comfyui_root,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert (report["config"], report["clip"]) == ("SD20", "SD2ClipModel"), report
    # ComfyUI builds SD2's text encoder at a fixed 24 layers: only the layers the tiny file lacks go missing.
    missing = [w for w in report["warnings"] if w.startswith("clip missing")]
    kept = (".layers.0.", ".layers.1.", ".layers.2.", "token_embedding", "final_layer_norm")
    assert missing and not [k for w in missing for k in kept if k in w], missing
    ours = {n: detect_prediction_type(sd, "sd2") for n, sd in layouts.items()}
    assert ours == {"v": "v_prediction", "eps": "epsilon"}
    assert report["verdicts"] == {"v": "V_PREDICTION", "eps": "EPS"}


# --- precision on SD1 -----------------------------------------------------------------------------
def run_to_end(config: TrainConfig) -> tuple[TrainingRun, RunResult]:
    run = prepared(config)
    return run, run.loop()


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state and refuses a second mixed-precision setting in the
    same process (the CLI runs one training per process); reset it around the run, as
    accelerate's own AccelerateTestCase does, so other in-process runs are unaffected."""
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    reset()
    try:
        yield
    finally:
        reset()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_bf16_on_cpu_trains_and_writes_a_finite_lora(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = make_config(tiny_checkpoint, tmp_path / "run", mixed_precision="bf16", device="cpu",
                      train_text_encoder=False)
    run, result = run_to_end(cfg)
    assert run.runtime.mixed_precision == "bf16"
    assert next(run.base.unet.parameters()).dtype == torch.bfloat16, "the frozen base is held in bf16"
    assert all(p.dtype == torch.float32 for g in run.optimizer.param_groups for p in g["params"])
    assert result.status == "done" and result.step == 2
    tensors = load_file(str(result.lora_path))
    assert tensors and all(torch.isfinite(v.float()).all() for v in tensors.values())
    assert any(torch.any(v != 0) for v in up_weights(tensors).values()), "the LoRA was trained"


def test_gradient_checkpointing_gives_the_same_lora(tiny_checkpoint: Path, tmp_path: Path) -> None:
    loras = {}
    for checkpointing in (False, True):
        cfg = make_config(tiny_checkpoint, tmp_path / f"run-{checkpointing}", gradient_checkpointing=checkpointing,
                          save_precision="fp32", mixed_precision="no", device="cpu", seed=3)
        run, result = run_to_end(cfg)
        assert run.base.unet.is_gradient_checkpointing is checkpointing
        te = run.base.text_encoders[0]  # recent transformers renamed the flag and deprecated the old name
        flag = "is_activation_checkpointing" if hasattr(te, "is_activation_checkpointing") else \
            "is_gradient_checkpointing"
        assert getattr(te, flag) is checkpointing
        loras[checkpointing] = load_file(str(result.lora_path))
    plain, checkpointed = loras[False], loras[True]
    assert set(plain) == set(checkpointed) and any(k.startswith("lora_te_") for k in plain)
    assert any(torch.any(v != 0) for v in up_weights(plain).values()), "the LoRA was trained"
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-4, atol=1e-5, msg=key)
