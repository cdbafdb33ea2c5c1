"""PrefixWarmup: prefill a prompt once before the samples of a group are sent.

SGLang does not make concurrent requests with one prompt wait for each other's prefill: the G samples of a GRPO
group, sent together, would each prefill the whole prompt. So when requests with the same prompt (under one
policy version) arrive within `window` seconds of each other, the first sends a one-token request that puts the
prompt in the radix cache, and all of them wait for it. A lone request waits only the window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any


def probe_body(body: dict[str, Any]) -> dict[str, Any]:
    """The one-token request that puts a chat request's prompt in the cache."""
    skip = ("n", "stream", "stream_options", "return_meta_info", "return_prompt_token_ids")
    request = {k: v for k, v in body.items() if k not in skip}
    request.update(max_tokens=1, logprobs=False, top_logprobs=None)
    request.pop("max_completion_tokens", None)
    return request


@dataclass
class _Waiting:
    """The requests with one prompt that are waiting for its warm-up (kept only while they wait: the cache may
    be evicted or flushed after)."""

    done: asyncio.Future[None]
    requests: int = 1


class PrefixWarmup:
    def __init__(self, window: float) -> None:
        self.window = window
        self._waiting: dict[Hashable, _Waiting] = {}

    async def before_send(
        self, key: Hashable, body: dict[str, Any], probe: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        """Return once the prompt of `body` is worth sending: warmed up (by `probe`, which sends the one-token
        request), or alone."""
        entry = self._waiting.get(key)
        if entry is not None:
            entry.requests += 1
            try:
                await entry.done
            finally:
                self._release(key)
            return
        entry = self._waiting[key] = _Waiting(asyncio.get_running_loop().create_future())
        try:
            await asyncio.sleep(self.window)  # the samples of a group are sent together
            if entry.requests > 1:
                try:
                    await probe(probe_body(body))
                finally:
                    entry.done.set_result(None)
        finally:
            self._release(key)

    def _release(self, key: Hashable) -> None:
        entry = self._waiting.get(key)
        if entry is not None:
            entry.requests -= 1
            if entry.requests <= 0:
                del self._waiting[key]
