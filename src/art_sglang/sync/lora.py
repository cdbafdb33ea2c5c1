"""`lora`: load the new adapter under a new name, route new requests to it, unload older ones once free.

A step's new adapter is written by the trainer to a RAM disk and loaded from there by path (`/load_lora_adapter`),
while its checkpoint is written beside it; a server elsewhere gets the tensors instead
(`/load_lora_adapter_from_tensors`: base64 in JSON, several times slower). The file stays while the adapter is loaded
(SGLang reloads an evicted adapter from its path; a replica that comes back loads it again). A step published again
(after a failure or a server restart) loads from its checkpoint.
Each load gets a new name (SGLang keys its prefix cache by adapter id, and a request naming an unloaded adapter
silently reloads it from its old path: so names are never reused and old names are never routed to).

Several steps can be loaded at once, each routed as `name@step` to its own adapter: the newest, the one before it
(a caller may have read the step number just before a publish), and any step a lease holds (ART's adapter leases:
PipelineTrainer's rollouts of an older policy, an evaluation of an old checkpoint, which loads it on demand). Any
other adapter is unloaded once no request runs on it; a step no longer loaded is refused at the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from .. import paths
from ..errors import ArtSGLangError, LeaseError
from .base import Durable, SyncContext, WeightSync

log = logging.getLogger(__name__)
T = TypeVar("T")


async def _both(durable: Durable | None, load: Awaitable[object]) -> float:
    """The checkpoint and the adapter load side by side; both end before either's error is raised (the caller then
    removes what the other left), the checkpoint's first. Returns when the load alone ended."""
    loaded = 0.0

    async def timed() -> None:
        nonlocal loaded
        await load
        loaded = time.monotonic()

    results = await asyncio.gather(durable() if durable else asyncio.sleep(0), timed(), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return loaded


class LoraSync(WeightSync):
    method = "lora"
    needs_trainer = False  # a republish loads the checkpoint, or routes back to an adapter still loaded

    def __init__(self, ctx: SyncContext) -> None:
        super().__init__(ctx)
        self.loaded: dict[int, str] = {}  # step -> its adapter on the server process `_server_pid`
        self.previous: int | None = None  # the step before `step`: kept loaded too
        self._server_pid: int | None = None
        self._lock = asyncio.Lock()  # changes of `loaded` and the routes
        self._unloads: set[asyncio.Task[None]] = set()
        self._files = ctx.merged_root / "adapters"  # name -> the file a new step was loaded from
        ctx.leases.on_release = self._released

    @property
    def current(self) -> str | None:
        """The adapter new requests for the model are routed to."""
        return self.loaded.get(self.step) if self.step is not None else None

    async def publish(self, step: int, checkpoint: Path, durable: Durable | None = None) -> dict[str, float]:
        ctx = self.ctx
        started = time.monotonic()
        async with self._lock:
            if (
                self._server_pid == ctx.server.pid
                and self.step is not None
                and step <= self.step
                and step in self.loaded
            ):
                # Published already on this server process (a republish that found nothing to do), or a failed
                # step rolled back: its predecessor's adapter is still loaded, unchanged. Route to it at once, so
                # that nothing answers as the failed step while the trainer is being reset.
                self._roll_back_to(step)
                rolled_back = True
            else:
                rolled_back = False
        if rolled_back:
            await ctx.client.update_weight_version(str(step))
            return {"sync_seconds": time.monotonic() - started, "adapter_load_seconds": 0.0}
        name = self._new_name(step)
        metrics: dict[str, float] = {}
        if durable is None:  # published again: its checkpoint is on disk
            await self._load(name, ctx.client.load_lora_adapter(name, str(checkpoint)))
            loaded = time.monotonic()
        elif ctx.client.by_tensors:  # a new step, for a server elsewhere
            adapter = await ctx.trainer.adapter_payload()
            metrics = {"adapter_export_seconds": adapter["seconds"], "adapter_bytes": float(len(adapter["tensors"]))}
            load = ctx.client.load_lora_adapter_from_tensors(name, adapter["config"], adapter["tensors"])
            loaded = await self._load(name, _both(durable, load))
        else:  # a new step: the trainer holds it
            written, loaded = await self._load(name, self._write_and_load(name, durable))
            metrics = {"adapter_export_seconds": written["seconds"], "adapter_bytes": written["bytes"]}
        await self._load(name, ctx.client.update_weight_version(str(step)))
        async with self._lock:
            restarted = self._server_pid != ctx.server.pid
            if restarted:  # what was loaded died with the old server process
                self.loaded, self._server_pid = {}, ctx.server.pid
            replaced = self.loaded.get(step)  # the same step published again
            if self.step is not None and step > self.step:
                self.previous = self.step
            elif self.step is not None and step < self.step:
                self._roll_back_to(step)
            self.loaded[step], self.step = name, step
            self._route()
        flipped = time.monotonic()
        if replaced is not None:
            self._unload_later(replaced)
        await self.prune(set())  # what the new step made unneeded
        if restarted:  # leased steps, and the one before, come back from their checkpoints
            self._remove_files(keep=set(self.loaded.values()))
            wanted = ctx.leases.held() | ({self.previous} if self.previous is not None else set())
            for old in sorted(wanted - {step}):
                try:
                    await self.serve(old)
                except ArtSGLangError as e:
                    log.warning("step %d could not be loaded again after the server restarted: %s", old, e)
        # adapter_load_seconds: servable on the server; sync_seconds: routed to (after the checkpoint, too)
        return {"sync_seconds": flipped - started, "adapter_load_seconds": loaded - started, **metrics}

    def _roll_back_to(self, step: int) -> None:
        """Serve `step` again (its adapter, if loaded, stays): steps after it failed, and nothing may serve them."""
        for later in [k for k in self.loaded if k > step]:
            self._unload_later(self.loaded.pop(later))
        if self.previous is not None and self.previous >= step:
            self.previous = None
        self.step = step
        if step in self.loaded:
            self._route()

    async def serve(self, step: int) -> None:
        ctx = self.ctx
        async with self._lock:
            if step in self.loaded or self._server_pid != ctx.server.pid:
                # Loaded; or the server restarted and the publish that follows reloads every leased step.
                return
            if self.step is None or step > self.step:
                raise LeaseError(f"step {step} of {ctx.name!r} does not exist yet (newest: {self.step})")
            checkpoint = paths.checkpoint_dir(ctx.model_dir, step)
            if not (checkpoint / "adapter_model.safetensors").is_file():
                raise LeaseError(
                    f"step {step} of {ctx.name!r} is not loaded and has no checkpoint to load ({checkpoint}); steps "
                    f"with one: {paths.checkpoint_steps(ctx.model_dir)}. Train with save_checkpoint=True for the "
                    "steps you will evaluate later."
                )
            on_server = await self._adapters_on_server()
            if on_server >= ctx.config.max_loras_per_batch and self._unloads:
                await asyncio.wait(self._unloads, timeout=ctx.drain_timeout)  # adapters still draining
                on_server = await self._adapters_on_server()
            if on_server >= ctx.config.max_loras_per_batch:
                raise LeaseError(
                    f"cannot load step {step} of {ctx.name!r}: the server holds {on_server} adapters, "
                    f"SGLangConfig.max_loras_per_batch={ctx.config.max_loras_per_batch} (this model's loaded steps: "
                    f"{sorted(self.loaded)}, leased: {sorted(ctx.leases.held())}). Release a lease first, or "
                    "raise max_loras_per_batch."
                )
            name = self._new_name(step)
            await self._load(name, ctx.client.load_lora_adapter(name, str(checkpoint)))
            self.loaded[step] = name
            self._route()
        log.info("loaded step %d of %s from %s for a lease", step, ctx.name, checkpoint)

    async def _write_and_load(self, name: str, durable: Durable | None) -> tuple[dict[str, float], float]:
        """The trainer writes the adapter to the RAM disk; the server loads it from there while the checkpoint is
        written. Returns what the write took and when the load ended."""
        directory = self._files / name
        written = await self.ctx.trainer.write_adapter(directory)
        return written, await _both(durable, self.ctx.client.load_lora_adapter(name, str(directory)))

    async def _load(self, name: str, call: Awaitable[T]) -> T:
        """Await a call that loads adapter `name` (or finishes its load); if it fails or is cut off, unload `name`:
        the server may hold it anyway."""
        try:
            return await call
        except BaseException:
            with contextlib.suppress(ArtSGLangError):  # best effort: the server may be gone
                await self.ctx.client.unload_lora_adapter(name)
            self._remove_files(names={name})
            raise

    def _remove_files(self, names: set[str] | None = None, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Remove the RAM-disk copies of adapters no longer loaded: `names`, or every one but `keep`."""
        if names is None:
            names = {p.name for p in self._files.glob("*")} - keep if self._files.is_dir() else set()
        for name in names:
            shutil.rmtree(self._files / name, ignore_errors=True)

    async def _adapters_on_server(self) -> int:
        return len(await self.ctx.client.models()) - 1  # every model's adapters count

    async def prune(self, keep: set[int]) -> None:
        # Steps no lease holds are unloaded as soon as they are free; `keep` cannot hold more than a lease would.
        for step in list(self.loaded):
            if step not in keep:
                self._released(step)

    def _released(self, step: int) -> None:
        """`step` lost its last lease, or the policy moved on: unload it unless it is still needed."""
        if step in (self.step, self.previous) or step in self.ctx.leases.held() or step not in self.loaded:
            return
        name = self.loaded.pop(step)
        self._route()  # from now on `name@step` is refused; requests already routed to it finish first
        self._unload_later(name)

    def _route(self) -> None:
        assert self.step is not None
        self.ctx.gateway.set_route(self.ctx.name, self.step, self.loaded[self.step], older=self.loaded)

    def _new_name(self, step: int) -> str:
        return f"{self.ctx.name}-step{step}-{secrets.token_hex(3)}"

    def _unload_later(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._unload_when_drained(name))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

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
        finally:
            self._remove_files(names={name})
        if ctx.config.flush_cache_on_sync and await ctx.gateway.wait_idle(ctx.drain_timeout):
            with contextlib.suppress(ArtSGLangError):  # refused while requests run: harmless
                await ctx.client.flush_cache()

    async def retire(self) -> None:
        async with self._lock:
            adapters, self.loaded = list(self.loaded.values()), {}
            self.step = self.previous = None
        for name in adapters:
            self._unload_later(name)
        await self.close()

    async def close(self) -> None:
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)
