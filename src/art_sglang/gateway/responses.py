"""What the gateway changes in chat requests and responses, as plain functions."""

from __future__ import annotations

import json
from typing import Any

# Fields of SGLang's own API a client must not set through the gateway: they pick adapters, name requests,
# bypass the template or reach server internals. vLLM/ART token-id options are answered by the gateway itself.
SERVER_ONLY_FIELDS = frozenset(
    {
        "rid",
        "lora_path",
        "input_ids",
        "return_meta_info",
        "return_prompt_token_ids",
        "return_hidden_states",
        "return_routed_experts",
        "routed_experts_start_len",
        "return_cached_tokens_details",
        "session_id",
        "session_params",
        "extra_key",
        "cache_salt",
        "priority",
        "bootstrap_host",
        "bootstrap_port",
        "bootstrap_room",
        "routed_dp_rank",
        "disagg_prefill_dp_rank",
        "data_parallel_rank",
        "custom_logit_processor",
        "custom_params",
        "return_token_ids",
        "return_tokens_as_token_ids",
        "nvext",
    }
)


def sanitize(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in SERVER_ONLY_FIELDS}


def logits_modified(body: dict[str, Any]) -> bool:
    """Whether the request changes the logits before sampling (a grammar, penalties, biases): the engine then
    reports logprobs of that changed distribution, not of the policy the trainer optimizes."""
    tool_choice = body.get("tool_choice")
    forced_tools = bool(body.get("tools")) and (tool_choice == "required" or isinstance(tool_choice, dict))
    strict_tools = any(((t.get("function") or {}).get("strict")) for t in body.get("tools") or [])
    response_format = (body.get("response_format") or {}).get("type") not in (None, "text")
    return bool(
        forced_tools
        or strict_tools
        or response_format
        or any(body.get(k) for k in ("regex", "ebnf", "json_schema", "structural_tag", "logit_bias"))
        or body.get("frequency_penalty")
        or body.get("presence_penalty")
        or body.get("repetition_penalty") not in (None, 1, 1.0)
        or body.get("min_tokens")
    )


def renderable(body: dict[str, Any]) -> bool:
    """Text-only conversations are rendered by the gateway (images and audio, or anything malformed, are left to
    the server, which says what is wrong)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return False
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            return False
    return True


def exact_choice(choice: dict[str, Any], prompt_ids: list[int]) -> list[int]:
    """Put the engine's exact token ids on a chat Choice (from SGLang's meta_info, which is removed), as vLLM's
    `return_token_ids` does: `token_ids` (sampled), `prompt_token_ids`, and `token_id:N` logprob entries.
    Logprob entries are rebuilt from meta_info, so a parser that dropped them cannot make a Choice untrainable."""
    meta = choice.pop("meta_info", None) or {}
    sampled = meta.get("output_token_logprobs") or []
    ids = [int(token_id) for _, token_id, _ in sampled]
    old = ((choice.get("logprobs") or {}).get("content")) or []
    entries = []
    for i, (logprob, token_id, _) in enumerate(sampled):
        entry = dict(old[i]) if len(old) == len(sampled) else {"bytes": None, "top_logprobs": []}
        entry.update(token=f"token_id:{token_id}", logprob=logprob)
        entries.append(entry)
    choice["logprobs"] = {**(choice.get("logprobs") or {}), "content": entries}
    choice["token_ids"] = ids
    choice["prompt_token_ids"] = prompt_ids
    return ids


def policy_spans(choice: dict[str, Any], model: str, version: int) -> None:
    """Stamp which policy produced a chat Choice in the fields ART 0.5.23 reads: `policy_token_spans` over the
    completion, `prompt_policy_token_spans` over the prompt's scored tokens (from the second). One span each: a
    request runs on one route from start to end. PipelineTrainer refuses an eval whose choices lack them."""
    completion, prompt = len(choice["token_ids"]), len(choice["prompt_token_ids"])
    if not completion:  # as ART's own: no span for no tokens
        return
    name = f"{model}@{version}"
    policy = {"generation_id": name, "policy_version": version, "lora_slot": name, "update_seq": version}
    choice["policy_token_spans"] = [{"start_token": 0, "end_token": completion, **policy}]
    choice["prompt_policy_token_spans"] = [{"start_token": 1, "end_token": prompt, **policy}] if prompt > 1 else []


def set_logprobs(choice: dict[str, Any], logprobs: list[float]) -> None:
    for entry, logprob in zip(choice["logprobs"]["content"], logprobs, strict=True):
        entry["logprob"] = logprob


class StreamedChoice:
    """One choice of a streamed chat response, assembled from its chunks: the reply and its sampled ids."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.ids: list[int] | None = []

    def add(self, delta: dict[str, Any], ids: list[int] | None) -> None:
        if delta.get("content"):
            self.content.append(delta["content"])
        for call in delta.get("tool_calls") or []:
            slot = self.calls.setdefault(call.get("index", 0), {"function": {"name": "", "arguments": ""}})
            if call.get("id"):  # the first chunk of a call carries its id, which clients send back
                slot["id"], slot["type"] = call["id"], call.get("type") or "function"
            function = call.get("function") or {}
            slot["function"]["name"] += function.get("name") or ""
            slot["function"]["arguments"] += function.get("arguments") or ""
        if ids is None or self.ids is None:
            self.ids = None  # a token that could not be mapped: the reply is not recorded
        else:
            self.ids += ids

    def message(self) -> dict[str, Any]:
        calls = [self.calls[i] for i in sorted(self.calls)] or None
        return {"role": "assistant", "content": "".join(self.content) or None, "tool_calls": calls}


def sse_error(status: int, message: str) -> bytes:
    event = {"error": {"message": message, "type": "server_error", "code": status}}
    return b"data: " + json.dumps(event).encode() + b"\n\n"
