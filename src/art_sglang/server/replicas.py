"""ReplicaSet: several SGLang servers of one policy, which the rest sees as one server.

The gateway sends each request to one replica (gateway/upstreams.py); what changes the policy goes to every replica
(`ReplicaClient`), so a version goes live only when every replica has it: the `lora` sync loads the new adapter on
all, then flips the route. A replica that dies is taken out at once (the gateway sends its cut-off requests to the
others), restarted in place, given every adapter the others hold and the current version, and only then taken back:
the syncs never see it go, and the set as a whole never crashes. Servers started elsewhere (server/external.py) are
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
from typing import Any, NoReturn

from ..errors import ArtSGLangError, CapabilityError, ServerUnreachableError
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
        self.ours: set[str] = set()  # every adapter name this client loaded (others' are left alone)
        self.version: str | None = None
        self._lock = asyncio.Lock()  # a change reaches all admitted replicas before the next begins

    async def aclose(self) -> None:
        for c in self.replicas:
            await c.aclose()
        await super().aclose()

    def _first(self) -> SGLangClient:
        return self.replicas[min(self.admitted or {0})]

    async def _on_all(self, call: Callable[[SGLangClient], Awaitable[Any]]) -> list[Any]:
        """`call` on every admitted replica. A replica that died meanwhile is left out (it is given the policy when
        it is back); any other failure is raised once all have answered."""
        chosen = sorted(self.admitted)
        results = await asyncio.gather(*(call(self.replicas[i]) for i in chosen), return_exceptions=True)
        done = []
        for i, r in zip(chosen, results, strict=True):
            server = self.servers[i]
            if isinstance(r, ServerUnreachableError) and isinstance(server, ExternalServer):
                server.mark_down(str(r))  # a host that went away: the watch takes it back once it answers
            if not isinstance(r, BaseException):
                done.append(r)
            elif server.crash_reason() is not None:
                self.admitted = self.admitted - {i}
            else:
                raise r
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
            return (await self._on_all(call))[0]

    async def unload_lora_adapter(self, name: str) -> dict[str, Any]:
        async with self._lock:
            self.adapters.pop(name, None)  # first: a replica that comes back does not get it
            return (await self._on_all(lambda c: c.unload_lora_adapter(name)))[0]

    async def update_weight_version(self, version: str) -> None:
        async with self._lock:
            self.version = version
            await self._on_all(lambda c: c.update_weight_version(version))

    async def flush_cache(self) -> None:
        await self._on_all(lambda c: c.flush_cache())

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

    @staticmethod
    def _unsupported(what: str) -> NoReturn:
        raise CapabilityError(
            f"{what} is not available with several SGLang servers or servers=[...] yet: they take new policies with "
            "weight_sync_method='lora' only."
        )

    async def pause_generation(self, mode: Any = "abort") -> None:
        self._unsupported("pause_generation")

    async def update_weights_from_disk(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._unsupported("update_weights_from_disk")

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._unsupported("release_memory_occupation")

    # A replica that restarted.
    async def readmit(self, i: int) -> None:
        """Give replica `i` (just started) every adapter and the version the others hold, then count it in."""
        async with self._lock:
            c = self.replicas[i]
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
            self.admitted = self.admitted | {i}


class ReplicaSet:
    """SGLang servers of one policy, with SGLangServer's life cycle; `watch` restarts a replica that dies."""

    def __init__(self, replicas: list[Replica]) -> None:
        if not replicas:
            raise ValueError("a ReplicaSet needs a server")
        self.replicas = replicas
        first = replicas[0]
        self.config = first.config
        self.model_path = first.model_path
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
            raise CapabilityError("replicas cannot restart on new weights: use weight_sync_method='lora'")
        for i in range(len(self.replicas)):
            await self._restart_replica(i)

    async def _restart_replica(self, i: int) -> None:
        """Restart replica `i` if it is down, give it the current policy, then take it back. A failure is logged and
        tried again after a pause that doubles up to a minute."""
        server, client = self.replicas[i], self.client
        assert client is not None, "start() first"
        reason = server.crash_reason()
        if reason is None or self._pid is None:
            return
        client.admitted = client.admitted - {i}  # first: no new request goes there
        log.error("art-sglang: replica %d (%s) is down (%s); restarting it", i, server.base_url, reason)
        stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))  # what is left of its process group
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:  # (the set is being stopped) the old tree is gone before this returns
            await stopping
            raise
        try:
            await server.start()
            await client.readmit(i)
        except Exception as e:
            server.stop()  # down again: the watch tries once more, after a pause
            delay = self._retry_delay.get(i, 2.0)
            self._retry_at[i], self._retry_delay[i] = time.monotonic() + delay, min(60.0, 2 * delay)
            log.error("art-sglang: replica %d could not be restarted (%s); trying again in %.0f s", i, e, delay)
            return
        self._retry_delay.pop(i, None)
        self.restarts += 1
        log.warning("art-sglang: replica %d is back, on weight version %s", i, client.version)

    async def watch(self, on_crash: Callable[[int, str], Awaitable[None]], interval: float = 0.5) -> None:
        """Take a replica that dies out of the choice at once and restart it, each in its own task, until the set
        is stopped (`on_crash` is never called: the set as a whole stays up)."""
        restarting: dict[int, asyncio.Task[None]] = {}
        try:
            while self._pid is not None and self.client is not None:
                await asyncio.sleep(interval)
                for i, s in enumerate(self.replicas):
                    if s.crash_reason() is None or (i in restarting and not restarting[i].done()):
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
