"""Gateway: the OpenAI-compatible endpoint clients get as `base_url`, in front of the SGLang server.

It runs an aiohttp server on its own thread and event loop, so a busy user loop never stalls it. For each request:
- `model` (`name@step` or `name`) is looked up in the routing table: which adapter (or the base weights) serves
  that policy now. An older step is served by the current policy (its weights are gone after a sync); unknown
  names and steps not reached yet get a 404 that lists the known ones.
- logprobs are forced on, and for non-streaming chat the exact sampled token ids are written into each Choice's
  logprobs as `token_id:N` (from SGLang's per-choice meta_info), so trajectories are trainable as they are.
- while the gate is closed (a sync or a server restart) requests wait; a request whose connection to SGLang breaks
  waits for the gate and is sent again. Both are bounded by `hold_timeout`.
Counters per policy version: requests, prompt, completion and cached tokens. Only `/v1/chat/completions`,
`/v1/completions`, `/v1/models` and `/health` exist here: no SGLang admin endpoint is reachable through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """What serves one policy version: an adapter name on the server, or the base weights (None)."""

    version: int
    adapter: str | None


class Gateway:
    def __init__(
        self,
        upstream: str,
        served_model: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        hold_timeout: float = 600.0,
        max_resends: int = 3,
        prefix_warmup: bool = True,
        sibling_window: float = 0.02,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.served_model = served_model
        self.host = host
        self.port = port
        self.api_key = api_key
        self.hold_timeout = hold_timeout
        self.max_resends = max_resends
        self.prefix_warmup = prefix_warmup
        self.sibling_window = sibling_window
        self._warm: dict[tuple, list] = {}  # prompt key -> [warm-up done, requests in flight]
        # name -> {"current": Route, step: Route}; replaced whole on every change (readers need no lock).
        self._routes: dict[str, dict[Any, Route]] = {}
        self.in_flight: Counter[str | None] = Counter()  # by adapter (None: base weights)
        self.counters: defaultdict[int, Counter[str]] = defaultdict(Counter)  # by policy version
        self.held = 0  # requests that waited at a closed gate or were sent again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._gate: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- control, from any thread -----------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # reported to start()
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="art-sglang-gateway", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop = self._thread = None

    def set_route(self, name: str, step: int, adapter: str | None, keep_steps: bool = False) -> None:
        """Serve `name` and `name@step` from `adapter` (None: base weights). Older steps stop being served unless
        `keep_steps` (an adapter still loaded for them)."""
        route = Route(step, adapter)

        def flip() -> None:
            table = dict(self._routes.get(name, {})) if keep_steps else {}
            table[step] = route
            table["current"] = route
            self._routes = {**self._routes, name: table}

        self._call(flip)

    def forget_step(self, name: str, step: int) -> None:
        def forget() -> None:
            table = dict(self._routes.get(name, {}))
            if table.pop(step, None) is not None:
                self._routes = {**self._routes, name: table}

        self._call(forget)

    def known_models(self) -> list[str]:
        names = []
        for name, table in self._routes.items():
            names.append(name)
            names += [f"{name}@{k}" for k in table if k != "current"]
        return names

    def close_gate(self) -> None:
        """Hold new requests (a sync or restart is under way)."""
        self._call(lambda: self._gate is not None and self._gate.clear())

    def open_gate(self) -> None:
        self._call(lambda: self._gate is not None and self._gate.set())

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the gateway's loop and wait for it (directly when the gateway is not running)."""
        if self._loop is None or threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()

        def wrapped() -> None:
            fn()
            done.set()

        self._loop.call_soon_threadsafe(wrapped)
        done.wait(timeout=10)

    def take_counters(self) -> dict[int, Counter[str]]:
        """Counters per policy version since the last call (taken on the gateway's loop, so none is lost)."""
        out: dict[int, Counter[str]] = {}

        def take() -> None:
            out.update(self.counters)
            self.counters.clear()

        self._call(take)
        return out

    async def wait_drained(self, adapter: str | None, timeout: float) -> bool:
        """Wait (on the caller's loop) until no request runs on `adapter`; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.in_flight[adapter] > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while sum(self.in_flight.values()) > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- the server, on the gateway's loop --------------------------------------------------------------
    async def _serve(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        sent = request.headers.get("Authorization", "").encode()
        if self.api_key and not hmac.compare_digest(sent, f"Bearer {self.api_key}".encode()):
            return _error(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>' (as model.openai_client() does)"
            )
        return None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "gate_open": self._gate.is_set()})

    async def _models(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        data = [{"id": m, "object": "model", "owned_by": "art-sglang"} for m in self.known_models()]
        return web.json_response({"object": "list", "data": data})

    def _resolve(self, model: str | None) -> Route | None:
        if not model:
            return None
        name, _, step = model.partition("@")
        table = self._routes.get(name)
        if table is None:
            return None
        if not step:
            return table["current"]
        try:
            wanted = int(step)
        except ValueError:
            return None
        current = table["current"]
        if wanted in table:
            return table[wanted]
        # An older step (a request prepared before the last sync) goes to the current policy; the response's
        # weight_version says which one answered. A step not reached yet is unknown.
        return current if wanted < current.version else None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, "/v1/chat/completions", chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, "/v1/completions", chat=False)

    async def _forward(self, request: web.Request, path: str, chat: bool) -> web.StreamResponse:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        requested = body.get("model")
        stream = bool(body.get("stream"))
        if chat:
            body["logprobs"] = True
            if not stream:
                body["return_meta_info"] = True  # carries the exact sampled token ids
        elif body.get("logprobs") is None:
            body["logprobs"] = 0
        if stream:
            body.setdefault("stream_options", {})["include_usage"] = True

        deadline = time.monotonic() + self.hold_timeout
        attempt = 0
        while True:
            if not self._gate.is_set():
                self.held += 1
                try:
                    await asyncio.wait_for(self._gate.wait(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    return _error(503, f"the policy server was not back within {self.hold_timeout:g} s; try again")
            # Resolved and counted in one step of this loop: a route flip (also run on this loop) cannot fall
            # between them, so an adapter is never unloaded under a request that was routed to it.
            route = self._resolve(requested)
            if route is None:
                known = ", ".join(self.known_models()) or "none yet"
                return _error(404, f"model {requested!r} is not served here; known models: {known}")
            body["model"] = self.served_model
            if route.adapter is not None:
                body["lora_path"] = route.adapter
            else:
                body.pop("lora_path", None)
            self.in_flight[route.adapter] += 1
            try:
                if chat and self.prefix_warmup:
                    await self._warm_prefix(body, route)
                if stream:
                    return await self._stream(request, path, body, route)
                return await self._once(path, body, route, chat)
            except (TimeoutError, aiohttp.ClientConnectionError) as e:
                attempt += 1
                if attempt > self.max_resends or time.monotonic() > deadline:
                    return _error(503, f"the policy server is unreachable ({e}); gave up after {attempt} tries")
                self.held += 1
                log.warning("gateway: upstream failed (%s); holding the request and sending it again", e)
                await self._wait_for_upstream(deadline)
            finally:
                self.in_flight[route.adapter] -= 1

    async def _warm_prefix(self, body: dict, route: Route) -> None:
        """Prefill each new prompt once, before its siblings are sent.

        SGLang does not make concurrent requests with one prompt wait for each other's prefill: the G samples of
        a GRPO group, sent together, would each prefill the whole prompt. So when requests with the same prompt
        (per policy version) arrive within `sibling_window` of each other, a one-token request first puts the
        prompt in the radix cache, and all of them wait for it. Its usage is counted under `warmup_*`. A lone
        request waits only the window.
        """
        key = (route.version, route.adapter, json.dumps([body.get("messages"), body.get("tools")], sort_keys=True))
        entry = self._warm.get(key)
        if entry is not None:
            entry[1] += 1
            try:
                await entry[0]
            finally:
                self._release_warm(key)
            return
        # Kept only while requests for the prompt wait: the cache may be evicted or flushed after.
        future = self._loop.create_future()
        self._warm[key] = [future, 1]
        try:
            await asyncio.sleep(self.sibling_window)  # the samples of a group are sent together
            if self._warm[key][1] < 2:
                return  # a lone request: nothing to share, no warm-up
            probe = {k: v for k, v in body.items() if k not in ("n", "stream", "stream_options", "return_meta_info")}
            probe.update(max_tokens=1, logprobs=False, top_logprobs=None)
            probe.pop("max_completion_tokens", None)
            try:
                async with self._session.post(f"{self.upstream}/v1/chat/completions", json=probe) as r:
                    data = await r.json() if r.status == 200 else {}
                usage = data.get("usage") or {}
                c = self.counters[route.version]
                c["warmup_requests"] += 1
                c["warmup_prompt_tokens"] += usage.get("prompt_tokens") or 0
                c["warmup_cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                log.warning("gateway: prefix warm-up failed (%s); the request goes on without it", e)
            finally:
                future.set_result(None)
        finally:
            self._release_warm(key)

    def _release_warm(self, key: tuple) -> None:
        entry = self._warm.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._warm[key]

    async def _wait_for_upstream(self, deadline: float) -> None:
        """Wait until the gate is open and SGLang answers /health (a restart is being handled elsewhere)."""
        while time.monotonic() < deadline:
            if self._gate.is_set():
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with self._session.get(f"{self.upstream}/health", timeout=aiohttp.ClientTimeout(5)) as r:
                        if r.status == 200:
                            return
            await asyncio.sleep(0.25)

    async def _once(self, path: str, body: dict, route: Route, chat: bool) -> web.Response:
        async with self._session.post(f"{self.upstream}{path}", json=body) as upstream:
            raw = await upstream.read()
            if upstream.status != 200:
                return web.Response(body=raw, status=upstream.status, content_type="application/json")
        data = json.loads(raw)
        if chat:
            for choice in data.get("choices", []):
                exact_token_ids(choice)
        if route.adapter is not None:
            # SGLang stamps the server-wide version at the end; the adapter this request ran on is the truth.
            data.setdefault("metadata", {})["weight_version"] = str(route.version)
        self._count(route, data.get("usage") or {})
        return web.json_response(data)

    async def _stream(self, request: web.Request, path: str, body: dict, route: Route) -> web.StreamResponse:
        async with self._session.post(f"{self.upstream}{path}", json=body) as upstream:
            if upstream.status != 200:
                return web.Response(body=await upstream.read(), status=upstream.status, content_type="application/json")
            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            if route.adapter is not None:
                headers["X-Weight-Version"] = str(route.version)
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            try:
                async for line in upstream.content:
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        with contextlib.suppress(ValueError):
                            usage = json.loads(line[6:]).get("usage")
                            if usage:
                                self._count(route, usage)
                    await response.write(line)
            except (TimeoutError, aiohttp.ClientConnectionError) as e:
                # Part of the stream is already with the client: it cannot be sent again, only ended.
                log.warning("gateway: upstream failed mid-stream (%s)", e)
            await response.write_eof()
            return response

    def _count(self, route: Route, usage: dict) -> None:
        c = self.counters[route.version]
        c["requests"] += 1
        c["prompt_tokens"] += usage.get("prompt_tokens") or 0
        c["completion_tokens"] += usage.get("completion_tokens") or 0
        c["cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def exact_token_ids(choice: dict) -> None:
    """Rewrite each sampled token's `token` to `token_id:N` from SGLang's meta_info, and drop the meta_info."""
    meta = choice.pop("meta_info", None) or {}
    entries = (choice.get("logprobs") or {}).get("content") or []
    sampled = meta.get("output_token_logprobs") or []
    if entries and len(sampled) == len(entries):
        for entry, (_, token_id, _text) in zip(entries, sampled, strict=True):
            entry["token"] = f"token_id:{token_id}"


def _error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "model_not_found"}.get(status, "error")
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)
