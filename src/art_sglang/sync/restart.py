"""`restart`: start the server again on the newest merged weights, once its requests have drained.

One server: requests wait at the gateway meanwhile; a planned stop is never taken for a crash (see
SGLangServer.watch). Several replicas: a rolling restart, the others serving, that never serves two versions at once
(ReplicaSet.roll); the route flips with the switch of replicas.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..server import ReplicaSet
from .base import Durable, WeightSync


class RestartSync(WeightSync):
    method = "restart"

    async def publish(self, step: int, checkpoint: Path, durable: Durable | None = None) -> dict[str, float]:
        ctx = self.ctx
        started = time.monotonic()
        if durable is not None:
            await durable()
        if step == 0:
            merged, stats = Path(ctx.server.base_model_path), {"export_seconds": 0.0, "export_bytes": 0.0}
        else:
            merged, stats = await self.export(step)
        exported = time.monotonic()
        if isinstance(ctx.server, ReplicaSet):
            await ctx.server.roll(
                merged,
                str(step),
                drained=lambda i: ctx.gateway.wait_replica_drained(i, ctx.drain_timeout),
                switch=lambda flip: ctx.gateway.set_route(ctx.name, step, None, along=flip),
            )
            ctx.gateway.set_route(ctx.name, step, None)
            self.step = step
        else:
            async with ctx.gateway.closed():
                if ctx.server.model_path != str(merged) or not ctx.server.running:
                    await ctx.gateway.wait_idle(ctx.drain_timeout)  # in-flight requests finish on the old weights
                    await ctx.server.restart(model_path=merged, weight_version=str(step))
                ctx.gateway.set_route(ctx.name, step, None)
                self.step = step
        return {
            "sync_seconds": time.monotonic() - started,
            "restart_seconds": time.monotonic() - exported,
            "export_seconds": stats["export_seconds"],
            "export_bytes": stats["export_bytes"],
        }
