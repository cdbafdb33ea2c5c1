"""From ART trajectory groups to training sequences, built from the exact tokens the engine sampled.

The conversation is rendered once with the model's chat template, each trainable Choice replaced by a single
placeholder token; each placeholder is then replaced by the Choice's sampled token ids (never re-tokenized
text) with the engine's logprobs, and only those tokens are marked trainable. Advantages follow ART:
reward minus group mean, divided by the group's std (+1e-6) when `scale_rewards`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from art import Trajectory, TrajectoryGroup
from openai.types.chat.chat_completion import Choice

from ..errors import ArtSGLangError
from .sequence import Sequence

log = logging.getLogger(__name__)


class TrajectoryError(ArtSGLangError, ValueError):
    """A trajectory cannot be trained on as given; the message names it and the fix."""


@dataclass
class Prepared:
    sequences: list[Sequence]
    counts: Counter[str] = field(default_factory=Counter)


def _label(g: int, t: int) -> str:
    return f"trajectory {t} of group {g}"


def check_rewards(groups: list[TrajectoryGroup]) -> None:
    if not groups:
        raise TrajectoryError(
            "train() got no trajectory groups. Gather at least one group of 2+ scored trajectories "
            "(art.gather_trajectory_groups) before training."
        )
    sizes = [len(group.trajectories) for group in groups]
    if max(sizes) < 2:
        raise TrajectoryError(
            f"every one of the {len(groups)} trajectory group(s) holds {max(sizes)} trajectory: GRPO scores a "
            "trajectory against the others of its group, so a group of one teaches nothing. Put 2+ trajectories "
            "(samples of the same prompt) in each art.TrajectoryGroup."
        )
    if single := [g for g, n in enumerate(sizes) if n < 2]:
        log.warning(
            "groups %s hold fewer than 2 trajectories and are skipped (a group of one has no baseline); "
            "put 2+ samples of the same prompt in each group",
            single[:10],
        )
    for g, group in enumerate(groups):
        for t, trajectory in enumerate(group.trajectories):
            if not math.isfinite(trajectory.reward):
                raise TrajectoryError(
                    f"{_label(g, t)} has reward {trajectory.reward}: rewards must be finite numbers. "
                    "Fix the reward function (or drop that trajectory) before training."
                )


def advantages(rewards: list[float], scale_rewards: bool) -> list[float]:
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + 1e-6) if scale_rewards else r - mean for r in rewards]


def sampled_token_ids(choice: Choice, tokenizer: Any) -> list[int]:
    """The exact ids of a Choice's sampled tokens: `token_id:N` entries (our gateway and vLLM give these),
    else the token's raw bytes mapped through a byte-level BPE vocabulary. Never re-tokenizes the text."""
    entries = choice.logprobs.content or []
    if all(e.token.startswith("token_id:") for e in entries):
        return [int(e.token.split(":", 1)[1]) for e in entries]
    byte_map = _BYTE_TO_UNICODE
    ids = []
    for e in entries:
        token_id = None
        if e.bytes is not None:
            token_id = tokenizer.convert_tokens_to_ids("".join(byte_map[b] for b in e.bytes))
            if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) is None:
                token_id = None
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise TrajectoryError(
                f"cannot recover the exact token id of sampled token {e.token!r}; re-tokenizing text is not exact "
                "for byte-level BPE. Sample through the backend's endpoint (model.openai_client()), which returns "
                "token ids, or pass allow_training_without_logprobs=True to train on re-tokenized text."
            )
        ids.append(token_id)
    return ids


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


def _placeholder(tokenizer: Any, avoid: set[int]) -> int:
    """An added single-token string that appears nowhere in the rendered conversation."""
    reserved = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    for token_id in sorted(tokenizer.added_tokens_decoder, reverse=True):
        if token_id not in avoid and token_id not in reserved:
            return token_id
    raise TrajectoryError("the tokenizer has no spare added token to render trajectories with")


def _render(tokenizer: Any, messages: list[dict], tools: Any, continue_final: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=True,
        return_dict=False,
        continue_final_message=continue_final,
        add_generation_prompt=False,
    )
    return list(ids)


def tokenize_trajectory(
    trajectory: Trajectory, tokenizer: Any, *, allow_without_logprobs: bool, label: str
) -> tuple[list[int], list[float], list[bool]] | None:
    """Token ids, sampler logprobs and trainable mask of one trajectory, up to its last trainable turn."""
    items = list(trajectory.messages_and_choices)
    choices = [i for i, m in enumerate(items) if isinstance(m, Choice)]
    dict_assistant = [i for i, m in enumerate(items) if isinstance(m, dict) and m.get("role") == "assistant"]
    with_logprobs = [i for i in choices if items[i].logprobs is not None and items[i].logprobs.content]
    if allow_without_logprobs:
        trainable = sorted(set(choices) | set(dict_assistant))
    else:
        if not choices and dict_assistant:
            raise TrajectoryError(
                f"{label} has assistant turns only as plain dicts, so nothing in it can be trained (its assistant "
                "mask would be all zeros, ART #127). Append the Choice the client returned "
                "(`completion.choices[0]`) to messages_and_choices instead of a dict, or pass "
                "allow_training_without_logprobs=True to train on re-tokenized text."
            )
        if choices and not with_logprobs:
            raise TrajectoryError(
                f"{label} has {len(choices)} Choice(s) but none carries logprobs, and trainable turns need the "
                "sampler's logprobs. Request them with logprobs=True (the backend's endpoint, "
                "model.openai_client(), always returns them), or pass allow_training_without_logprobs=True."
            )
        trainable = with_logprobs
    if not trainable:
        return None
    last = trainable[-1]
    items = items[: last + 1]
    messages = Trajectory(messages_and_choices=items).messages()
    tools = trajectory.tools

    original = _render(tokenizer, messages, tools, continue_final=True)
    hole = _placeholder(tokenizer, set(original))
    hole_text = tokenizer.convert_ids_to_tokens(hole)
    templated = [
        {"role": "assistant", "content": hole_text, **({"tool_calls": m["tool_calls"]} if m.get("tool_calls") else {})}
        if i in trainable
        else m
        for i, m in enumerate(messages)
    ]
    token_ids = _render(tokenizer, templated, tools, continue_final=True)
    logprobs = [math.nan] * len(token_ids)
    mask = [False] * len(token_ids)
    for i in trainable:
        start = token_ids.index(hole)
        item = items[i]
        if isinstance(item, Choice) and item.logprobs is not None and item.logprobs.content:
            ids = sampled_token_ids(item, tokenizer)
            lps = [e.logprob for e in item.logprobs.content]
        else:  # allow_training_without_logprobs: re-tokenized text, logprobs unknown
            text = item.message.content if isinstance(item, Choice) else item.get("content")
            ids = tokenizer.encode(text or "", add_special_tokens=False)
            lps = [math.nan] * len(ids)
        after = token_ids[start + 1] if start + 1 < len(token_ids) else None
        token_ids[start : start + 1] = ids
        logprobs[start : start + 1] = lps
        mask[start : start + 1] = [True] * len(ids)
        # The sampled end-of-turn token and the template's own must not both appear.
        end = start + len(ids)
        if ids and after is not None and ids[-1] == after:
            del token_ids[end], logprobs[end], mask[end]
    return token_ids, logprobs, mask


def prepare(
    groups: list[TrajectoryGroup],
    tokenizer: Any,
    *,
    scale_rewards: bool = True,
    allow_training_without_logprobs: bool = False,
    max_length: int | None = None,
    overlong: Literal["skip", "truncate"] = "skip",
) -> Prepared:
    """Validate and tokenize; zero-variance groups and overlong sequences are skipped (or truncated) and counted."""
    check_rewards(groups)
    out = Prepared([])
    for g, group in enumerate(groups):
        trajectories = list(group.trajectories)
        out.counts["groups"] += 1
        out.counts["trajectories"] += len(trajectories)
        if len(trajectories) < 2:
            out.counts["groups_skipped_single_trajectory"] += 1
            out.counts["trajectories_skipped_single_trajectory"] += len(trajectories)
            continue
        advs = advantages([t.reward for t in trajectories], scale_rewards)
        if not any(advs):
            out.counts["groups_skipped_zero_variance"] += 1
            out.counts["trajectories_skipped_zero_variance"] += len(trajectories)
            continue
        for t, (trajectory, adv) in enumerate(zip(trajectories, advs, strict=True)):
            if adv == 0:
                out.counts["trajectories_skipped_zero_advantage"] += 1
                continue
            result = tokenize_trajectory(
                trajectory, tokenizer, allow_without_logprobs=allow_training_without_logprobs, label=_label(g, t)
            )
            if result is None:
                out.counts["trajectories_skipped_untrainable"] += 1
                continue
            ids, lps, mask = result
            if max_length is not None and len(ids) > max_length:
                if overlong == "skip":
                    out.counts["trajectories_skipped_overlong"] += 1
                    continue
                ids, lps, mask = ids[:max_length], lps[:max_length], mask[:max_length]
                out.counts["trajectories_truncated"] += 1
                if not any(mask):
                    out.counts["trajectories_skipped_overlong"] += 1
                    continue
            n = sum(mask)
            out.sequences.append(Sequence(ids, lps, mask, adv, 1.0 / (n + 1e-6), g))
            out.counts["trajectories_used"] += 1
            out.counts["tokens_trained"] += n
    return out
