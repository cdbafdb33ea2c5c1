"""ReplyLog: token-exact history for multi-turn conversations.

An agent sends its earlier replies back as text (and tool calls as JSON), and a chat template may render them
differently from what the model sampled (tool calls re-serialized, reasoning stripped, whitespace normalized).
Rendering that text again would give the engine, and then the trainer, a context the model never produced, and
would miss the prefix cache. So the gateway remembers each reply it served, keyed by the conversation up to and
including it, with the exact tokens before it and the ids it sampled. A request whose history holds such a reply
gets as its prompt: the tokens of that turn exactly as the engine saw and sampled them, then the template's
rendering of the messages after it. The prompt of turn k+1 then extends turn k's sequence token for token.

Turns are stored as a chain (each turn keeps only the tokens after its parent's), bounded by `max_tokens`
(least recently used turns go first).
"""

from __future__ import annotations

import hashlib
import json
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..chat import ChatTemplate, fill


@dataclass(eq=False)
class Turn:
    """A served reply: the tokens after the parent turn's (new context, then the sampled ids), and the replica that
    sampled it (its prefix cache holds them)."""

    parent: Turn | None
    tokens: array
    replica: int | None = None

    def ids(self) -> list[int]:
        chain, turn = [], self
        while turn is not None:
            chain.append(turn.tokens)
            turn = turn.parent
        out: list[int] = []
        for tokens in reversed(chain):
            out += tokens.tolist()
        return out


@dataclass
class Prompt:
    """The ids the engine is given for one request, and where they came from."""

    ids: list[int]
    key: bytes  # the conversation so far (tools, options and messages)
    parent: Turn | None = None  # the earlier reply its history was rebuilt from
    own_start: int = 0  # ids[:own_start] are that turn's tokens, ids[own_start:] are new
    replica: int | None = None  # where the gateway sent it (set before each send)

    @property
    def home(self) -> int | None:
        """The replica that sampled the conversation's last known reply: its prefix cache holds this prompt's start."""
        return self.parent.replica if self.parent is not None else None


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def canonical(message: dict[str, Any]) -> bytes:
    """Everything of a message a chat template can render, in a form that survives a round trip through a client:
    two group samples with one visible answer and other reasoning are two replies."""
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        # The call's id too: two samples may write the same call with other tokens, and clients send ids back.
        calls.append([call.get("id"), function.get("name"), _arguments(function.get("arguments"))])
    fields = [message.get("role"), calls, message.get("tool_call_id")]
    fields += [message.get(k) or "" for k in ("content", "reasoning_content", "name")]  # None, absent and "" alike
    return json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()


def _chain(key: bytes, message: dict[str, Any]) -> bytes:
    return hashlib.blake2b(key + canonical(message), digest_size=16).digest()


class ReplyLog:
    def __init__(self, template: ChatTemplate, max_tokens: int = 20_000_000) -> None:
        self.template = template
        self.max_tokens = max_tokens
        self._turns: OrderedDict[bytes, Turn] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()  # build() runs in worker threads, record() on the gateway's loop

    def __len__(self) -> int:
        return len(self._turns)

    def build(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None,
        *,
        continue_final: bool = False,
        kwargs: dict[str, Any] | None = None,
    ) -> Prompt:
        """The prompt for a chat request: token-exact up to the last reply this log knows, rendered after it."""
        root = json.dumps([tools, kwargs, continue_final], sort_keys=True, ensure_ascii=False).encode()
        keys, key = [], hashlib.blake2b(root, digest_size=16).digest()
        for message in messages:
            key = _chain(key, message)
            keys.append(key)
        opts = {"add_generation_prompt": not continue_final, "continue_final": continue_final, "kwargs": kwargs}
        turn, j = self._last_known(messages, keys)
        if turn is None:
            return Prompt(self.template.render(messages, tools, **opts), key)
        segments = self.template.render_with_holes(messages, [j], tools, **opts)
        base = turn.ids()
        ids, _ = fill([[], segments[1]], [base])
        return Prompt(ids, key, turn, len(base))

    def _last_known(self, messages: list[dict[str, Any]], keys: list[bytes]) -> tuple[Turn | None, int]:
        with self._lock:
            for j in range(len(messages) - 1, -1, -1):
                turn = self._turns.get(keys[j]) if messages[j].get("role") == "assistant" else None
                if turn is not None:
                    self._turns.move_to_end(keys[j])
                    return turn, j
        return None, -1

    def record(self, prompt: Prompt, reply: dict[str, Any], sampled: list[int]) -> None:
        """Remember a reply served for `prompt`, so that a later request that sends it back is rendered exactly."""
        turn = Turn(prompt.parent, array("i", prompt.ids[prompt.own_start :] + sampled), prompt.replica)
        key = _chain(prompt.key, reply)
        with self._lock:
            old = self._turns.pop(key, None)
            if old is not None:
                self._tokens -= len(old.tokens)
            self._turns[key] = turn
            self._tokens += len(turn.tokens)
            while self._tokens > self.max_tokens and len(self._turns) > 1:
                _, evicted = self._turns.popitem(last=False)
                self._tokens -= len(evicted.tokens)
