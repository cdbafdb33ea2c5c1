"""ChatTemplate: a conversation rendered to token ids, with exact sampled ids where the model already answered.

The gateway and the trainer render conversations the same way: the model's chat template (or the one given in
`SGLangConfig.chat_template`) applied to the messages as text, then encoded without extra special tokens, which is
what SGLang does. Where a message is a reply the engine sampled, its text must not be re-tokenized (byte-level
BPE does not round-trip, and templates rewrite replies: tool calls re-serialized, reasoning stripped). Such
messages are rendered as one placeholder token each ("holes"), and the caller fills each hole with the ids the
engine sampled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ArtSGLangError

log = logging.getLogger("art_sglang")


class TemplateError(ArtSGLangError, ValueError):
    """A conversation cannot be rendered with the chat template; the message names why."""


def load_template(source: str | None) -> str | None:
    """The text of a Jinja chat template given as a file path (None: the tokenizer's own)."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise TemplateError(f"chat_template {source!r} is not a file; pass the path of a Jinja template file")
    return path.read_text()


# How a template writes a tool call, and the SGLang parser that reads it back (first match wins).
_TOOL_CALL_FORMATS = (
    ("<function=", "qwen3_coder"),
    ("<tool_call>", "qwen25"),  # Qwen2.5, Qwen3 and Hermes: <tool_call>{json}</tool_call>
    ("<|python_tag|>", "llama3"),
    ("[TOOL_CALLS]", "mistral"),
)


def tool_call_parser_for(template: str) -> str | None:
    """The SGLang tool-call parser for a chat template, or None when the template shows no tool-call format."""
    for marker, parser in _TOOL_CALL_FORMATS:
        if marker in template:
            return parser
    return None


def resolve_tool_call_parser(setting: str | None, template: str, model: str) -> str | None:
    """SGLangConfig.tool_call_parser with "auto" decided from the template; a template whose tool-call format is not
    recognised is said once, loudly: its tool calls would come back as plain text."""
    if setting != "auto":
        return setting
    parser = tool_call_parser_for(template)
    if parser is None:
        log.warning(
            "art-sglang: the chat template of %s has no tool-call format art-sglang recognises (%s), so SGLang runs "
            "with no tool-call parser and tool calls come back as text in `content`. If the model calls tools, set "
            "SGLangConfig(tool_call_parser=...) to SGLang's parser for it (e.g. 'hermes', 'qwen25', 'llama3', "
            "'mistral', 'pythonic').",
            model,
            ", ".join(marker for marker, _ in _TOOL_CALL_FORMATS),
        )
    return parser


def normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """What templates expect, as SGLang passes it: content a string (text parts joined with spaces), tool-call
    arguments as objects."""
    out = dict(message)
    if out.get("content") is None:
        out["content"] = ""
    elif isinstance(out["content"], list):
        out["content"] = " ".join(p.get("text", "") for p in out["content"] if isinstance(p, dict))
    if out.get("role") == "assistant" and isinstance(out.get("tool_calls"), list):
        calls = []
        for call in out["tool_calls"]:
            call = dict(call)
            function = dict(call.get("function") or {})
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass  # left as text: the template shows what the model wrote
            call["function"] = function
            calls.append(call)
        out["tool_calls"] = calls
    return out


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the rest are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_BYTE_TO_UNICODE = _byte_to_unicode()


_REPLACEMENT = "\ufffd".encode()


def token_id_from_bytes(tokenizer: Any, raw: list[int] | bytes | None) -> int | None:
    """The id of the vocabulary entry whose bytes are `raw` (byte-level BPE vocabularies: exact, since every entry
    is a distinct byte string); None where there is no such entry, or where `raw` holds U+FFFD: SGLang gives a
    token's bytes as those of its decoded text, and a token that is part of a multi-byte character (an emoji, CJK)
    decodes to U+FFFD, whose bytes belong to another token."""
    if raw is None or _REPLACEMENT in bytes(raw):
        return None
    token_id = tokenizer.convert_tokens_to_ids("".join(_BYTE_TO_UNICODE[b] for b in raw))
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) is None:
        return None
    return token_id


class ChatTemplate:
    """A tokenizer and its chat template. `template` (Jinja text) replaces the tokenizer's own."""

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the tokenizer has no chat template; pass SGLangConfig(chat_template='path/to/template.jinja')"
            )
        reserved = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
        # Placeholders: added tokens that encode to exactly themselves, highest ids first (the unused ones).
        self._holes = [
            i
            for i in sorted(tokenizer.added_tokens_decoder, reverse=True)
            if i not in reserved and self.encode(tokenizer.convert_ids_to_tokens(i)) == [i]
        ]
        if not self._holes:
            raise TemplateError("the tokenizer has no spare added token to stand for a sampled reply")

    @classmethod
    def load(cls, model_dir: str | Path, template_path: str | None = None) -> ChatTemplate:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_dir)), load_template(template_path))

    @property
    def source(self) -> str:
        """The template's Jinja text (all of them, where a tokenizer has several)."""
        template = self.template if self.template is not None else self.tokenizer.chat_template
        return "\n".join(template.values()) if isinstance(template, dict) else str(template)

    def text(
        self,
        messages: Sequence[dict[str, Any]],
        tools: list[dict] | None = None,
        *,
        add_generation_prompt: bool,
        continue_final: bool = False,
        kwargs: dict[str, Any] | None = None,
    ) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                [normalize_message(m) for m in messages],
                tools=tools or None,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final,
                **(kwargs or {}),
            )
        except Exception as e:  # jinja2 raises its own types, and templates call raise_exception()
            raise TemplateError(f"the chat template cannot render this conversation: {e}") from e

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render(self, messages: Sequence[dict[str, Any]], tools: list[dict] | None = None, **opts: Any) -> list[int]:
        return self.encode(self.text(messages, tools, **opts))

    def render_with_holes(
        self, messages: Sequence[dict[str, Any]], holes: Sequence[int], tools: list[dict] | None = None, **opts: Any
    ) -> list[list[int]]:
        """Render with messages[i] for i in `holes` replaced by a placeholder; return the token segments around
        them (len(holes) + 1 segments). A hole keeps only the role: its text and tool calls are in the ids that
        fill it."""
        for hole in self._holes:
            piece = self.tokenizer.convert_ids_to_tokens(hole)
            templated = [
                {"role": m.get("role", "assistant"), "content": piece} if i in holes else m
                for i, m in enumerate(messages)
            ]
            ids = self.render(templated, tools, **opts)
            if ids.count(hole) == len(holes):  # else the conversation itself holds that token: try the next
                segments, start = [], 0
                for i, token in enumerate(ids):
                    if token == hole:
                        segments.append(ids[start:i])
                        start = i + 1
                segments.append(ids[start:])
                return segments
        raise TemplateError("every placeholder token also occurs in the conversation; it cannot be rendered exactly")


def fill(segments: Sequence[list[int]], fills: Sequence[list[int]]) -> tuple[list[int], list[int]]:
    """Join `segments` with `fills` between them; returns the ids and where each fill starts.

    A fill that ends with the end-of-turn token the template writes right after the hole keeps its own: the sampled
    end of turn, not a second one.
    """
    ids = list(segments[0])
    starts = []
    for piece, segment in zip(fills, segments[1:], strict=True):
        starts.append(len(ids))
        ids += piece
        ids += segment[1:] if piece and segment and segment[0] == piece[-1] else segment
    return ids, starts
