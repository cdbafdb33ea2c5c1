"""Gateway: the OpenAI-compatible endpoint clients get as `base_url`, in front of the SGLang server.

It runs an aiohttp server on its own thread and event loop, so a busy user loop never stalls it. For a request:
- `model` (`name@step` or `name`) is looked up in the routing table: which adapter (or the base weights) serves
  that policy now. A step is served only by its own weights: the newest, or an older one still loaded (leased);
  any other step, and unknown names, get a 404 that says why. Each choice carries `weight_version`, the step that
  sampled it (a chat choice also ART's `policy_token_spans`). SGLang's own request fields are dropped.
- a chat prompt is rendered here, token-exact: earlier replies of the conversation are sent as the ids the engine
  sampled (replies.py), the rest with the chat template; the engine gets the ids (`input_ids`).
- logprobs are forced on; each Choice carries the engine's `prompt_token_ids` and sampled `token_ids` (as vLLM's
  `return_token_ids` does) and `token_id:N` logprob entries. Where the request changed the logits (a grammar,
  penalties), the sampled tokens are scored again without them, so the logprobs are the policy's.
- the samples of a group share one prefill (warmup.py).
- with several replicas, a conversation's requests go to the replica it started on (upstreams.py); a request cut off
  by a replica's crash goes at once to another.
- while the gate is closed (a sync or a server restart) requests wait; a request cut off by a server crash waits
  for the server and goes again, unless it is the one that crashes it (triage.py). Bounded by `hold_timeout`.
Counters per model and policy version: requests, prompt, completion and cached tokens. Only `/v1/chat/completions`,
`/v1/completions`, `/v1/models` and `/health` exist here: no SGLang admin endpoint is reachable through it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from ..chat import ChatTemplate, TemplateError, token_id_from_bytes
from ..errors import ArtSGLangError
from .replies import Prompt, ReplyLog
from .responses import (
    StreamedChoice,
    exact_choice,
    logits_modified,
    policy_spans,
    renderable,
    sanitize,
    set_logprobs,
    sse_error,
)
from .triage import CrashTriage, Ticket
from .upstreams import Upstreams, affinity_key
from .warmup import PrefixWarmup, probe_body

log = logging.getLogger(__name__)

_ALL = object()  # wait_idle: every adapter


@dataclass(frozen=True)
class _Upstream:  # wait_replica_drained: one replica
    index: int


class GatewayError(ArtSGLangError):
    """The gateway's own loop did not do what was asked."""


class _ScoringError(Exception):
    """The engine could not score sampled tokens again (the request fails with 502)."""


@dataclass(frozen=True)
class Route:
    """What serves one policy version of a model: an adapter name on the server, or the base weights (None)."""

    model: str
    version: int
    adapter: str | None


class Gateway:
    def __init__(
        self,
        upstream: str | Upstreams,
        served_model: str,
        *,
        template: ChatTemplate | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        upstream_api_key: str | None = None,
        hold_timeout: float = 600.0,
        max_crashes: int = 3,
        isolation_window: float = 10.0,
        prefix_warmup: bool = True,
        sibling_window: float = 0.02,
        max_history_tokens: int = 20_000_000,
        server_log: str | None = None,
        max_running_requests: int | None = None,
    ) -> None:
        self.upstreams = upstream if isinstance(upstream, Upstreams) else Upstreams([upstream])
        self.served_model = served_model
        self.replies = ReplyLog(template, max_history_tokens) if template is not None else None
        self.host = host
        self.port = port
        self.api_key = api_key  # what clients must send
        self.upstream_api_key = upstream_api_key  # what SGLang wants (SGLangConfig.api_key)
        self.hold_timeout = hold_timeout
        self.server_log = server_log
        # Per upstream; the gateway admits this times their count. None: at or above SGLang's own choice (2,048-4,096).
        self.max_running_requests = max_running_requests or 4096
        self.triage = CrashTriage(isolation_window, max_crashes)
        self.warmup = PrefixWarmup(sibling_window) if prefix_warmup else None
        # name -> {"current": Route, step: Route}; replaced whole on every change (readers need no lock).
        self._routes: dict[str, dict[Any, Route]] = {}
        self.in_flight: Counter[str | None] = Counter()  # by adapter (None: base weights)
        self.counters: defaultdict[tuple[str, int], Counter[str]] = defaultdict(Counter)  # by (model, version)
        self.held = 0  # requests that waited at a closed gate or were sent again
        self._idle_waiters: list[tuple[Any, concurrent.futures.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._gate: asyncio.Event | None = None
        self._admission: asyncio.Semaphore | None = None
        self._holds = 0  # closed() blocks in progress: the gate is open when there are none
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

    def set_route(
        self,
        name: str,
        step: int,
        adapter: str | None,
        older: Mapping[int, str] | None = None,
        *,
        along: Callable[[], None] | None = None,
    ) -> None:
        """Serve `name` and `name@step` from `adapter` (None: base weights), and each step of `older` from its own
        adapter (steps leased or still loaded). Any other step of `name` is refused with a 404. `along` runs in the
        same step of the gateway's loop (no request is routed between them): a change of the replicas that serve."""
        table: dict[Any, Route] = {k: Route(name, k, a) for k, a in (older or {}).items() if k != step}
        table[step] = table["current"] = Route(name, step, adapter)

        def flip() -> None:
            if along is not None:
                along()
            self._routes = {**self._routes, name: table}

        self._call(flip)

    def remove_route(self, name: str) -> None:
        """Stop serving `name` and its steps (a model whose start failed)."""

        def drop() -> None:
            self._routes = {k: v for k, v in self._routes.items() if k != name}

        self._call(drop)

    def known_models(self) -> list[str]:
        names = []
        for name, table in self._routes.items():
            names.append(name)
            names += [f"{name}@{k}" for k in table if k != "current"]
        return names

    @property
    def gate_open(self) -> bool:
        return self._holds == 0

    def close_gate(self) -> None:
        """Hold new requests (a sync or restart is under way) until a matching open_gate()."""
        self._call(lambda: self._hold(+1))

    def open_gate(self) -> None:
        self._call(lambda: self._hold(-1))

    @contextlib.asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        """Hold new requests for the duration of the block; the gate opens again however it ends. Blocks nest:
        the gate opens when the outermost one ends."""
        self.close_gate()
        try:
            yield
        finally:
            self.open_gate()

    def _hold(self, change: int) -> None:
        self._holds = max(0, self._holds + change)
        if self._gate is not None:
            self._gate.clear() if self._holds else self._gate.set()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the gateway's loop and return its result (directly when the gateway is not running)."""
        if self._loop is None or threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def wrapped() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        self._loop.call_soon_threadsafe(wrapped)
        try:
            return future.result(timeout=10)
        except concurrent.futures.TimeoutError:
            raise GatewayError("the gateway's event loop did not answer within 10 s") from None

    def take_counters(self, model: str) -> dict[int, Counter[str]]:
        """`model`'s counters per policy version since the last call (taken on the gateway's loop, so none is
        lost; other models' stay)."""

        def take() -> dict[int, Counter[str]]:
            mine = [key for key in self.counters if key[0] == model]
            return {key[1]: self.counters.pop(key) for key in mine}

        return self._call(take)

    async def wait_drained(self, adapter: str | None, timeout: float) -> bool:
        """Wait (on the caller's loop) until no request runs on `adapter`; False on timeout."""
        return await self._wait_until_idle(adapter, timeout)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request runs at all; False on timeout."""
        return await self._wait_until_idle(_ALL, timeout)

    async def wait_replica_drained(self, replica: int, timeout: float) -> bool:
        """Wait until no request runs on upstream `replica`; False on timeout."""
        return await self._wait_until_idle(_Upstream(replica), timeout)

    async def _wait_until_idle(self, adapter: Any, timeout: float) -> bool:
        waiter: tuple[Any, concurrent.futures.Future[None]] = (adapter, concurrent.futures.Future())

        def register() -> None:
            self._idle_waiters.append(waiter)
            self._wake_idle_waiters()

        self._call(register)
        try:
            await asyncio.wait_for(asyncio.wrap_future(waiter[1]), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._call(lambda: waiter in self._idle_waiters and self._idle_waiters.remove(waiter))

    def _wake_idle_waiters(self) -> None:
        for waiter in list(self._idle_waiters):
            adapter, future = waiter
            if adapter is _ALL:
                busy = sum(self.in_flight.values())
            elif isinstance(adapter, _Upstream):
                busy = self.upstreams.busy[adapter.index]
            else:
                busy = self.in_flight[adapter]
            if busy <= 0:
                self._idle_waiters.remove(waiter)
                if not future.done():
                    future.set_result(None)

    # -- the server, on the gateway's loop --------------------------------------------------------------
    async def _serve(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        headers = {"Authorization": f"Bearer {self.upstream_api_key}"} if self.upstream_api_key else None
        bound = self.max_running_requests * len(self.upstreams.urls)
        self._admission = asyncio.Semaphore(bound)
        # aiohttp's default connector allows 100 connections in all: above that requests queued inside the gateway.
        connector = aiohttp.TCPConnector(limit=bound, limit_per_host=self.max_running_requests)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), headers=headers
        )
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # A listen backlog as deep as the bound (the kernel caps it at net.core.somaxconn): at aiohttp's default, 128,
        # a burst of new connections while this loop was busy was reset (benchmarks/gateway_load.py).
        site = web.TCPSite(self._runner, self.host, self.port, backlog=bound)
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

    def route(self, model: str) -> Route | None:
        """What serves `model` (`name` or `name@step`) now; None for a name not served."""
        return self._resolve(model)

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
            return table.get(int(step))
        except ValueError:
            return None

    def _not_served(self, model: Any) -> str:
        """Why `model` has no route, and what to ask for instead."""
        name, _, step = str(model).partition("@")
        table = self._routes.get(name)
        if table is None or not step.isdigit():
            known = ", ".join(self.known_models()) or "none yet"
            return f"model {model!r} is not served here; known models: {known}"
        newest = table["current"].version
        if int(step) > newest:
            return f"step {step} of {name!r} does not exist yet: the newest is {newest} ({name}@{newest})"
        # Never another policy in its place: the caller's off-policy accounting would name the wrong weights.
        loaded = sorted(k for k in table if k != "current")
        return (
            f"step {step} of {name!r} is no longer loaded on the server (loaded steps: {loaded}), and no other "
            f"policy answers in its place. Ask for {name!r} (step {newest}), or hold "
            f"backend.exact_adapter_lease(model, {step}) while sending, which loads its checkpoint"
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, "/v1/chat/completions", chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, "/v1/completions", chat=False)

    async def _prepare_chat(self, body: dict[str, Any], stream: bool) -> Prompt | None:
        """Force logprobs and render the prompt here (token-exact history) when the conversation is text."""
        body["logprobs"] = True
        if not stream:
            body["return_meta_info"] = True  # the exact sampled ids
            body["return_prompt_token_ids"] = True
        if self.replies is None or not renderable(body):
            return None
        prompt = await asyncio.to_thread(
            self.replies.build,
            body["messages"],
            body.get("tools"),
            continue_final=bool(body.get("continue_final_message")),
            kwargs=body.get("chat_template_kwargs"),
        )
        body["input_ids"] = prompt.ids
        return prompt

    async def _forward(self, request: web.Request, path: str, chat: bool) -> web.StreamResponse:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        requested = body.get("model")
        body = sanitize(body)
        stream = bool(body.get("stream"))
        prompt = None
        if chat:
            try:
                prompt = await self._prepare_chat(body, stream)
            except TemplateError as e:
                return _error(400, str(e))
        elif body.get("logprobs") is None:
            body["logprobs"] = 0
        if stream:
            body.setdefault("stream_options", {})["include_usage"] = True
        rescore = chat and not stream and logits_modified(body)

        deadline = time.monotonic() + self.hold_timeout
        upstreams = self.upstreams
        affinity = affinity_key(body) if len(upstreams.urls) > 1 else None
        failed: set[int] = set()  # replicas that went away under this request: it goes to another one
        try:
            await asyncio.wait_for(self._admission.acquire(), self.hold_timeout)
        except TimeoutError:
            return self._over_bound()
        ticket = Ticket(_digest({k: v for k, v in body.items() if k not in ("model", "stream", "stream_options")}))
        try:
            while True:
                try:
                    if not self._gate.is_set():
                        self.held += 1
                        await asyncio.wait_for(self._gate.wait(), max(0.0, deadline - time.monotonic()))
                    await asyncio.wait_for(self.triage.turn(ticket), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    return self._not_back()
                if (why := self.triage.known_to_crash(ticket)) is not None:
                    return _error(500, self._crash_message(why))
                # Resolved and counted in one step of this loop: a route flip (also run on this loop) cannot fall
                # between them, so an adapter is never unloaded under a request that was routed to it.
                route = self._resolve(requested)
                if route is None:
                    return _error(404, self._not_served(requested))
                replica = upstreams.pick(affinity, avoid=failed, home=prompt.home if prompt is not None else None)
                if replica is None:  # every replica is restarting
                    self.held += 1
                    if not await self._wait_for_upstream(deadline, failed):
                        return self._not_back()
                    continue
                url = upstreams.urls[replica]
                if prompt is not None:
                    prompt.replica = replica  # what its replies record: the conversation's next turn goes there
                body["model"] = self.served_model
                if route.adapter is not None:
                    body["lora_path"] = route.adapter
                else:
                    body.pop("lora_path", None)
                self.in_flight[route.adapter] += 1
                upstreams.busy[replica] += 1
                try:
                    if chat and self.warmup is not None:
                        prefix = _digest(body.get("input_ids") or body.get("messages"))
                        key = (route.version, route.adapter, replica, prefix)
                        await self.warmup.before_send(key, body, functools.partial(self._probe, url, route=route))
                    self.triage.sent(ticket)
                    if stream:
                        return await self._stream(request, url, path, body, route, prompt, ticket)
                    return await self._once(url, path, body, route, chat, prompt, rescore)
                except (aiohttp.ClientConnectorError, TimeoutError) as e:
                    # The server did not take the request (down, or restarting): wait for it, then send it.
                    log.info("gateway: the policy server is unreachable (%s); holding the request", e)
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                    why = self.triage.crashed(ticket)
                    if why is not None:
                        return _error(500, self._crash_message(why))
                    log.warning("gateway: the policy server went away under a request (%s); it will go again", e)
                except _ScoringError as e:
                    return _error(502, str(e))
                finally:
                    self.in_flight[route.adapter] -= 1
                    upstreams.busy[replica] -= 1
                    self._wake_idle_waiters()
                if len(upstreams.urls) > 1:
                    failed.add(replica)
                self.held += 1
                if not await self._wait_for_upstream(deadline, failed):
                    return self._not_back()
        finally:
            self.triage.done(ticket)
            self._admission.release()

    def _not_back(self) -> web.Response:
        return _error(503, f"the policy server was not back within {self.hold_timeout:g} s; try again")

    def _over_bound(self) -> web.Response:
        servers = len(self.upstreams.urls)
        return _error(
            503,
            f"{self.max_running_requests * servers} requests were in flight through the gateway for "
            f"{self.hold_timeout:g} s (SGLangConfig.max_running_requests={self.max_running_requests} per server, "
            f"{servers} server(s)); send fewer at once, or raise max_running_requests if the servers hold more",
        )

    def _crash_message(self, why: str) -> str:
        where = f" ({self.server_log})" if self.server_log else ""
        return f"the policy server crashed while serving this request: {why}. The server log{where} has the cause."

    async def _probe(self, url: str, body: dict[str, Any], route: Route) -> None:
        """The prefix warm-up's one-token request; its usage is counted under `warmup_*`."""
        try:
            async with self._session.post(f"{url}/v1/chat/completions", json=body) as r:
                data = await r.json() if r.status == 200 else {}
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            log.warning("gateway: prefix warm-up failed (%s); the request goes on without it", e)
            return
        usage = data.get("usage") or {}
        c = self.counters[route.model, route.version]
        c["warmup_requests"] += 1
        c["warmup_prompt_tokens"] += usage.get("prompt_tokens") or 0
        c["warmup_cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    async def _wait_for_upstream(self, deadline: float, failed: set[int]) -> bool:
        """Wait until the gate is open and a server answers /health (a restart is being handled elsewhere): one
        that did not fail this request, or any once none is left."""
        while time.monotonic() < deadline:
            if self._gate.is_set():
                choices = [i for i in self.upstreams.available() if i not in failed]
                if not choices:
                    failed.clear()  # the replicas that failed it may be back
                for i in choices:
                    url = self.upstreams.urls[i]
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with self._session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(5)) as r:
                            if r.status == 200:
                                return True
            await asyncio.sleep(0.25)
        return False

    async def _once(
        self, url: str, path: str, body: dict, route: Route, chat: bool, prompt: Prompt | None, rescore: bool
    ) -> web.Response:
        """One non-streamed request. n > 1 is sent as n requests of one sample each, on one route, after one
        prefill of the prompt: SGLang 0.5.15 leaks its adapter references for n > 1 (an adapter can then never
        be unloaded, and the server never finishes a graceful stop)."""
        n = body.get("n") or 1
        one = {k: v for k, v in body.items() if k != "n"}  # the body is sent again after a crash: keep it whole
        if n > 1 and chat and self.warmup is not None:
            await self._probe(url, probe_body(one), route)
        if n == 1:
            replies = [await self._post(url + path, one)]
        else:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._post(url + path, one)) for _ in range(n)]
            except BaseExceptionGroup as e:  # the first failure decides (a crash cuts them all)
                raise e.exceptions[0] from None
            replies = [t.result() for t in tasks]
        for reply in replies:
            if isinstance(reply, web.Response):
                return reply
        data = replies[0]
        if n > 1:
            data["choices"] = [c for r in replies for c in r.get("choices") or []]
            for i, choice in enumerate(data["choices"]):
                choice["index"] = i
            data["usage"] = _summed_usage([r.get("usage") or {} for r in replies])
        for choice in data.get("choices") or []:
            choice["weight_version"] = route.version  # the policy that sampled it, kept with the trajectory
        if chat:
            choices = data.get("choices") or []
            for choice in choices:
                engine_prompt = choice.pop("prompt_token_ids", None) or (prompt.ids if prompt is not None else [])
                if prompt is not None and engine_prompt != prompt.ids:
                    log.warning("gateway: the engine reports a prompt other than the ids it was sent")
                exact_choice(choice, engine_prompt)
                policy_spans(choice, route.model, route.version)
            if rescore:
                await asyncio.gather(*(self._rescore(url, choice, route) for choice in choices))
                self.counters[route.model, route.version]["rescored_requests"] += 1
            if prompt is not None and self.replies is not None:
                for choice in choices:
                    self.replies.record(prompt, choice.get("message") or {}, choice["token_ids"])
            if choices:
                data["prompt_token_ids"] = choices[0]["prompt_token_ids"]
        if route.adapter is not None:
            # SGLang stamps the server-wide version at the end; the adapter this request ran on is the truth.
            data.setdefault("metadata", {})["weight_version"] = str(route.version)
        self._count(route, data.get("usage") or {})
        return web.json_response(data)

    async def _post(self, url: str, body: dict) -> dict | web.Response:
        """The upstream's JSON answer, or its error as a response for the client."""
        async with self._session.post(url, json=body) as upstream:
            raw = await upstream.read()
            if upstream.status != 200:
                return web.Response(body=raw, status=upstream.status, content_type="application/json")
        return json.loads(raw)

    async def _rescore(self, url: str, choice: dict[str, Any], route: Route) -> None:
        """Replace the logprobs of a constrained sample by the policy's own: the sampled ids scored again, with
        no grammar, penalty or bias (the prompt is in the cache, so this costs a prefill of the reply)."""
        prompt, sampled = choice["prompt_token_ids"], choice["token_ids"]
        if not sampled or not prompt:
            return
        payload: dict[str, Any] = {
            "input_ids": prompt + sampled,
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": len(prompt) - 1,
        }
        if route.adapter is not None:
            payload["lora_path"] = route.adapter
        async with self._session.post(f"{url}/generate", json=payload) as r:
            if r.status != 200:
                raise _ScoringError(f"scoring the sampled tokens without the constraint failed: {await r.text()}")
            data = await r.json()
        scored = [entry[0] for entry in data["meta_info"]["input_token_logprobs"][1:]]
        if len(scored) != len(sampled):
            raise _ScoringError(f"scoring returned {len(scored)} logprobs for {len(sampled)} sampled tokens")
        set_logprobs(choice, scored)

    async def _stream(
        self,
        request: web.Request,
        url: str,
        path: str,
        body: dict,
        route: Route,
        prompt: Prompt | None,
        ticket: Ticket,
    ) -> web.StreamResponse:
        if (body.get("n") or 1) > 1:
            return _error(400, "stream=True with n > 1 is not supported here: send n requests (or stream=False)")
        async with self._session.post(f"{url}{path}", json=body) as upstream:
            if upstream.status != 200:
                return web.Response(body=await upstream.read(), status=upstream.status, content_type="application/json")
            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            if route.adapter is not None:
                headers["X-Weight-Version"] = str(route.version)
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            replies: dict[int, StreamedChoice] = {}
            completion_tokens = None
            client_gone = False
            try:
                async for line in upstream.content:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        usage = chunk.get("usage")
                        if usage:
                            self._count(route, usage)
                            completion_tokens = usage.get("completion_tokens")
                        for choice in chunk.get("choices") or []:
                            choice["weight_version"] = route.version
                        if prompt is not None:
                            self._annotate_chunk(chunk, prompt, replies)
                        line = b"data: " + json.dumps(chunk).encode() + b"\n"
                    if not await _to_client(response, line):
                        client_gone = True  # leaving this block ends the upstream request too
                        break
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                # Part of the stream is with the client: it cannot be sent again, only ended with an error that
                # says so (a clean end could be taken for a complete answer).
                self.triage.crashed(ticket)
                log.warning("gateway: upstream failed mid-stream (%s)", e)
                await _to_client(response, sse_error(502, f"the policy server failed mid-stream ({e}); cut off"))
                return response
            # Remembered when whole (the usage chunk came after every token): also when the client left after it,
            # as ART's does at [DONE].
            sampled = sum(len(r.ids) for r in replies.values() if r.ids is not None)
            if self.replies is not None and prompt is not None and sampled == completion_tokens:
                for reply in replies.values():
                    self.replies.record(prompt, reply.message(), reply.ids)
            if not client_gone:
                with contextlib.suppress(ConnectionResetError):
                    await response.write_eof()
            return response

    def _annotate_chunk(self, chunk: dict[str, Any], prompt: Prompt, replies: dict[int, StreamedChoice]) -> None:
        """Exact token ids on a streamed chunk, as vLLM streams them: `prompt_token_ids` on the first, `token_ids`
        per choice (from each token's bytes: exact for byte-level BPE vocabularies). A token whose bytes SGLang
        does not give (part of a multi-byte character) leaves its chunk without `token_ids`, and the reply is not
        remembered: the next turn renders it from its text rather than from ids that could be wrong."""
        if not replies:
            chunk["prompt_token_ids"] = prompt.ids
        tokenizer = self.replies.template.tokenizer
        for choice in chunk.get("choices") or []:
            entries = (choice.get("logprobs") or {}).get("content") or []
            ids: list[int] | None = [token_id_from_bytes(tokenizer, e.get("bytes")) for e in entries]
            if any(i is None for i in ids):
                ids = None
            else:
                choice["token_ids"] = ids
                for entry, token_id in zip(entries, ids, strict=True):
                    entry["token"] = f"token_id:{token_id}"
            reply = replies.setdefault(choice.get("index", 0), StreamedChoice())
            reply.add(choice.get("delta") or {}, ids)
            if choice.get("finish_reason") == "stop" and isinstance(choice.get("matched_stop"), int):
                reply.add({}, [choice["matched_stop"]])  # the stop token: sampled, but streamed with no entry

    def _count(self, route: Route, usage: dict) -> None:
        c = self.counters[route.model, route.version]
        c["requests"] += 1
        c["prompt_tokens"] += usage.get("prompt_tokens") or 0
        c["completion_tokens"] += usage.get("completion_tokens") or 0
        c["cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


async def _to_client(response: web.StreamResponse, data: bytes) -> bool:
    """Write to a streaming client; False if it has gone (aiohttp raises a ConnectionResetError that is also a
    ClientConnectionError: caught here, so that it is never taken for the policy server going away)."""
    try:
        await response.write(data)
    except ConnectionResetError:
        return False
    return True


def _summed_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for u in usages)
    out = {k: sum(u.get(k) or 0 for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {**out, "prompt_tokens_details": {"cached_tokens": cached}}


def _digest(value: Any) -> bytes:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=16).digest()


def _error(status: int, message: str) -> web.Response:
    """An OpenAI-style error. A crash is not worth retrying: `x-should-retry: false` tells OpenAI's client so."""
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "model_not_found",
        500: "server_crash",
        502: "bad_gateway",
        503: "service_unavailable",
    }.get(status, "error")
    headers = {"x-should-retry": "false"} if status == 500 else None
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=headers)
