"""`lora`: load the new adapter under a new name, route new requests to it, unload the old one once drained.

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

from ..errors import SGLangAPIError
from .base import WeightSync

log = logging.getLogger(__name__)


class LoraSync(WeightSync):
    method = "lora"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.current: str | None = None
        self._unloads: set[asyncio.Task[None]] = set()

    def _adapter_name(self, step: int) -> str:
        return f"{self.ctx.name}-step{step}-{secrets.token_hex(3)}"

    async def apply(self, step: int, checkpoint: Path) -> dict[str, float]:
        started = time.monotonic()
        name = self._adapter_name(step)
        await self.ctx.client.load_lora_adapter(name, str(checkpoint))
        loaded = time.monotonic()
        previous, self.current = self.current, name
        self.ctx.gateway.set_route(self.ctx.name, step, name)
        flipped = time.monotonic()
        await self.ctx.client.update_weight_version(str(step))
        if previous is not None:
            task = asyncio.create_task(self._unload_when_drained(previous))
            self._unloads.add(task)
            task.add_done_callback(self._unloads.discard)
        return {"sync_seconds": flipped - started, "adapter_load_seconds": loaded - started}

    async def _unload_when_drained(self, name: str) -> None:
        if not await self.ctx.gateway.wait_drained(name, self.ctx.drain_timeout):
            log.warning(
                "adapter %s still has requests after %.0f s; unloading anyway (SGLang waits for them)",
                name,
                self.ctx.drain_timeout,
            )
        try:
            await self.ctx.client.unload_lora_adapter(name)
        except SGLangAPIError as e:
            log.warning("unloading adapter %s failed: %s", name, e)
            return
        if self.ctx.config.flush_cache_on_sync and await self.ctx.gateway.wait_idle(self.ctx.drain_timeout):
            with contextlib.suppress(SGLangAPIError):  # refused while requests run: harmless
                await self.ctx.client.flush_cache()

    async def restore(self, step: int, checkpoint: Path) -> None:
        self.current = None  # whatever was loaded died with the old server
        name = self._adapter_name(step)
        await self.ctx.client.load_lora_adapter(name, str(checkpoint))
        self.current = name
        self.ctx.gateway.set_route(self.ctx.name, step, name)
        await self.ctx.client.update_weight_version(str(step))

    async def close(self) -> None:
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)
