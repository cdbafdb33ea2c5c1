"""A stub of an SGLang 0.5.15 server (named a stub: it runs no model), for the gateway's own logic in the fast tier.

It answers the routes the gateway uses with the JSON SGLang 0.5.15 gives (chat choices with `meta_info`'s
`output_token_logprobs`, `prompt_token_ids`, usage with cached tokens, `metadata.weight_version`; `/generate` with
`meta_info`), always sampling the same two tokens, and records every request body it was sent. What it cannot show
(that the ids, logprobs and cache are the engine's) is tested against real servers elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web

from art_sglang.procs import free_port

SAMPLED = [(-0.25, 10407), (-0.5, 2)]  # (logprob, id): "yes", then <|im_end|> in SmolLM2's vocabulary


class StubSGLang:
    def __init__(self, weight_version: str = "default") -> None:
        self.weight_version = weight_version
        self.linger = 0.0  # seconds a stream stays open after its [DONE]
        self.service_time = 0.0  # seconds a chat request takes before its answer
        self.distinct = False  # each chat answer's text names this server and counts (as sampled replies differ)
        self.answered = 0
        self.running = self.most_running = 0  # chat requests being answered: now, and at most
        self.requests: list[tuple[str, dict[str, Any]]] = []  # (path, body) as received
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> StubSGLang:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/model_info", self._model_info)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/generate", self._generate)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.weight_version})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("/v1/chat/completions", body))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.service_time)
            return await self._answer(request, body)
        finally:
            self.running -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        prompt = body.get("input_ids") or [1, 2, 3]
        if body.get("stream"):
            return await self._stream(request, body, prompt)
        self.answered += 1
        text = f"yes {self.port} {self.answered}" if self.distinct else "yes"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None},
            "logprobs": {
                "content": [{"token": "yes", "bytes": list(b"yes"), "logprob": SAMPLED[0][0], "top_logprobs": []}]
            },
            "finish_reason": "stop",
            "matched_stop": SAMPLED[-1][1],
        }
        if body.get("return_meta_info"):
            choice["meta_info"] = {"output_token_logprobs": [[lp, i, None] for lp, i in SAMPLED]}
        if body.get("return_prompt_token_ids"):
            choice["prompt_token_ids"] = prompt
        return web.json_response(
            {
                "id": "stub",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": len(SAMPLED),
                    "total_tokens": len(prompt) + len(SAMPLED),
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
                "metadata": {"weight_version": self.weight_version},
            }
        )

    async def _stream(self, request: web.Request, body: dict[str, Any], prompt: list[int]) -> web.StreamResponse:
        """As SGLang streams: a chunk per token with its logprob entry (no ids), the stop chunk, usage, [DONE]; then
        it holds the connection `linger` seconds before its end (a server still finishing the response)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "stub", "object": "chat.completion.chunk", "model": body.get("model")}
        entry = {"token": "yes", "bytes": list(b"yes"), "logprob": SAMPLED[0][0], "top_logprobs": []}
        chunks = [
            {"index": 0, "delta": {"role": "assistant", "content": "yes"}, "logprobs": {"content": [entry]}},
            {"index": 0, "delta": {}, "finish_reason": "stop", "matched_stop": SAMPLED[-1][1]},
        ]
        for choice in chunks:
            await response.write(b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n")
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(SAMPLED), "total_tokens": len(prompt) + 2}
        await response.write(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(self.linger)
        await response.write_eof()
        return response

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("/generate", body))
        ids = body.get("input_ids") or []
        start = body.get("logprob_start_len", len(ids))
        meta = {
            "prompt_tokens": len(ids),
            "completion_tokens": 0,
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "input_token_logprobs": [[None if k == 0 else -1.0, i, None] for k, i in enumerate(ids[start:])],
            "output_token_logprobs": [],
        }
        return web.json_response({"text": "", "output_ids": [], "meta_info": meta})

    def sent(self, path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
        return [body for p, body in self.requests if p == path]
