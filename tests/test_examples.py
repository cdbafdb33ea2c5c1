"""The design's usage snippets, in examples/, run as written (with our import path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent / "src"), **env}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=env.get("CWD", os.getcwd()),
    )


@pytest.mark.parametrize("script", ["explicit_devices.py", "custom_config.py"])
def test_configuration_snippets_run(script):
    out = run(script, 120, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Placement(mode='cpu'" in out.stdout


def test_explicit_devices_are_placed_as_asked_on_a_four_gpu_machine():
    out = run("explicit_devices.py", 120, CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2-GPU setup: Placement(mode='split', inference_device=0, training_devices=[1]" in out.stdout
    assert "4-GPU setup: Placement(mode='split', inference_device=0, training_devices=[1, 2, 3]" in out.stdout


def test_basic_usage_trains_a_step(tmp_path):
    out = run(
        "basic_usage.py",
        600,
        BASE_MODEL="HuggingFaceTB/SmolLM2-135M-Instruct",
        CUDA_VISIBLE_DEVICES="",
        CWD=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained step 1; checkpoint" in out.stdout
    assert (tmp_path / ".art" / "my-project" / "models" / "my-model" / "checkpoints" / "0001").is_dir()
    assert (tmp_path / ".art" / "my-project" / "models" / "my-model" / "history.jsonl").is_file()
