"""How a policy reaches the server: one small module per method, plus the one-GPU time-share.

Each method has one entry point, `publish(step, checkpoint)`: it makes the server serve `step` whatever the server
holds now (the step before, nothing yet after a start or a crash, or a step that failed halfway), and returns its
timings once new requests are served by that policy.
"""

from .base import SyncContext, WeightSync
from .disk import DiskSync
from .lora import LoraSync
from .restart import RestartSync
from .timeshare import GpuTimeShare

METHODS: dict[str, type[WeightSync]] = {"lora": LoraSync, "disk": DiskSync, "restart": RestartSync}

__all__ = ["METHODS", "DiskSync", "GpuTimeShare", "LoraSync", "RestartSync", "SyncContext", "WeightSync"]
