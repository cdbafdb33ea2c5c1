"""The gateway in front of a real SGLang server: auth, no admin endpoints, routing errors, holding at the gate."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from art_sglang.gateway import Gateway

CHAT = {"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 3, "temperature": 0.0}


@pytest.fixture
def gateway(lora_server):
    g = Gateway(lora_server.base_url, "served", api_key="secret", hold_timeout=30)
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
        assert all(e["token"].startswith("token_id:") for e in choice["logprobs"]["content"])  # forced, exact ids
        assert "meta_info" not in choice


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


async def test_sglangs_own_request_fields_are_dropped(gateway):
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
    data = r.json()
    assert len(data["prompt_token_ids"]) > 3 and data["choices"][0]["token_ids"]


async def test_a_step_is_answered_only_by_its_own_weights(gateway):
    gateway.set_route("policy", 3, None, older={1: None})  # step 1 still loaded (leased), step 2 not
    async with httpx.AsyncClient(
        base_url=gateway.base_url, timeout=120, headers={"Authorization": "Bearer secret"}
    ) as c:
        for model, version in (("policy", 3), ("policy@3", 3), ("policy@1", 1)):
            r = await c.post("/chat/completions", json={**CHAT, "model": model})
            assert r.status_code == 200, r.text
            assert [ch["weight_version"] for ch in r.json()["choices"]] == [version]  # who sampled it
        r = await c.post("/chat/completions", json={**CHAT, "model": "policy@2"})
        assert r.status_code == 404
        message = r.json()["error"]["message"]
        assert "step 2 of 'policy' is no longer loaded on the server (loaded steps: [1, 3])" in message
        assert "exact_adapter_lease(model, 2)" in message
        r = await c.post("/chat/completions", json={**CHAT, "model": "policy@4"})
        assert r.status_code == 404 and "does not exist yet: the newest is 3" in r.json()["error"]["message"]
