"""`lora`: load the new adapter under a new name, route new requests to it, unload the old one once drained.

A step's new adapter goes from the trainer's memory to the server's (`/load_lora_adapter_from_tensors`), before its
checkpoint is written; a step published again (after a failure or a server restart) loads from its checkpoint.
Each load gets a new name (SGLang keys its prefix cache by adapter id, and a request naming an unloaded adapter
silently reloads it from its old path: so names are never reused and old names are never routed to).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from pathlib import Path

from ..errors import ArtSGLangError
from .base import SyncContext, WeightSync

log = logging.getLogger(__name__)


class LoraSync(WeightSync):
    method = "lora"

    def __init__(self, ctx: SyncContext) -> None:
        super().__init__(ctx)
        self.current: str | None = None  # the adapter new requests are routed to
        self._server_pid: int | None = None  # the server process that holds it
        self._unloads: set[asyncio.Task[None]] = set()

    async def publish(self, step: int, checkpoint: Path) -> dict[str, float]:
        ctx = self.ctx
        started = time.monotonic()
        name = f"{ctx.name}-step{step}-{secrets.token_hex(3)}"
        metrics: dict[str, float] = {}
        if (checkpoint / "adapter_model.safetensors").exists():
            await ctx.client.load_lora_adapter(name, str(checkpoint))
        else:  # a new step: the trainer holds it, its checkpoint comes after
            adapter = await ctx.trainer.adapter_payload()
            metrics = {"adapter_export_seconds": adapter["seconds"], "adapter_bytes": float(len(adapter["tensors"]))}
            await ctx.client.load_lora_adapter_from_tensors(name, adapter["config"], adapter["tensors"])
        loaded = time.monotonic()
        try:
            await ctx.client.update_weight_version(str(step))
        except BaseException:
            with contextlib.suppress(ArtSGLangError):  # best effort: the server may be gone
                await ctx.client.unload_lora_adapter(name)
            raise
        previous = self.current if self._server_pid == ctx.server.pid else None  # else it died with its server
        self.current, self._server_pid = name, ctx.server.pid
        ctx.gateway.set_route(ctx.name, step, name)
        flipped = time.monotonic()
        if previous is not None:
            task = asyncio.create_task(self._unload_when_drained(previous))
            self._unloads.add(task)
            task.add_done_callback(self._unloads.discard)
        return {"sync_seconds": flipped - started, "adapter_load_seconds": loaded - started, **metrics}

    async def _unload_when_drained(self, name: str) -> None:
        ctx = self.ctx
        if not await ctx.gateway.wait_drained(name, ctx.drain_timeout):
            log.warning(
                "adapter %s still has requests after %.0f s; unloading anyway (SGLang waits for them)",
                name,
                ctx.drain_timeout,
            )
        try:
            await ctx.client.unload_lora_adapter(name)
        except ArtSGLangError as e:
            log.warning("unloading adapter %s failed: %s", name, e)
            return
        if ctx.config.flush_cache_on_sync and await ctx.gateway.wait_idle(ctx.drain_timeout):
            with contextlib.suppress(ArtSGLangError):  # refused while requests run: harmless
                await ctx.client.flush_cache()

    async def close(self) -> None:
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)
