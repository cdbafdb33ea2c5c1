"""The offline small model and the CLI."""

from __future__ import annotations

import json

import pytest

from art_sglang import ModelNotFoundError
from art_sglang.cli import main
from art_sglang.models import check_model_dir, small_model


def test_small_model_is_a_complete_reusable_directory(model_path):
    assert check_model_dir(model_path) == model_path
    config = json.loads((model_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    mtime = (model_path / "model.safetensors").stat().st_mtime
    assert small_model(quiet=True) == model_path  # reused, not rebuilt
    assert (model_path / "model.safetensors").stat().st_mtime == mtime


def test_missing_and_corrupt_model_directories(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist.*art-sglang model"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        check_model_dir(tmp_path / "m")
    for name in ("model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        (tmp_path / "m" / name).write_text("x")
    with pytest.raises(ModelNotFoundError, match="config.json is corrupt"):
        check_model_dir(tmp_path / "m")


def test_doctor_reports_mode_versions_and_server(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "GPUs found: 0" in out
    assert "mode: cpu" in out
    assert "sglang 0.5.15.post1" in out
    assert "openpipe-art: 0.5.18" in out


def test_doctor_says_what_to_fix_without_a_server_venv(capsys, monkeypatch):
    monkeypatch.setenv("ART_SGLANG_SERVER_PYTHON", "/nonexistent/python")
    assert main(["doctor"]) == 1
    assert "bash scripts/setup_sglang.sh" in capsys.readouterr().out
