"""Shared mode: one GPU time-shared by the server and the trainer.

The trainer stays offloaded to CPU memory while the server runs. To train, the server releases its GPU memory
(`release_memory_occupation`, which needs `--enable-memory-saver` and an idle server), the trainer reloads, trains
and offloads, and the server resumes. Where release is unavailable (a CPU server, or no memory saver), the server
is stopped for the step and started again instead.
"""

from __future__ import annotations

import logging

from ..errors import CapabilityError
from ..gateway import Gateway
from ..server import SGLangClient, SGLangServer
from ..trainer.worker import TrainerGroup

log = logging.getLogger(__name__)


class GpuTimeShare:
    def __init__(self, server: SGLangServer, client: SGLangClient, gateway: Gateway, trainer: TrainerGroup) -> None:
        self.server, self.client, self.gateway, self.trainer = server, client, gateway, trainer
        self.use_release = True

    async def check(self) -> str:
        """Decide once, at start: release/resume, or stop/start. Returns what was chosen, for the log."""
        info = await self.client.server_info()
        if info.get("device") == "cpu" or not info.get("enable_memory_saver"):
            self.use_release = False
            return "server stopped while training (memory release is unavailable on this server)"
        return "server memory released while training (release_memory_occupation)"

    async def before_train(self) -> None:
        self.gateway.close_gate()
        await self.gateway.wait_idle(600)
        if self.use_release:
            try:
                await self.client.release_memory_occupation()
            except CapabilityError as e:
                log.warning("memory release refused (%s); stopping the server for this step instead", e)
                self.use_release = False
        if not self.use_release:
            self.server.stop()
        await self.trainer.reload()

    async def after_train(self) -> None:
        await self.trainer.offload()
        if self.use_release:
            await self.client.resume_memory_occupation()
        else:
            await self.server.start()
        # The gate opens once the weight sync that follows has put the new policy in place.
