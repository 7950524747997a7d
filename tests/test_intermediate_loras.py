"""LoRAs saved every save_lora_every_n_steps steps: real kohya files the engine writes, and the train node
puts under models/loras/<lora_name>_steps/ and returns as its intermediate_loras output."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_dreambooth_lora.trainer import protocol
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from comfyui_dreambooth_lora.trainer.run import train
from dreambooth_test_support.paths import sibling_test_module
from dreambooth_test_support.training import copy_dog_photos, tiny_run_values
from safetensors import safe_open
from safetensors.torch import save_file


def _run(config: TrainConfig) -> Any:
    return train(config, protocol.EventWriter(io.StringIO()), protocol.Commands())


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is no dict


def test_a_lora_file_every_n_steps_but_not_at_the_last(tiny_checkpoint: Path, tmp_path: Path) -> None:
    photos = copy_dog_photos(tmp_path / "photos", count=2)
    out = tmp_path / "run"
    config = TrainConfig.from_dict(tiny_run_values(tiny_checkpoint, photos, out, max_train_steps=6,
                                                   save_lora_every_n_steps=2, learning_rate=1e-3))
    result = _run(config)
    folder = out / "loras"
    assert sorted(p.name for p in folder.iterdir()) == ["lora_step000002.safetensors", "lora_step000004.safetensors"]
    final_meta, final = _read(result.lora_path)
    tensors = {}
    for step in (2, 4):
        meta, tensors[step] = _read(folder / f"lora_step{step:06d}.safetensors")
        assert meta["ss_steps"] == str(step) and final_meta["ss_steps"] == "6"
        assert {k: v for k, v in meta.items() if k != "ss_steps"} == \
            {k: v for k, v in final_meta.items() if k != "ss_steps"}, "the final LoRA's header, with its step"
        assert tensors[step].keys() == final.keys() and all(k.startswith("lora_unet_") for k in final)
    ups = [k for k in final if k.endswith("lora_up.weight")]
    for a, b in ((tensors[2], tensors[4]), (tensors[4], final), (tensors[2], final)):
        assert any(not torch.equal(a[k], b[k]) for k in ups), "each file holds the weights of its own step"

    # Another training (other seed) aiming at the same files is refused before its first step, naming the file.
    other = TrainConfig.from_dict(tiny_run_values(
        tiny_checkpoint, photos, tmp_path / "other", max_train_steps=6, save_lora_every_n_steps=2, seed=1,
        intermediate_lora_dir=str(folder), output_path=str(tmp_path / "other" / "lora.safetensors")))
    before = (folder / "lora_step000002.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"lora_step000002\.safetensors already exists.*overwrite"):
        _run(other)
    assert (folder / "lora_step000002.safetensors").read_bytes() == before
    assert not (tmp_path / "other" / "checkpoints").exists(), "refused before training started"


def test_a_longer_run_resumed_keeps_the_earlier_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """4 steps, then the same training to 6 (a constant schedule continues): step 2's file stays as the
    first run wrote it, and step 4, the first run's final LoRA, gets its file when the second run resumes."""
    photos = copy_dog_photos(tmp_path / "photos", count=2)
    out = tmp_path / "run"

    def config(steps: int, part: str) -> TrainConfig:
        return TrainConfig.from_dict(tiny_run_values(tiny_checkpoint, photos, out, max_train_steps=steps,
                                                     save_lora_every_n_steps=2, learning_rate=1e-3,
                                                     output_path=str(out / part / "lora.safetensors")))

    first = _run(config(4, "first"))
    step2 = out / "loras" / "lora_step000002.safetensors"
    written = step2.read_bytes()
    events = io.StringIO()
    second = train(config(6, "second"), protocol.EventWriter(events), protocol.Commands())
    assert "resumed from step_000004" in events.getvalue()
    assert sorted(p.name for p in (out / "loras").iterdir()) == ["lora_step000002.safetensors",
                                                                "lora_step000004.safetensors"]
    assert step2.read_bytes() == written
    meta, step4 = _read(out / "loras" / "lora_step000004.safetensors")
    assert meta["ss_steps"] == "4" and meta["ss_max_train_steps"] == "6"
    _, final4 = _read(first.lora_path)
    assert all(torch.equal(step4[k], final4[k]) for k in final4), "the resumed weights are step 4's"
    assert _read(second.lora_path)[0]["ss_steps"] == "6"


# --------------------------------------------------------------------------------------------- the node



def _listed_names(result: Any, node: str) -> list[str]:
    """The names in the intermediate_loras list, as core's Preview as Text node shows the payload."""
    text = "".join(result.outputs[node]["text"])
    return re.findall(r"name='([^']+)'", text)


@pytest.mark.comfy
def test_train_node_saves_them_under_models_loras_and_lists_them(comfy_server: Any) -> None:
    helpers = sibling_test_module("test_nodes_train")
    name = f"test_steps_{uuid.uuid4().hex[:6]}"
    folder = helpers.add_photos(comfy_server, f"steps {name}", count=2)
    prompt = helpers.train_prompt(folder, name, steps=5, train_text_encoder=False, options=["20", 0])
    del prompt["3"], prompt["4"], prompt["5"]
    prompt["20"] = {"class_type": "DreamBoothOptionsAdvanced", "inputs": {
        "save_precision": "fp16", "checkpoints_total_limit": 1, "resume": "resume automatically",
        "init_lora": "none", "prediction_type": "auto", "attention": "auto", "cache_latents": "on",
        "random_flip": False, "device": "ComfyUI's device", "background": "255, 255, 255",
        "save_lora_every_n_steps": 2}}
    prompt["21"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}}
    first = comfy_server.run_prompt(prompt, timeout=300).raise_for_status()

    steps_dir = comfy_server.models_dir / "loras" / f"{name}_steps"
    files = sorted(p.name for p in steps_dir.iterdir())
    assert files == [f"{name}_step000002.safetensors", f"{name}_step000004.safetensors"]
    expected = [f"{name}_steps/{f}" for f in files]
    assert _listed_names(first, "21") == expected
    for step, file in zip((2, 4), files, strict=True):
        with safe_open(str(steps_dir / file), "pt") as fh:
            assert fh.metadata()["ss_steps"] == str(step)
    listed = comfy_server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"]
    options = listed[1]["options"] if listed[0] == "COMBO" else listed[0]
    assert set(expected) <= set(options), "every LoRA dropdown lists them"

    # A file of another training in the folder is not listed; the reused LoRA returns the same list.
    save_file({"x": torch.zeros(1)}, str(steps_dir / f"{name}_step000003.safetensors"), metadata={"ss_steps": "3"})
    again = comfy_server.run_prompt(prompt, timeout=120).raise_for_status()
    events = helpers.train_events(again)
    assert not [e for e in events if e["type"] == "hello"], f"a trainer was started again: {events}"
    assert any(e.get("reused") for e in events if e["type"] == "status"), events
    assert _listed_names(again, "21") == expected
