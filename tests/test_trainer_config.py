"""Config validation and the CLI's handling of bad configs (fast, no model)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig, bounds
from comfyui_dreambooth_lora.trainer.protocol import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[1]
BASE = {"pretrained_model": "m.safetensors", "instance_data_dir": "photos", "instance_prompt": "a photo of zwx dog",
        "output_dir": "out"}


def test_defaults_are_filled_from_other_keys() -> None:
    cfg = TrainConfig.from_dict(BASE)
    assert cfg.output_path == str(Path("out") / "lora.safetensors")
    assert cfg.cache_dir == str(Path("out") / "cache")
    assert cfg.text_encoder_rank == cfg.rank and cfg.text_encoder_alpha == cfg.alpha
    assert cfg.lora_name == "lora"


@pytest.mark.parametrize(
    ("patch", "key", "fragment"),
    [
        ({"learning_rat": 1e-4}, "learning_rat", "did you mean 'learning_rate'"),
        ({"rank": "16"}, "rank", "must be an integer"),
        ({"rank": 0}, "rank", ">= 1"),
        ({"resolution": 500}, "resolution", "multiple of 8"),
        ({"mixed_precision": "fp8"}, "mixed_precision", "must be one of"),
        ({"train_text_encoder": "yes"}, "train_text_encoder", "true or false"),
        ({"instance_prompt": ""}, "instance_prompt", "required"),
        ({"with_prior_preservation": True}, "class_prompt", "required when with_prior_preservation"),
        ({"background": [1, 2]}, "background", "list of 3"),
        ({"output_path": "x.ckpt"}, "output_path", ".safetensors"),
        ({"device": "gpu"}, "device", "'auto', 'cpu'"),
        ({"lora_dropout": 1.5}, "lora_dropout", "<= 0.99"),
        ({"learning_rate": 0.0}, "learning_rate", ">= 1e-07"),
        ({"num_class_images": 0}, "num_class_images", ">= 1"),
        ({"adam_beta2": 1.0}, "adam_beta2", "<= 0.9999"),
        ({"text_encoder_rank": 0}, "text_encoder_rank", ">= 1"),
    ],
)
def test_bad_values_name_the_key(patch: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({**BASE, **patch})
    assert info.value.key == key
    assert fragment in str(info.value)


# Settings that only apply together with another one.
NEEDS = {"extract_lora_rank": {"training_method": "full"}}


def test_every_bound_is_enforced_at_its_edge() -> None:
    """Each field's (min, max) is what validation uses: the bound itself passes, one step past fails."""
    checked = 0
    for f in dataclasses.fields(TrainConfig):
        low, high = bounds(f.name)
        step = 1 if f.type in ("int", "int | None") else 1e-9
        base = {**BASE, **NEEDS.get(f.name, {})}
        for edge, outside in ((low, None if low is None else low - step), (high, None if high is None else high + step)):
            if edge is None:
                continue
            TrainConfig.from_dict({**base, f.name: edge})
            with pytest.raises(ConfigError) as info:
                TrainConfig.from_dict({**base, f.name: outside})
            assert info.value.key == f.name
            checked += 1
    assert checked >= 25, "the ranges moved out of the field metadata?"


def test_round_trip_and_signature_ignores_output_only_settings() -> None:
    cfg = TrainConfig.from_dict({**BASE, "background": [0, 0, 0], "validation_prompts": ["a"]})
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    other = TrainConfig.from_dict({**BASE, "max_train_steps": 9, "validation_prompts": ["b"]})
    assert other.training_signature() == TrainConfig.from_dict(BASE).training_signature()
    assert TrainConfig.from_dict({**BASE, "rank": 8}).training_signature() != other.training_signature()


def _run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_bad_config_exits_with_config_code_and_error_event(tmp_path: Path) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({**BASE, "rnak": 4}), encoding="utf-8")
    proc = _run_cli(["--config", str(cfg)], tmp_path)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["type"] for e in events] == ["hello", "error"]
    assert events[0]["engine"] == "dreambooth-lora-trainer"
    assert events[1]["kind"] == "config" and events[1]["key"] == "rnak"
    assert "did you mean 'rank'" in events[1]["message"]
    assert all(e["v"] == 1 and isinstance(e["time"], float) for e in events)


def test_cli_help_lists_every_key(tmp_path: Path) -> None:
    proc = _run_cli(["--help"], tmp_path)
    assert proc.returncode == 0
    for key in ("instance_prompt", "with_prior_preservation", "text_encoder_lr", "checkpointing_steps"):
        assert key in proc.stdout
