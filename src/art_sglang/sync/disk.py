"""`disk`: merged weights through `update_weights_from_disk`, never flushing while requests run.

Only the layers the adapter touches are written and loaded (the server keeps its embeddings and norms; the merged
layers replace the base ones whole, so this is right on a freshly started server too). With several replicas, all
are updated under the same gate, and the export goes to one of two directories in turn: a replica that restarts
loads the layers being served (server/replicas.py) while the next step is written to the other.

New requests wait at the gateway. If the server drains within `drain_timeout`, the update flushes the cache
itself. Otherwise: pause (retract), update without flush, continue, and flush once idle, all before the gate
opens, so no new request meets KV computed with the old weights. Requests in flight during such an update finish
on the new weights: their responses may mix two versions (documented).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ..errors import SGLangAPIError
from ..server import ReplicaClient
from .base import Durable, WeightSync


class DiskSync(WeightSync):
    method = "disk"

    async def publish(self, step: int, checkpoint: Path, durable: Durable | None = None) -> dict[str, float]:
        started = time.monotonic()
        if durable is not None:  # the trainer writes it, then exports: one command at a time
            await durable()
        merged, stats = await self.export(step, layers=self._layers_dir())
        exported = time.monotonic()
        ctx = self.ctx
        async with ctx.gateway.closed():
            if await ctx.gateway.wait_idle(ctx.drain_timeout):
                await ctx.client.update_weights_from_disk(str(merged), weight_version=str(step), flush_cache=True)
            else:
                await ctx.client.pause_generation("retract")
                try:
                    await ctx.client.update_weights_from_disk(str(merged), weight_version=str(step), flush_cache=False)
                finally:
                    await ctx.client.continue_generation()
                await self._flush_when_idle()
            ctx.gateway.set_route(ctx.name, step, None)
            self.step = step
        return {
            "sync_seconds": time.monotonic() - started,
            "update_seconds": time.monotonic() - exported,
            "export_seconds": stats["export_seconds"],
            "export_bytes": stats["export_bytes"],
        }

    def _layers_dir(self) -> str:
        client = self.ctx.client
        if not isinstance(client, ReplicaClient):
            return "layers"
        served = Path(client.layers[0]).name if client.layers is not None else None
        return "layers-b" if served == "layers-a" else "layers-a"

    async def _flush_when_idle(self) -> None:
        deadline = time.monotonic() + 10 * self.ctx.drain_timeout
        while True:
            await self.ctx.gateway.wait_idle(self.ctx.drain_timeout)
            try:
                await self.ctx.client.flush_cache()
                return
            except SGLangAPIError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
