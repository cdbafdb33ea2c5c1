"""The offline small model and the CLI."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from safetensors.torch import save_file

from art_sglang import ModelNotFoundError
from art_sglang.cli import main
from art_sglang.config import ALL_LINEAR
from art_sglang.models import (
    check_model_dir,
    lora_targets,
    resolve_base_model,
    small_model,
    weight_files,
    weight_names,
)


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
    with pytest.raises(ModelNotFoundError, match="model.safetensors or model.safetensors.index.json"):
        check_model_dir(tmp_path / "m")
    for name in ("model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        (tmp_path / "m" / name).write_text("x")
    with pytest.raises(ModelNotFoundError, match="config.json is corrupt"):
        check_model_dir(tmp_path / "m")


def _model_files(directory, weights=("model.safetensors",)):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    for name in ("tokenizer_config.json", "tokenizer.json", *weights):
        (directory / name).write_text("x")
    return directory


def test_base_model_names_resolve_offline(tmp_path, monkeypatch, model_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    local = _model_files(tmp_path / "local")
    assert resolve_base_model(str(local)) == local
    assert resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == model_path
    # A Hugging Face id, as the hub lays out its cache: refs/main names the snapshot.
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = _model_files(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_base_model("org/tiny") == snapshot
    with pytest.raises(ModelNotFoundError) as err:
        resolve_base_model("org/absent")
    message = str(err.value)  # where it looked, and what to do
    assert str(tmp_path / "hub" / "models--org--absent") in message and "nothing is downloaded" in message
    assert "org/absent" in message and "huggingface-cli download org/absent" in message


def test_sharded_checkpoints_are_complete_only_with_every_shard(tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    directory = _model_files(tmp_path / "sharded", weights=("model.safetensors.index.json", shards[0]))
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match=f"incomplete: {shards[1]} missing"):
        check_model_dir(directory)
    (directory / shards[1]).write_text("x")
    assert check_model_dir(directory) == directory


def test_doctor_reports_mode_versions_and_server(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "GPUs found: 0" in out
    assert "mode: cpu" in out
    assert "sglang 0.5.15.post1" in out
    assert f"openpipe-art: {importlib.metadata.version('openpipe-art')}" in out  # the installed one


def test_doctor_says_what_to_fix_without_a_server_venv(capsys, monkeypatch):
    monkeypatch.setenv("ART_SGLANG_SERVER_PYTHON", "/nonexistent/python")
    assert main(["doctor"]) == 1
    assert "bash scripts/setup_sglang.sh" in capsys.readouterr().out


def _checkpoint(directory, names, file="model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.zeros(2, 2) for n in names}, directory / file)
    return directory


def test_lora_targets_use_the_checkpoint_names(tmp_path):
    """q/k/v and gate/up become the fused layers where a checkpoint fuses them (Phi-3); experts are never targets;
    what a checkpoint lacks is reported."""
    layer = "model.layers.0."
    phi3 = [f"{layer}self_attn.qkv_proj.weight", f"{layer}self_attn.o_proj.weight", f"{layer}mlp.gate_up_proj.weight"]
    moe = [f"{layer}self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    moe += [f"{layer}mlp.experts.0.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    assert lora_targets(_checkpoint(tmp_path / "phi3", phi3), list(ALL_LINEAR)) == (
        ["qkv_proj", "o_proj", "gate_up_proj"],
        ["down_proj"],
    )
    assert lora_targets(_checkpoint(tmp_path / "moe", moe), list(ALL_LINEAR)) == (
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        ["gate_proj", "up_proj", "down_proj"],
    )


def test_a_sharded_checkpoint_is_read_from_the_shards_its_index_lists(tmp_path):
    """Repositories may hold another format's weights beside the shards (Mistral's consolidated.safetensors): the
    index decides, as it does for SGLang."""
    directory = _checkpoint(
        tmp_path / "m", ["model.layers.0.self_attn.q_proj.weight"], "model-00001-of-00001.safetensors"
    )
    _checkpoint(directory, ["layers.0.attention.wq.weight"], "consolidated.safetensors")
    index = {"weight_map": {"model.layers.0.self_attn.q_proj.weight": "model-00001-of-00001.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_files(directory) == [directory / "model-00001-of-00001.safetensors"]
    assert weight_names(directory) == ["model.layers.0.self_attn.q_proj.weight"]
