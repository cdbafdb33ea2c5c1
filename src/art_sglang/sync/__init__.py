"""How a new policy reaches the server: one small module per method, plus the one-GPU memory swap.

Each method has `apply(step, checkpoint)`, called after the trainer saved `checkpoint` for `step`, which returns
its timings once new requests are served by the new policy; and `restore(step, checkpoint)`, which puts the
current policy back on a freshly (re)started server.
"""

from .base import SyncContext, WeightSync
from .disk import DiskSync
from .lora import LoraSync
from .restart import RestartSync
from .timeshare import GpuTimeShare

METHODS: dict[str, type[WeightSync]] = {"lora": LoraSync, "disk": DiskSync, "restart": RestartSync}

__all__ = ["METHODS", "DiskSync", "GpuTimeShare", "LoraSync", "RestartSync", "SyncContext", "WeightSync"]
