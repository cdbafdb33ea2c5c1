"""ReplicaSet: several SGLang servers of one policy, which the rest sees as one server.

The gateway sends each request to one replica (gateway/upstreams.py); what changes the policy goes to every replica
(`ReplicaClient`), so a version goes live only when every replica has it: the `lora` sync loads the new adapter on
all, then flips the route; `disk` updates all under the closed gate; `restart` restarts them one at a time while the
others serve (`ReplicaSet.roll`). A replica that dies, or that fails to take a new policy while the others took it,
is taken out at once (the gateway sends its cut-off requests to the others), restarted in place, given the current
policy (the merged layers, every adapter the others hold, the version) and only then taken back: the syncs never
see it go, and the set as a whole never crashes. Servers started elsewhere (server/external.py) are
members too: one that stops answering is taken out the same way and taken back once it answers again; they are
sent adapters as tensors, since they cannot read this machine's files.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArtSGLangError, CapabilityError, ServerStartError, ServerUnreachableError
from .client import SGLangClient
from .external import ADMIN_TIMEOUT, ExternalServer
from .process import SGLangServer

log = logging.getLogger(__name__)
Replica = SGLangServer | ExternalServer
_TOKENS = itertools.count(1 << 30)  # a set's `pid`: above any real process id, so never one


@dataclass
class _Load:
    """How an adapter was loaded, to load it again on a replica that restarted."""

    path: str | None = None
    config: dict[str, Any] | None = None
    tensors: bytes | None = None


class ReplicaClient(SGLangClient):
    """An admitted replica for requests and questions; every admitted replica for what changes the policy
    (adapters, version, cache)."""

    def __init__(self, replicas: list[Replica]) -> None:
        key = replicas[0].config.api_key
        super().__init__(replicas[0].base_url, api_key=key)
        self.servers = replicas
        self.replicas = [
            SGLangClient(s.base_url, api_key=key, timeout=ADMIN_TIMEOUT if isinstance(s, ExternalServer) else 600.0)
            for s in replicas
        ]
        # Replicas that hold the current policy; replaced whole on change (the gateway's thread reads it).
        self.admitted: frozenset[int] = frozenset(range(len(replicas)))
        self.by_tensors = any(isinstance(s, ExternalServer) for s in replicas)  # adapters as tensors, not paths
        self.adapters: dict[str, _Load] = {}  # loaded on every admitted replica
        self.layers: tuple[str, str | None] | None = None  # `disk`: the merged layers (and version) all loaded
        self.failed: dict[int, str] = {}  # managed replicas that failed to take a policy: the set restarts them
        self.ours: set[str] = set()  # every adapter name this client loaded (others' are left alone)
        self.version: str | None = None
        self._lock = asyncio.Lock()  # a change reaches all admitted replicas before the next begins

    async def aclose(self) -> None:
        for c in self.replicas:
            await c.aclose()
        await super().aclose()

    def _first(self) -> SGLangClient:
        return self.replicas[min(self.admitted or {0})]

    async def _on_all(self, call: Callable[[SGLangClient], Awaitable[Any]], *, retake: bool = False) -> list[Any]:
        """`call` on every admitted replica. A replica that died meanwhile is left out (it is given the policy when
        it is back). `retake` (a call that gives the policy): a replica that fails while another succeeds is taken
        out and restarted (a server elsewhere: taken back once it answers), and gets the policy then; otherwise a
        failure is raised once all have answered."""
        chosen = sorted(self.admitted)
        results = await asyncio.gather(*(call(self.replicas[i]) for i in chosen), return_exceptions=True)
        done, failed = [], []
        for i, r in zip(chosen, results, strict=True):
            server = self.servers[i]
            if isinstance(r, ServerUnreachableError) and isinstance(server, ExternalServer):
                server.mark_down(str(r))  # a host that went away: the watch takes it back once it answers
            if not isinstance(r, BaseException):
                done.append(r)
            elif server.crash_reason() is not None:
                self.admitted = self.admitted - {i}
            elif retake:
                failed.append((i, r))
            else:
                raise r
        if failed and not done:
            raise failed[0][1]
        for i, error in failed:
            why = f"it failed to take the new policy: {error}"
            log.error("art-sglang: replica %d (%s) %s; restarting it", i, self.servers[i].base_url, why)
            self.admitted = self.admitted - {i}
            server = self.servers[i]
            if isinstance(server, ExternalServer):
                server.mark_down(why)
            else:
                self.failed[i] = why
        if not done:
            raise ServerUnreachableError(
                "no SGLang server is up: every one is down or restarting (the step is tried again by the next train())"
            )
        return done

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        return await self._first().generate(*args, **kwargs)

    async def model_info(self) -> dict[str, Any]:
        return await self._first().model_info()

    async def server_info(self) -> dict[str, Any]:
        return await self._first().server_info()

    async def _capabilities(self) -> dict[str, Any]:
        return await self._first()._capabilities()

    async def models(self) -> list[str]:
        return await self._first().models()

    # What changes the policy goes to every replica.
    async def load_lora_adapter(self, name: str, path: str, *, pinned: bool = False) -> dict[str, Any]:
        if self.by_tensors:
            from ..trainer.pack import checkpoint_payload  # torch: only where it is needed

            try:
                config, tensors = await asyncio.to_thread(checkpoint_payload, path)
            except OSError as e:
                raise ArtSGLangError(f"cannot read adapter {path} to send it to the servers: {e}") from e
            return await self.load_lora_adapter_from_tensors(name, config, tensors)
        return await self._load(name, _Load(path=path), lambda c: c.load_lora_adapter(name, path, pinned=pinned))

    async def load_lora_adapter_from_tensors(self, name: str, config: dict[str, Any], tensors: bytes) -> dict[str, Any]:
        load = _Load(config=config, tensors=tensors)
        return await self._load(name, load, lambda c: c.load_lora_adapter_from_tensors(name, config, tensors))

    async def _load(self, name: str, load: _Load, call: Callable[[SGLangClient], Awaitable[Any]]) -> Any:
        async with self._lock:
            self.adapters[name] = load  # first: the caller unloads `name` everywhere if this fails
            self.ours.add(name)
            return (await self._on_all(call, retake=True))[0]

    async def unload_lora_adapter(self, name: str) -> dict[str, Any]:
        async with self._lock:
            self.adapters.pop(name, None)  # first: a replica that comes back does not get it
            return (await self._on_all(lambda c: c.unload_lora_adapter(name)))[0]

    async def update_weight_version(self, version: str) -> None:
        async with self._lock:
            previous, self.version = self.version, version
            try:
                await self._on_all(lambda c: c.update_weight_version(version), retake=True)
            except BaseException:  # no replica took it: a replica that comes back gets what the others hold
                self.version = previous
                raise

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
    ) -> dict[str, Any]:
        async with self._lock:
            previous = self.layers, self.version
            self.layers = (model_path, weight_version)  # first: a replica restarted for failing it loads these
            self.version = weight_version if weight_version is not None else self.version
            try:
                results = await self._on_all(
                    lambda c: c.update_weights_from_disk(
                        model_path,
                        weight_version=weight_version,
                        flush_cache=flush_cache,
                        abort_all_requests=abort_all_requests,
                    ),
                    retake=True,
                )
            except BaseException:  # no replica took them
                self.layers, self.version = previous
                raise
            return results[0]

    async def flush_cache(self) -> None:
        await self._on_all(lambda c: c.flush_cache())

    async def pause_generation(self, mode: Any = "abort") -> None:
        await self._on_all(lambda c: c.pause_generation(mode))

    async def continue_generation(self) -> None:
        await self._on_all(lambda c: c.continue_generation())

    async def release_adapters(self) -> None:
        """Unload every adapter from the servers started elsewhere, which outlive the backend (best effort: one that
        is down has lost them, or keeps them until it restarts)."""
        async with self._lock:
            names, self.adapters = list(self.adapters), {}
            elsewhere = [i for i in sorted(self.admitted) if isinstance(self.servers[i], ExternalServer)]
            for i, name in itertools.product(elsewhere, names):
                try:
                    await self.replicas[i].unload_lora_adapter(name)
                except Exception as e:  # closing: report it and go on
                    log.warning("art-sglang: could not unload %s from %s: %s", name, self.replicas[i].base_url, e)

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        raise CapabilityError(
            "release_memory_occupation is not available with several SGLang servers: shared mode (one GPU for the "
            "server and the trainer) runs one server."
        )

    # A replica that restarted.
    async def readmit(self, i: int, serves: Callable[[], bool] = lambda: True) -> None:
        """Give replica `i` (just started) the merged layers, every adapter and the version the others hold, then
        count it in if `serves()` still holds (checked in the same step as the admission: a rolling restart's switch
        may have come meanwhile)."""
        async with self._lock:
            c = self.replicas[i]
            if self.layers is not None:  # (`disk`: it started on the base weights)
                path, version = self.layers
                await c.update_weights_from_disk(path, weight_version=version, flush_cache=True)
            held = set(await c.models())  # a server started elsewhere may have kept them through an outage
            for name in sorted((held & self.ours) - set(self.adapters)):  # unloaded elsewhere while it was out
                await c.unload_lora_adapter(name)
            for name, load in self.adapters.items():
                if name in held:
                    continue
                if load.path is not None and not Path(load.path).exists():
                    # Its checkpoint was removed (an older step's, kept loaded for requests already routed to it):
                    # this replica answers those with SGLang's "never loaded" error rather than another policy.
                    log.warning("art-sglang: replica %d cannot load adapter %s again: %s is gone", i, name, load.path)
                elif load.path is not None:
                    await c.load_lora_adapter(name, load.path)
                else:
                    assert load.config is not None and load.tensors is not None
                    await c.load_lora_adapter_from_tensors(name, load.config, load.tensors)
            if self.version is not None:
                await c.update_weight_version(self.version)
            if serves():
                self.admitted = self.admitted | {i}


class ReplicaSet:
    """SGLang servers of one policy, with SGLangServer's life cycle; `watch` restarts a replica that dies, `roll`
    restarts them all on new weights."""

    def __init__(self, replicas: list[Replica]) -> None:
        if not replicas:
            raise ValueError("a ReplicaSet needs a server")
        self.replicas = replicas
        first = replicas[0]
        self.config = first.config
        self.model_path = first.model_path  # the weights requests are served by
        self._target: tuple[str, str | None] = (first.model_path, None)  # what a replica (re)starts on
        self._roll = 0  # rolling restarts begun; `_started_in[i]`: the one during which replica i last started
        self._started_in: dict[int, int] = {}
        self._locks = [asyncio.Lock() for _ in replicas]  # one restart of a replica at a time (watch or roll)
        self.base_model_path = first.base_model_path
        self.log_path = first.log_path.with_name("sglang-<i>.log")  # for messages: each replica has its own
        self.client: ReplicaClient | None = None
        self.restarts = 0  # of replicas
        self._pid: int | None = None
        self._retry_at: dict[int, float] = {}  # replica -> when a failed restart is tried again
        self._retry_delay: dict[int, float] = {}

    @property
    def sglang_version(self) -> str:
        return self.replicas[0].sglang_version

    @property
    def served_model_name(self) -> str | None:
        return self.replicas[0].served_model_name

    @property
    def urls(self) -> list[str]:
        return [s.base_url for s in self.replicas]

    @property
    def pid(self) -> int | None:
        """Stands for what the replicas hold, which lives as long as the set (a restarted replica is given it
        again): a token, new on each start, never a process id."""
        return self._pid

    @property
    def running(self) -> bool:
        return self._pid is not None

    def available(self) -> frozenset[int]:
        """The replicas requests may go to (for the gateway)."""
        return self.client.admitted if self.client is not None else frozenset()

    async def start(self) -> None:
        starts = [asyncio.ensure_future(s.start()) for s in self.replicas]
        try:
            await asyncio.gather(*starts)
        except BaseException:
            for task in starts:  # the others stop waiting: none attaches or starts after this
                task.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            self.stop()
            raise
        self.client = ReplicaClient(self.replicas)
        self._pid = next(_TOKENS)

    def stop(self) -> None:
        self._pid = None
        for s in self.replicas:
            s.stop()

    def crash_reason(self) -> str | None:
        """None while the set runs: a replica that dies is restarted by `watch`, the others serve meanwhile."""
        return None if self._pid is not None else "the replicas are not running"

    async def restart(self, model_path: str | Path | None = None, weight_version: str | None = None) -> None:
        """Start again every replica that is down."""
        if model_path is not None:
            raise CapabilityError("replicas take new weights one at a time: ReplicaSet.roll, not restart")
        for i in range(len(self.replicas)):
            await self._restart_replica(i)

    def _serves(self, i: int) -> bool:
        """Whether replica `i` runs the weights requests are routed to (a server elsewhere: always)."""
        server = self.replicas[i]
        return isinstance(server, ExternalServer) or server.model_path == self.model_path

    def _down(self, i: int) -> str | None:
        """Why replica `i` must be restarted (it died, or failed to take a policy), or None."""
        failed = self.client.failed.get(i) if self.client is not None else None
        return self.replicas[i].crash_reason() or failed

    async def _restart_replica(self, i: int) -> None:
        """Restart replica `i` if it is down, give it the current policy, then take it back. A failure is logged and
        tried again after a pause that doubles up to a minute."""
        async with self._locks[i]:
            reason = self._down(i)
            if reason is None or self._pid is None:
                return
            log.error("art-sglang: replica %d (%s) is down (%s); restarting it", i, self.replicas[i].base_url, reason)
            if await self._start_again(i):
                self.restarts += 1

    async def _start_again(self, i: int) -> bool:
        """Stop what is left of replica `i`, start it on the set's weights and take it back if those are served
        (during a roll, a replica on the new weights waits for the switch). False if it did not start: retried."""
        server, client = self.replicas[i], self.client
        assert client is not None, "start() first"
        client.admitted = client.admitted - {i}  # first: no new request goes there
        stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))  # what is left of its process group
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:  # (the set is being stopped) the old tree is gone before this returns
            await stopping
            raise
        client.failed.pop(i, None)
        if self._pid is None:  # the set was stopped meanwhile: start nothing
            return False
        if isinstance(server, SGLangServer):
            server.model_path, server.weight_version = self._target[0], self._target[1] or server.weight_version
        self._started_in[i] = self._roll
        try:
            await server.start()
            if self._pid is None:
                await asyncio.to_thread(server.stop)
                return False
            await client.readmit(i, serves=lambda: self._serves(i))
        except Exception as e:
            await asyncio.to_thread(server.stop)  # down again: the watch tries once more, after a pause
            delay = self._retry_delay.get(i, 2.0)
            self._retry_at[i], self._retry_delay[i] = time.monotonic() + delay, min(60.0, 2 * delay)
            log.error("art-sglang: replica %d could not be restarted (%s); trying again in %.0f s", i, e, delay)
            return False
        self._retry_delay.pop(i, None)
        log.warning("art-sglang: replica %d is back, on weight version %s", i, client.version or server.weight_version)
        return True

    async def roll(
        self,
        model_path: str | Path,
        version: str,
        *,
        drained: Callable[[int], Awaitable[object]],
        switch: Callable[[Callable[[], None]], None],
    ) -> None:
        """Restart every replica on `model_path` (the `restart` sync), the others serving, with no two versions
        served at once: the first half are restarted one at a time and wait out of the choice; then `switch(flip)`
        runs `flip` (the old replicas out, the new ones in) where no request is being routed, with the caller's
        route change; then the others are restarted together, each taken back once up. On weights served already
        (a step published again) it restarts only the replicas out of the choice.

        `drained(i)` waits for the requests running on replica `i` (or gives up: those cut off are sent again).
        A replica that dies meanwhile starts on the new weights too. Raises if none of the first half started."""
        client = self.client
        assert client is not None, "start() first"
        target, previous, held = str(model_path), self._target, (client.layers, client.version)
        # From now on every start, the watch's too, is on these weights; a replica counts as on them only if it
        # started during this roll (a step tried again may be exported to the same directory with other weights).
        self._target, self._roll = (target, version), self._roll + 1
        # They are whole: a replica taken back gets no layers of an earlier `disk` sync over them, and their version.
        client.layers, client.version = None, version

        def fresh(i: int) -> bool:
            up = self.replicas[i].crash_reason() is None and not self._locks[i].locked()  # (not still starting)
            return up and self._started_in.get(i) == self._roll

        if self.model_path != target:
            try:
                for i in range((len(self.replicas) + 1) // 2):  # the others serve meanwhile
                    await self._restart_on_target(i, drained)
                new = frozenset(i for i in range(len(self.replicas)) if fresh(i))
                if not new:
                    raise ServerStartError(
                        f"no SGLang replica started on the weights of version {version}; the others still serve "
                        f"the old ones (logs: {self.log_path})",
                        self.log_tail(),
                    )
            except BaseException:
                self._target = previous  # a replica that dies now starts on what is served
                client.layers, client.version = held
                raise

            def flip() -> None:
                client.admitted = new
                self.model_path = target

            switch(flip)
            log.info("art-sglang: replicas %s serve version %s; restarting the others", sorted(new), version)
        rest = [i for i in range(len(self.replicas)) if i not in client.admitted]
        await asyncio.gather(*(self._restart_on_target(i, drained) for i in rest))

    async def _restart_on_target(self, i: int, drained: Callable[[int], Awaitable[object]]) -> None:
        async with self._locks[i]:
            server, client = self.replicas[i], self.client
            assert client is not None
            if server.crash_reason() is None and self._started_in.get(i) == self._roll:  # (the watch started it)
                if i not in client.admitted:
                    try:
                        await client.readmit(i, serves=lambda: self._serves(i))
                    except Exception as e:
                        log.error("art-sglang: replica %d could not be taken back (%s); restarting it", i, e)
                        await asyncio.to_thread(server.stop)  # the watch starts it again
                return
            client.admitted = client.admitted - {i}
            await drained(i)
            await self._start_again(i)

    async def watch(self, on_crash: Callable[[int, str], Awaitable[None]], interval: float = 0.5) -> None:
        """Take a replica that dies out of the choice at once and restart it, each in its own task, until the set
        is stopped (`on_crash` is never called: the set as a whole stays up)."""
        restarting: dict[int, asyncio.Task[None]] = {}
        try:
            while self._pid is not None and self.client is not None:
                await asyncio.sleep(interval)
                for i in range(len(self.replicas)):
                    if self._down(i) is None or (i in restarting and not restarting[i].done()):
                        continue
                    self.client.admitted = self.client.admitted - {i}
                    if time.monotonic() >= self._retry_at.get(i, 0.0):
                        restarting[i] = asyncio.create_task(self._restart_replica(i))
        finally:
            for task in restarting.values():
                task.cancel()
            await asyncio.gather(*restarting.values(), return_exceptions=True)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- replica {i}:\n{s.log_tail(lines)}" for i, s in enumerate(self.replicas))
