"""The adapter as the server loads it equals the trainer's tensors (names, shapes, dtypes and every value), read in
the server's venv with the server's torch: the payload for `/load_lora_adapter_from_tensors` by SGLang's own
deserializer, and the file for `/load_lora_adapter` by the safetensors reader SGLang's LoRA loader uses."""

from __future__ import annotations

import base64
import subprocess

import torch

from art_sglang.server.venv import find_server_python
from art_sglang.trainer.pack import TensorPacker

LOAD = """
import sys, torch
from sglang.srt.utils.common import MultiprocessingSerializer
tensors = MultiprocessingSerializer.deserialize(sys.stdin.read())  # as SGLang's TP worker loads the payload
torch.save({k: v.clone() for k, v in tensors.items()}, sys.argv[1])
"""


READ_FILE = """
import sys, torch
from safetensors.torch import load_file
torch.save({k: v.clone() for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])
"""


def adapter_like() -> dict[str, torch.Tensor]:
    """Tensors of two dtypes, one a non-contiguous view and one over 1 MB."""
    g = torch.Generator().manual_seed(0)
    return {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 8, generator=g),
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": torch.randn(8, 96, generator=g).bfloat16(),
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": torch.randn(64, 8, generator=g)[:, :4].T,
        "base_model.model.model.layers.2.mlp.up_proj.lora_A.weight": torch.randn(8, 40000, generator=g),  # > 1 MB
    }


def assert_same(loaded: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name], t), name


def test_a_packed_adapter_loads_in_the_server_as_the_same_tensors(tmp_path):
    tensors = adapter_like()
    packer = TensorPacker()
    packer.pack({k: torch.zeros_like(v) for k, v in tensors.items()})  # its memory is reused by the next pack
    packed = packer.pack(tensors)
    payload = base64.b64encode(packed).decode()
    out = tmp_path / "loaded.pt"
    subprocess.run(
        [str(find_server_python().path), "-W", "error", "-c", LOAD, str(out)], input=payload, text=True, check=True
    )
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == list(tensors)
    assert_same(loaded, tensors)
    # The adapter's bytes travel once, not once per tensor.
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    assert size < len(packed) < size + 4096


def test_an_adapter_file_loads_in_the_server_as_the_same_tensors(tmp_path):
    tensors = adapter_like()
    packer = TensorPacker()
    path = tmp_path / "adapter_model.safetensors"
    packer.write_safetensors({k: torch.zeros_like(v) for k, v in tensors.items()}, path)
    size = packer.write_safetensors(tensors, path)  # rewritten from the reused staging memory
    assert path.stat().st_size == size
    out = tmp_path / "loaded.pt"
    subprocess.run([str(find_server_python().path), "-W", "error", "-c", READ_FILE, str(path), str(out)], check=True)
    assert_same(torch.load(out, weights_only=True), tensors)
