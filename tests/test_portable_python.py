"""The Windows portable build's layout, reproduced: an embedded-style Python with a ``._pth`` file.

Such an interpreter ignores PYTHONPATH and puts neither the working directory nor a script's folder
on sys.path (see ``dreambooth_test_support.portable_python``). The README's main-job command is run
with it the way portable users run things (``python -s ...``): it starts a real ComfyUI with the same
interpreter (``python -s main.py``, ComfyUI's folder listed in the ``._pth`` file as the portable
build does), and the train -> generate example workflow runs end to end, the trainer included.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from dreambooth_test_support.paths import REPO_ROOT, child_env
from dreambooth_test_support.portable_python import build_portable_python
from safetensors import safe_open

pytestmark = pytest.mark.skipif(os.name == "nt", reason="builds a POSIX layout; Windows has the real thing")


@pytest.mark.comfy
@pytest.mark.slow
def test_the_main_job_runs_end_to_end_under_an_embedded_python(comfyui_root: Path, tiny_checkpoint: Path,
                                                                tiny_controlnet: Path, tmp_path: Path) -> None:
    python = build_portable_python(tmp_path / "python_embeded", extra_paths=[comfyui_root])
    out = tmp_path / "demo out"
    elsewhere = tmp_path / "somewhere else"
    elsewhere.mkdir()
    # The pack's folder on PYTHONPATH and as the working directory would hide the bug: neither may matter.
    env = child_env({"PYTHONPATH": str(REPO_ROOT)})
    proc = subprocess.run([str(python), "-s", str(REPO_ROOT / "scripts" / "demo.py"), "--out", str(out),
                           "--steps", "8"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    output = proc.stdout + proc.stderr
    server_log_path = out / "comfyui" / "comfyui.log"
    server_log = server_log_path.read_text(encoding="utf-8", errors="replace") if server_log_path.is_file() else ""
    assert proc.returncode == 0, f"{output[-6000:]}\n--- ComfyUI log ---\n{server_log[-6000:]}"

    lora = out / "comfyui" / "models" / "loras" / "demo" / "subject.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_steps"] == "8"
    assert any(k.startswith("lora_unet_") for k in keys)
    assert "generated image:" in output, output[-3000:]
    # The trainer was started with the embedded interpreter, isolated like it.
    launches = [line for line in server_log.splitlines() if "starting trainer:" in line]
    assert launches and all(str(python) in line and " -I " in line for line in launches), server_log[-6000:]
    assert "No module named 'trainer'" not in server_log
