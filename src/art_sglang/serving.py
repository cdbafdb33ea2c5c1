"""Serving: one SGLang server (or a ReplicaSet of them) with its client, gateway and crash watch, and the models
served by it.

Models on the same base model with the same server settings and the `lora` sync share one server: one copy of the
base weights, each model's adapters side by side under its own names (`<name>-step<k>-<hex>`), each routed by the
gateway as `name` and `name@step`. After a restart (a crash, or a failed step's recovery) the watch publishes every
model again at its last step; with several models, requests wait at the closed gate until all are back. A `lora`
model in the middle of a step is republished at once if it is still training (its new step follows on the new
server), or once its publish and checkpoint end; `disk`, `restart` and shared mode wait for the whole step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from .gateway import Gateway
from .server import ReplicaClient, ReplicaSet, SGLangClient, SGLangServer
from .step import ModelRun, republish_current

log = logging.getLogger("art_sglang")


@dataclass
class Serving:
    key: dict[str, Any]  # what a model must match to share this server (backend._serving_key)
    server: SGLangServer | ReplicaSet
    client: SGLangClient
    gateway: Gateway
    runs: dict[str, ModelRun] = field(default_factory=dict)
    restarts: int = 0  # of the server, after crashes
    _restart_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _needs_republish: asyncio.Event = field(default_factory=asyncio.Event)  # the server went down
    _watcher: asyncio.Task[None] | None = None
    _closed: bool = False

    async def restart_if_down(self) -> None:
        """Start the server again if it is down (once, whoever asks first); the watch then republishes every model
        on it."""
        async with self._restart_lock:
            if self._closed or self.server.crash_reason() is None:
                return
            self._needs_republish.set()  # before the restart: the watch of the old process ends when it begins
            await self.server.restart()
            self.restarts += 1

    def watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        async def on_crash(pid: int, reason: str) -> None:
            log.error("art-sglang: the SGLang server crashed (%s); restarting it", reason)
            self._needs_republish.set()

        while True:  # until close() cancels it; a restart ends one watch, the next one starts
            await self.server.watch(on_crash)
            if self._needs_republish.is_set():
                try:
                    await self._republish_stale()
                except Exception as e:  # the watch goes on; a model left stale is republished by its next step
                    log.error("art-sglang: republishing after a server restart failed: %s", e)
            await asyncio.sleep(0.5)

    async def _republish_stale(self) -> None:
        """Publish again, each at its current step, the models whose policy was on a server process that died;
        again if the server went down once more meanwhile."""

        def stale(run: ModelRun) -> bool:
            return run.published_pid != self.server.pid or self.server.crash_reason() is not None

        failed = False
        while self._needs_republish.is_set() and not failed:
            self._needs_republish.clear()
            if not any(stale(run) for run in self.runs.values()):
                return
            # With several models, all requests wait until every one is back: the new server knows none of the
            # adapters their routes name. (One model: republish_current holds them while it restarts and publishes.)
            async with self.gateway.closed() if len(self.runs) > 1 else contextlib.nullcontext():
                # Models not publishing first. A sync that exports from the trainer (`disk`, `restart`: one model)
                # waits for a step under way to end: the trainer may already hold the next step's weights; so does
                # shared mode, whose step stops the server on purpose and holds the GPU.
                for run in sorted(self.runs.values(), key=lambda r: r.publishing.locked()):
                    wait_for_step = run.sync.needs_trainer or run.timeshare is not None
                    async with run.lock if wait_for_step else contextlib.nullcontext():
                        if not stale(run) or self.runs.get(run.model.name) is not run:  # (a failed start: gone)
                            continue
                        log.warning("art-sglang: publishing step %d of %s again", run.step, run.model.name)
                        try:
                            await republish_current(run)
                        except Exception as e:  # no retry here: the model's next train() republishes first
                            log.error("art-sglang: %s could not be published again: %s", run.model.name, e)
                            failed = True
        self._needs_republish.clear()  # after a failure too: no retry loop; each model's next step tries again

    async def close(self) -> None:
        """Stop the watch, let the models' adapter unloads finish, then stop the gateway and the server."""
        async with self._restart_lock:  # a restart under way ends first; none starts after this
            self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
        for run in self.runs.values():
            with contextlib.suppress(Exception):
                await run.sync.close()
        self.gateway.stop()
        try:
            if isinstance(self.client, ReplicaClient):
                await self.client.release_adapters()  # servers started elsewhere outlive us
        finally:
            await self.client.aclose()
            await asyncio.to_thread(self.server.stop)
