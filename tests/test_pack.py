"""The adapter payload for SGLang's `/load_lora_adapter_from_tensors`, loaded by SGLang's own deserializer (in the
server's venv, with the server's torch), equals the trainer's tensors: names, shapes, dtypes and every value."""

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


def test_a_packed_adapter_loads_in_the_server_as_the_same_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 8, generator=g),
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": torch.randn(8, 96, generator=g).bfloat16(),
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": torch.randn(64, 8, generator=g)[:, :4].T,
        "base_model.model.model.layers.2.mlp.up_proj.lora_A.weight": torch.randn(8, 40000, generator=g),  # > 1 MB
    }
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
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name], t), name
    # The adapter's bytes travel once, not once per tensor.
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    assert size < len(packed) < size + 4096
