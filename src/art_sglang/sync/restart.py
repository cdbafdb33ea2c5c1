"""`restart`: start the server again on the newest merged weights. Requests wait at the gateway meanwhile."""

from __future__ import annotations

import time
from pathlib import Path

from .base import WeightSync


class RestartSync(WeightSync):
    method = "restart"

    async def apply(self, step: int, checkpoint: Path) -> dict[str, float]:
        started = time.monotonic()
        merged, stats = await self.export(step)
        exported = time.monotonic()
        ctx = self.ctx
        ctx.gateway.close_gate()
        try:
            await ctx.server.restart(model_path=merged, weight_version=str(step))
            ctx.gateway.set_route(ctx.name, step, None)
        finally:
            ctx.gateway.open_gate()
        return {
            "sync_seconds": time.monotonic() - started,
            "restart_seconds": time.monotonic() - exported,
            "export_seconds": stats["export_seconds"],
            "export_bytes": stats["export_bytes"],
        }

    async def restore(self, step: int, checkpoint: Path) -> None:
        if step == 0:
            self.ctx.gateway.set_route(self.ctx.name, step, None)
            return
        await self.apply(step, checkpoint)
