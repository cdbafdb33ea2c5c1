"""Tensors as SGLang's `/load_lora_adapter_from_tensors` takes them: a pickle the server's `SafeUnpickler` loads.

The server's torch is not the trainer's (two venvs), and torch's own tensor pickling goes through its private
rebuild helpers and saves a storage once per view. So the tensors travel as one buffer per dtype and each tensor as
public torch calls on it (`frombuffer`, `narrow`, `reshape`): the pickle holds the bytes once, and the server
rebuilds views of them without a copy.

The packer keeps its host memory (pinned on a GPU machine) from one step to the next: fresh memory costs a page
fault per page, which made copying and pickling a 7B model's adapter several times slower than the copy itself
(`benchmarks/shared_budget.py`: 21 ms in all, against 105 ms to copy it tensor by tensor into new memory).
"""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path
from typing import Any

import torch


class _Call:
    """Pickles as `fn(*args)`, called when the pickle is loaded."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


class _Into:
    """A file that writes into a reused bytearray (grown when too small, cut to what was written). Large writes are
    copied by torch, with several threads (a bytearray slice assignment copies with one, and slowly)."""

    def __init__(self, buffer: bytearray) -> None:
        self.buffer, self.size = buffer, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        end = self.size + view.nbytes
        if end > len(self.buffer):
            self.buffer.extend(bytes(end - len(self.buffer)))
        if view.nbytes < 1 << 20:
            self.buffer[self.size : end] = view
        else:
            target = torch.frombuffer(self.buffer, dtype=torch.uint8, offset=self.size, count=view.nbytes)
            target.copy_(torch.frombuffer(view, dtype=torch.uint8))
            del target  # releases the buffer, which may grow again
        self.size = end
        return view.nbytes


class TensorPacker:
    """Packs tensors (on any device) for the server; its host memory is reused by the next `pack`."""

    def __init__(self) -> None:
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        self._out = bytearray()

    def _stage(self, names: list[str], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensors, flattened into one host buffer of their dtype."""
        first = tensors[names[0]]
        count = sum(tensors[n].numel() for n in names)
        staging = self._staging.get(first.dtype)
        if staging is None or staging.numel() != count:
            pin = first.device.type == "cuda"  # pinned: the device-to-host copy runs at full speed
            staging = self._staging[first.dtype] = torch.empty(count, dtype=first.dtype, pin_memory=pin)
        if first.device.type == "cpu":
            torch.cat([tensors[n].detach().reshape(-1) for n in names], out=staging)
        else:  # one transfer, not one per tensor
            staging.copy_(torch.cat([tensors[n].detach().reshape(-1) for n in names]))
        return staging

    def pack(self, tensors: dict[str, torch.Tensor]) -> bytearray:
        """The pickle of `tensors` as views of one host buffer per dtype; valid until the next `pack`."""
        calls: dict[str, _Call] = {}
        for dtype, names in _by_dtype(tensors).items():
            staging = self._stage(names, tensors)
            buffer = pickle.PickleBuffer(staging.view(torch.uint8).numpy())  # written in place, as a bytearray
            base = _Call(functools.partial(torch.frombuffer, dtype=dtype), buffer)
            offset = 0
            for n in names:
                shape, count = tuple(tensors[n].shape), tensors[n].numel()
                calls[n] = _Call(torch.reshape, _Call(torch.narrow, base, 0, offset, count), shape)
                offset += count
        into = _Into(self._out)
        pickle.Pickler(into, protocol=5).dump({n: calls[n] for n in tensors})
        del self._out[into.size :]
        return self._out

    def write_safetensors(self, tensors: dict[str, torch.Tensor], path: str | Path) -> int:
        """Write `tensors` as a safetensors file (what `save_file` writes) from the staging buffers: one
        device-to-host copy, then one write per dtype. Returns the file's size."""
        header: dict[str, Any] = {}
        buffers, offset = [], 0
        for dtype, names in _by_dtype(tensors).items():
            staging = self._stage(names, tensors)
            for n in names:
                size = tensors[n].numel() * staging.element_size()
                header[n] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(tensors[n].shape)}
                header[n]["data_offsets"] = [offset, offset + size]
                offset += size
            buffers.append(staging.view(torch.uint8).numpy())
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(path, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            for buffer in buffers:
                f.write(memoryview(buffer))
        return 8 + len(encoded) + offset


def _by_dtype(tensors: dict[str, torch.Tensor]) -> dict[torch.dtype, list[str]]:
    """The tensors' names by dtype (each dtype is staged in one host buffer)."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    return by_dtype


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def checkpoint_payload(directory: str | Path) -> tuple[dict[str, Any], bytes]:
    """A saved adapter (adapter_config.json, adapter_model.safetensors) as `/load_lora_adapter_from_tensors` takes
    it: for a server that cannot read this machine's files."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return config, bytes(TensorPacker().pack(tensors))
