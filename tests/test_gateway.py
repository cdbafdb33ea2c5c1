"""The gateway's own logic: auth, no admin endpoints, routing errors, holding at the gate, what reaches the server.

In front of a stub of SGLang 0.5.15 (tests/stub_sglang.py, named so: it runs no model), which answers with SGLang's
JSON and records what it was sent; the engine's side of every reply (exact ids, logprobs, cache) is tested against
real servers in test_backend.py and test_agents.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from stub_sglang import SAMPLED, StubSGLang

from art_sglang.chat import ChatTemplate
from art_sglang.gateway import Gateway
from art_sglang.gateway.upstreams import Upstreams

CHAT = {"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 3, "temperature": 0.0}


@pytest.fixture(scope="module")
def template(model_path):
    return ChatTemplate.load(model_path)


@pytest.fixture
def stub():
    with StubSGLang() as s:
        yield s


@pytest.fixture
def gateway(stub, template):
    g = Gateway(stub.base_url, "served", template=template, api_key="secret", hold_timeout=30)
    g.start()
    g.set_route("policy", 0, None)
    yield g
    g.stop()


async def test_api_key_is_required_when_set(gateway):
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120) as c:
        r = await c.post("/chat/completions", json={**CHAT, "model": "policy"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = await c.post(
            "/chat/completions", json={**CHAT, "model": "policy"}, headers={"Authorization": "Bearer secret"}
        )
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        # The engine's sampled ids, from its meta_info (asked for, then removed), in place of token text.
        assert [e["token"] for e in choice["logprobs"]["content"]] == [f"token_id:{i}" for _, i in SAMPLED]
        assert choice["token_ids"] == [i for _, i in SAMPLED] and "meta_info" not in choice


@pytest.mark.parametrize(
    "path",
    [
        "/flush_cache",
        "/update_weights_from_disk",
        "/load_lora_adapter",
        "/release_memory_occupation",
        "/server_info",
        "/generate",
        "/abort_request",
    ],
)
async def test_sglang_admin_endpoints_are_not_reachable(gateway, path):
    root = gateway.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root, timeout=30, headers={"Authorization": "Bearer secret"}) as c:
        for method in ("GET", "POST"):
            r = await c.request(method, path, json={})
            assert r.status_code in (404, 405), (method, path, r.status_code)


async def test_unknown_models_get_a_404_naming_the_known_ones(gateway):
    async with httpx.AsyncClient(
        base_url=gateway.base_url, timeout=30, headers={"Authorization": "Bearer secret"}
    ) as c:
        r = await c.post("/chat/completions", json={**CHAT, "model": "nope"})
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "model 'nope' is not served here; known models: policy, policy@0"
        ids = [m["id"] for m in (await c.get("/models")).json()["data"]]
        assert ids == ["policy", "policy@0"]


async def test_requests_wait_at_a_closed_gate_and_go_when_it_opens(gateway):
    gateway.close_gate()
    async with httpx.AsyncClient(
        base_url=gateway.base_url, timeout=120, headers={"Authorization": "Bearer secret"}
    ) as c:
        pending = asyncio.create_task(c.post("/chat/completions", json={**CHAT, "model": "policy"}))
        await asyncio.sleep(1.0)
        assert not pending.done() and gateway.held >= 1
        gateway.set_route("policy", 1, None)  # a sync finished meanwhile
        gateway.open_gate()
        r = await pending
    assert r.status_code == 200
    assert gateway.take_counters("policy")[1]["requests"] == 1  # counted under the policy that served it
    assert gateway.take_counters("policy") == {} and gateway.take_counters("other") == {}  # taken once


async def test_sglangs_own_request_fields_are_dropped(gateway, stub, template):
    body = {
        **CHAT,
        "model": "policy",
        "input_ids": [1, 2, 3],  # would replace the conversation
        "lora_path": "someone-elses-adapter",  # would pick another adapter
        "rid": "fixed-id",  # would collide between clients
        "custom_logit_processor": "serialized code",
    }
    async with httpx.AsyncClient(
        base_url=gateway.base_url, timeout=120, headers={"Authorization": "Bearer secret"}
    ) as c:
        r = await c.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    (sent,) = stub.sent()
    rendered = template.render(CHAT["messages"], add_generation_prompt=True)
    assert sent["input_ids"] == rendered and r.json()["prompt_token_ids"] == rendered  # the gateway's rendering
    assert "rid" not in sent and "custom_logit_processor" not in sent and "lora_path" not in sent  # base route
    assert sent["logprobs"] is True and sent["return_meta_info"] is True  # what exact ids need, always asked for


async def test_a_step_is_answered_only_by_its_own_weights(gateway, stub):
    gateway.set_route("policy", 3, "policy-step3", older={1: "policy-step1"})  # step 1 still loaded (leased), 2 not
    async with httpx.AsyncClient(
        base_url=gateway.base_url, timeout=120, headers={"Authorization": "Bearer secret"}
    ) as c:
        for model, version in (("policy", 3), ("policy@3", 3), ("policy@1", 1)):
            r = await c.post("/chat/completions", json={**CHAT, "model": model})
            assert r.status_code == 200, r.text
            assert [ch["weight_version"] for ch in r.json()["choices"]] == [version]  # who sampled it
            assert r.json()["metadata"]["weight_version"] == str(version)  # the adapter's, not the server's label
            assert stub.sent()[-1]["lora_path"] == f"policy-step{version}"  # sent to that step's own adapter
        r = await c.post("/chat/completions", json={**CHAT, "model": "policy@2"})
        assert r.status_code == 404
        message = r.json()["error"]["message"]
        assert "step 2 of 'policy' is no longer loaded on the server (loaded steps: [1, 3])" in message
        assert "exact_adapter_lease(model, 2)" in message
        r = await c.post("/chat/completions", json={**CHAT, "model": "policy@4"})
        assert r.status_code == 404 and "does not exist yet: the newest is 3" in r.json()["error"]["message"]


async def test_a_streaming_client_that_leaves_at_done_is_not_a_server_crash(gateway, stub):
    """ART's client closes a stream as soon as it reads [DONE]; the gateway's end of the response then fails. That is
    the client leaving: never a crash of the policy server, never a reason to send the request again."""
    stub.linger = 0.5  # the server ends its response after the client has gone
    body = {**CHAT, "model": "policy", "stream": True}
    headers = {"Authorization": "Bearer secret"}
    for _ in range(2):  # twice: a second such request must not be taken for a request that crashes the server
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, headers=headers) as c:
            async with c.stream("POST", "/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        break  # and close the connection
        await asyncio.sleep(1.0)  # the gateway meets the closed connection
    assert len(stub.sent()) == 2  # each request reached the server once
    assert gateway.held == 0  # nothing was held for a server that went away
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, headers=headers) as c:
        assert (await c.post("/chat/completions", json={**CHAT, "model": "policy"})).status_code == 200


async def test_the_gateway_holds_as_many_requests_as_the_server_takes(gateway, stub):
    """300 requests at once all reach the server together (aiohttp's default connector let 100 through)."""
    stub.service_time = 2.0
    limits = httpx.Limits(max_connections=None)
    headers = {"Authorization": "Bearer secret"}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120, headers=headers, limits=limits) as c:
        replies = await asyncio.gather(
            *(c.post("/chat/completions", json={**CHAT, "model": "policy"}) for _ in range(300))
        )
    assert [r.status_code for r in replies] == [200] * 300
    assert stub.most_running == 300


async def test_above_the_bound_requests_wait_then_get_a_503_that_says_why(stub, template):
    """SGLangConfig.max_running_requests bounds what the gateway sends at once; a request that waits longer than
    the hold timeout gets a 503 that names the setting."""
    stub.service_time = 2.0
    # No prefix warm-up: its probe is a request of its own, which the stub would answer in 2 s too.
    g = Gateway(
        stub.base_url, "served", template=template, hold_timeout=3.0, max_running_requests=2, prefix_warmup=False
    )
    g.start()
    g.set_route("policy", 0, None)
    try:
        async with httpx.AsyncClient(base_url=g.base_url, timeout=60) as c:
            replies = await asyncio.gather(
                *(c.post("/chat/completions", json={**CHAT, "model": "policy"}) for _ in range(6))
            )
    finally:
        g.stop()
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 200, 200, 503, 503], codes  # two waves of 2 s within the 3 s hold, not a third
    assert stub.most_running == 2
    refused = next(r for r in replies if r.status_code == 503).json()["error"]["message"]
    assert "max_running_requests=2" in refused and "send fewer at once" in refused


async def test_conversations_that_begin_alike_spread_over_two_replicas_and_each_stays_on_one(template):
    """64 two-turn conversations with one system prompt and one first message (one start, as an agent task with a
    fixed prompt sends), all at once, over two replicas: each replica serves 35-65% of the requests, and each second
    turn goes to the replica that sampled the first reply (its prefix cache holds the conversation)."""
    start = [
        {"role": "system", "content": "You are an agent. Use the tools to finish the task."},
        {"role": "user", "content": "Begin."},
    ]
    with StubSGLang() as a, StubSGLang() as b:
        for s in (a, b):
            s.service_time, s.distinct = 0.5, True  # all in flight at once; each reply its own text
        # No prefix warm-up: its probes would be counted as requests.
        g = Gateway(Upstreams([a.base_url, b.base_url]), "served", template=template, prefix_warmup=False)
        g.start()
        g.set_route("policy", 0, None)

        async def conversation(c: httpx.AsyncClient, k: int) -> None:
            messages = list(start)
            for _ in range(2):
                r = await c.post("/chat/completions", json={"model": "policy", "messages": messages, "max_tokens": 2})
                assert r.status_code == 200, r.text
                messages += [r.json()["choices"][0]["message"], {"role": "user", "content": f"Task {k}, go on."}]

        try:
            limits = httpx.Limits(max_connections=None)
            async with httpx.AsyncClient(base_url=g.base_url, timeout=60, limits=limits) as c:
                await asyncio.gather(*(conversation(c, k) for k in range(64)))
        finally:
            g.stop()
    served = [len(a.sent()), len(b.sent())]
    assert sum(served) == 128 and all(0.35 <= n / 128 <= 0.65 for n in served), served
    for s in (a, b):  # a second turn carries its first reply, whose text names the replica that sampled it
        seconds = [body["messages"][2]["content"] for body in s.sent() if len(body["messages"]) > 2]
        assert seconds and all(text.split()[1] == str(s.port) for text in seconds), (s.port, seconds[:3])


async def test_a_burst_of_new_connections_while_the_gateway_is_busy_is_not_refused(gateway, stub):
    """1,000 agents connecting at once while the gateway's loop is busy: none gets a connection error. With aiohttp's
    default listen backlog (128) the kernel dropped the connections above it (benchmarks/gateway_load.py: 187 of
    1,024 agents at once failed with APIConnectionError)."""
    import time

    limits = httpx.Limits(max_connections=None)
    headers = {"Authorization": "Bearer secret"}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120, headers=headers, limits=limits) as c:
        gateway._loop.call_soon_threadsafe(time.sleep, 2.0)  # the loop accepts nothing meanwhile  # noqa: SLF001
        replies = await asyncio.gather(
            *(c.post("/chat/completions", json={**CHAT, "model": "policy"}) for _ in range(1000)),
            return_exceptions=True,
        )
    failed = [r for r in replies if isinstance(r, BaseException)]
    assert failed == [], f"{len(failed)} failed, e.g. {failed[0]!r}"
    assert [r.status_code for r in replies] == [200] * 1000
