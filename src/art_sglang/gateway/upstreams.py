"""Upstreams: where the gateway sends a request, when several SGLang replicas serve one policy.

A conversation stays on the replica that sampled its last reply (the reply log remembers it): that replica's prefix
cache holds everything before the new turn. A new conversation goes where others with its start went (the key: the
prompt up to its first user message, and the tools), so a GRPO group's samples share one prefix, unless that
replica holds more than its share of the requests in flight: then to the least busy one, which the start then
sticks to. So conversations that all begin alike (one system prompt, one first message) still spread over the
replicas. Only replicas that hold the current policy are chosen (`available`, kept by the ReplicaSet).

Why not sglang-router (0.3.2): its HTTP router re-serializes chat requests through its own types and drops
SGLang's `input_ids`, `return_meta_info` and `return_prompt_token_ids`, so the engine would see a prompt the
gateway did not render and the exact sampled ids would be lost (docs/architecture.md, "Replicas").
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any


def affinity_key(body: dict[str, Any]) -> bytes:
    """What a request shares with its conversation's other requests: the messages up to the first user message,
    and the tools (for a plain completion: the start of its prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        head = []
        for m in messages:
            head.append(m)
            if isinstance(m, dict) and m.get("role") == "user":
                break
        what: Any = [head, body.get("tools")]
    else:
        what = body.get("prompt")
        what = what[:256] if isinstance(what, str | list) else what
    return hashlib.blake2b(json.dumps(what, sort_keys=True, default=str).encode(), digest_size=16).digest()


# How many requests in flight a replica may hold above an even share and still take a new conversation whose start
# it has served: a group of 2 x SLACK samples sent at once stays on one of two replicas.
SLACK = 8


class Upstreams:
    """The servers behind the gateway, chosen on the gateway's loop."""

    def __init__(
        self, urls: list[str], available: Callable[[], Collection[int]] | None = None, remember: int = 65536
    ) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._available = available  # indices that may be chosen (None: all); read from the gateway's thread
        self.busy = [0] * len(self.urls)  # requests in flight, by replica
        self.sent = [0] * len(self.urls)  # requests sent, by replica (a resend counts again)
        self.remember = remember
        self._sticky: OrderedDict[bytes, int] = OrderedDict()

    def available(self) -> list[int]:
        if self._available is None:
            return list(range(len(self.urls)))
        return sorted(self._available())

    def pick(self, key: bytes | None, avoid: Collection[int] = (), home: int | None = None) -> int | None:
        """The replica for a request whose conversation starts with `key` and was last sampled on `home`; None
        when none is available (all restarting)."""
        choices = [i for i in self.available() if i not in avoid]
        if not choices:
            return None
        if home in choices:
            i = home
        elif key is not None and (i := self._sticky.get(key)) in choices and not self._over_share(i, choices):
            self._sticky.move_to_end(key)
        else:
            i = min(choices, key=lambda c: self.busy[c])
            if key is not None:
                self._sticky[key] = i
                self._sticky.move_to_end(key)
                if len(self._sticky) > self.remember:
                    self._sticky.popitem(last=False)
        self.sent[i] += 1
        return i

    def _over_share(self, i: int, choices: list[int]) -> bool:
        return self.busy[i] >= sum(self.busy[c] for c in choices) / len(choices) + SLACK
