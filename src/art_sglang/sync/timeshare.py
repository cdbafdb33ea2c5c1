"""Shared mode: one GPU time-shared by the server and the trainer.

The trainer lives offloaded in CPU memory while the server runs. For a step, `trainer_turn()` gives the GPU to the
trainer and always gives it back: the server (idle: the caller holds requests at the gateway) releases its KV
cache and CUDA graphs (`release_memory_occupation`, which needs `--enable-memory-saver`), the trainer reloads,
trains and offloads, and the server resumes. The server's weights stay on the GPU: SGLang 0.5.15 restores
released weights only from a CPU copy (`--enable-weights-cpu-backup`), and a LoRA or changed-layers sync needs
the base weights intact. The budget: the server's weights and the trainer's model (base, adapter, optimizer and
activations) must fit on the GPU together; docs/configuration.md gives it for 1.5B and 7B models.

Where release is unavailable (a CPU server, or no memory saver), the server is stopped for the step and started
again instead; a publish then puts the policy on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from ..server import SGLangClient, SGLangServer
from ..trainer.worker import TrainerGroup

log = logging.getLogger(__name__)

# What the server gives up while the trainer has the GPU (SGLang's GPU_MEMORY_TYPE_* names, in sglang.srt.constants).
RELEASED = ["kv_cache", "cuda_graph"]


class GpuTimeShare:
    def __init__(self, server: SGLangServer, client: SGLangClient, trainer: TrainerGroup) -> None:
        self.server, self.client, self.trainer = server, client, trainer
        self.use_release = True

    async def check(self) -> str:
        """Decide once, at start: release/resume, or stop/start. Returns what was chosen, for the log."""
        info = await self.client.server_info()
        if info.get("device") == "cpu" or not info.get("enable_memory_saver"):
            self.use_release = False
            return "server stopped while training (memory release is unavailable on this server)"
        return f"server releases {', '.join(RELEASED)} while training (its weights stay on the GPU)"

    @contextlib.asynccontextmanager
    async def trainer_turn(self) -> AsyncIterator[None]:
        """The trainer has the GPU for the block; the server gets it back however the block ends. The caller
        holds requests at the gateway and waits for the server to be idle before entering."""
        if self.use_release:
            await self.client.release_memory_occupation(RELEASED)
        else:
            self.server.stop()
        try:
            await self.trainer.reload()
            yield
        finally:
            try:
                if self.trainer.running:
                    await self.trainer.offload()
            finally:
                if self.use_release:
                    await self.client.resume_memory_occupation(RELEASED)
                else:
                    await self.server.start()
