"""From ART trajectory groups to training sequences: the tokens the engine was given and the ones it sampled.

A Choice from our gateway (or from vLLM with `return_token_ids`) carries the engine's prompt ids and sampled ids.
With those, a history is assembled as ART does: each trained Choice's prompt, then its sampled ids; a Choice whose
prompt extends the sequence so far continues it, any other starts a new sequence. So every trained token is
trained in exactly the context the engine sampled it in, whatever the chat template does to history.

A history with a trained Choice without them (built elsewhere, or edited) gets its context from the chat template:
the conversation rendered once, each trained turn a placeholder filled with its sampled ids (never re-tokenized
text). Counted each step: such Choices (`choices_without_engine_ids`), the turns trained in the template's context
(`contexts_from_template`), and the context tokens where that differs from a prompt the engine was given
(`context_mismatch_tokens`). Additional histories are trained like the main one. Advantages follow ART: reward
minus group mean, divided by the group's std (+1e-6) when `scale_rewards`; rewards equal within 1e-6 teach nothing.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from art import Trajectory, TrajectoryGroup
from openai.types.chat.chat_completion import Choice

from ..chat import ChatTemplate, fill, token_id_from_bytes
from ..errors import TrajectoryError
from .sequence import Sequence

log = logging.getLogger(__name__)


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


REWARD_TOLERANCE = 1e-6  # rewards this close count as equal: such a group teaches nothing


def advantages(rewards: list[float], scale_rewards: bool) -> list[float]:
    """ART's GRPO advantages; all zero when the rewards are equal within REWARD_TOLERANCE."""
    if max(rewards) - min(rewards) <= REWARD_TOLERANCE:
        return [0.0] * len(rewards)
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + 1e-6) if scale_rewards else r - mean for r in rewards]


def balance(advantages: list[float], advantage_balance: float) -> list[float]:
    """ART's advantage_balance: b > 0 scales negative advantages by 1 - b, b < 0 positive ones by 1 + b."""
    if advantage_balance > 0:
        return [a if a > 0 else a * (1 - advantage_balance) for a in advantages]
    if advantage_balance < 0:
        return [a if a < 0 else a * (1 + advantage_balance) for a in advantages]
    return advantages


def sampled_token_ids(choice: Choice, tokenizer: Any) -> list[int]:
    """The exact ids of a Choice's sampled tokens: `token_id:N` entries (our gateway and vLLM give these),
    else the token's raw bytes mapped through a byte-level BPE vocabulary. Never re-tokenizes the text."""
    entries = choice.logprobs.content or []
    if all(e.token.startswith("token_id:") for e in entries):
        return [int(e.token.split(":", 1)[1]) for e in entries]
    ids = []
    for e in entries:
        token_id = token_id_from_bytes(tokenizer, e.bytes)
        if token_id is None:
            raise TrajectoryError(
                f"cannot recover the exact token id of sampled token {e.token!r}; re-tokenizing text is not exact "
                "for byte-level BPE. Sample through the backend's endpoint (model.openai_client()), which returns "
                "token ids, or pass allow_training_without_logprobs=True to train on re-tokenized text."
            )
        ids.append(token_id)
    return ids


def engine_ids(choice: Choice) -> tuple[list[int], list[int]] | None:
    """The prompt ids the engine was given and the ids it sampled, when the Choice carries them (our gateway
    and vLLM's `return_token_ids` put `prompt_token_ids` and `token_ids` on it)."""
    extra = choice.model_extra or {}
    prompt, sampled = extra.get("prompt_token_ids"), extra.get("token_ids")
    if isinstance(prompt, list) and isinstance(sampled, list) and prompt and sampled:
        return [int(i) for i in prompt], [int(i) for i in sampled]
    return None


@dataclass
class Piece:
    """One training sequence of a history, and the engine prompts its trained Choices were sampled from."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    # Where a trained Choice that carries the engine's prompt starts, and that prompt: set only where the context
    # is the template's (an exact piece's context is the engine's prompt by construction).
    prompts: list[tuple[int, list[int]]] = field(default_factory=list)

    def add(self, ids: list[int], logprobs: list[float] | None = None) -> None:
        self.token_ids += ids
        self.logprobs += logprobs if logprobs is not None else [math.nan] * len(ids)
        self.mask += [logprobs is not None] * len(ids)

    def context_mismatch(self) -> int:
        """Context tokens that differ from the prompt the engine was given (positions compared, plus the length
        difference), over the trained Choices whose context came from the template though the engine's was known."""
        wrong = 0
        for start, prompt in self.prompts:
            context = self.token_ids[:start]
            wrong += sum(a != b for a, b in zip(context, prompt, strict=False)) + abs(len(context) - len(prompt))
        return wrong


def _choice_logprobs(item: Any, n: int, label: str) -> list[float]:
    if isinstance(item, Choice) and item.logprobs is not None and item.logprobs.content:
        lps = [e.logprob for e in item.logprobs.content]
        if len(lps) != n:
            raise TrajectoryError(
                f"{label} has a Choice with {n} sampled token ids but {len(lps)} logprobs; pass the Choice as the "
                "client returned it, unchanged."
            )
        return lps
    return [math.nan] * n  # allow_training_without_logprobs: the trainer takes them as on-policy


def _exact_pieces(items: list[Any], trainable: list[int], label: str) -> list[Piece]:
    """ART's assembly of engine token ids: each Choice's prompt, then its sampled ids; a Choice whose prompt
    extends the sequence so far continues it, any other starts a new sequence. Nothing is re-rendered."""
    pieces: list[Piece] = []
    for i in trainable:
        prompt, sampled = engine_ids(items[i])
        piece = pieces[-1] if pieces else None
        if piece is not None and prompt[: len(piece.token_ids)] == piece.token_ids:
            piece.add(prompt[len(piece.token_ids) :])
        else:
            piece = Piece()
            pieces.append(piece)
            piece.add(prompt)
        piece.add(sampled, _choice_logprobs(items[i], len(sampled), label))
    return pieces


def _template_piece(
    items: list[Any], trainable: list[int], tools: Any, template: ChatTemplate, tokenizer: Any, label: str
) -> Piece:
    """The conversation rendered once with the chat template, each trained turn filled with its sampled ids
    (re-tokenized text only under allow_training_without_logprobs)."""
    messages = Trajectory(messages_and_choices=items).messages()
    segments = template.render_with_holes(messages, trainable, tools, add_generation_prompt=False, continue_final=True)
    fills, logprobs = [], []
    for i in trainable:
        item = items[i]
        if isinstance(item, Choice) and item.logprobs is not None and item.logprobs.content:
            ids = sampled_token_ids(item, tokenizer)
        elif isinstance(item, Choice) and (exact := engine_ids(item)) is not None:
            ids = exact[1]
        else:
            text = item.message.content if isinstance(item, Choice) else item.get("content")
            ids = tokenizer.encode(text or "", add_special_tokens=False)
        fills.append(ids)
        logprobs.append(_choice_logprobs(item, len(ids), label))
    token_ids, starts = fill(segments, fills)
    piece = Piece(token_ids, [math.nan] * len(token_ids), [False] * len(token_ids))
    for i, start, ids, lps in zip(trainable, starts, fills, logprobs, strict=True):
        piece.logprobs[start : start + len(ids)] = lps
        piece.mask[start : start + len(ids)] = [True] * len(ids)
        if isinstance(items[i], Choice) and (exact := engine_ids(items[i])) is not None:
            piece.prompts.append((start, exact[0]))  # the engine's context, to count how far the template's is off
    return piece


def tokenize_history(
    items: list[Any], tools: Any, template: ChatTemplate, *, allow_without_logprobs: bool, label: str
) -> tuple[list[Piece], Counter[str]]:
    """The training sequences of one history, and counts of what was not exact: trained Choices without the
    engine's ids, and trained turns whose context came from the chat template (none when the engine's own ids were
    there for every one)."""
    tokenizer = template.tokenizer
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
    counts: Counter[str] = Counter()
    if not trainable:
        return [], counts
    items = items[: trainable[-1] + 1]
    without = [i for i in trainable if not (isinstance(items[i], Choice) and engine_ids(items[i]) is not None)]
    if not without:
        return _exact_pieces(items, trainable, label), counts
    counts["choices_without_engine_ids"] += sum(isinstance(items[i], Choice) for i in without)
    counts["contexts_from_template"] += len(trainable)
    return [_template_piece(items, trainable, tools, template, tokenizer, label)], counts


def tokenize_trajectory(
    trajectory: Trajectory, template: ChatTemplate, *, allow_without_logprobs: bool, label: str
) -> tuple[list[Piece], Counter[str]]:
    """Sequences of a trajectory and of its additional histories (trained like it, as ART does)."""
    counts: Counter[str] = Counter()
    histories = [(list(trajectory.messages_and_choices), trajectory.tools)]
    histories += [(list(h.messages_and_choices), h.tools) for h in trajectory.additional_histories]
    counts["additional_histories"] += len(histories) - 1
    pieces: list[Piece] = []
    for h, (items, tools) in enumerate(histories):
        where = label if h == 0 else f"additional history {h - 1} of {label}"
        found, inexact = tokenize_history(
            items, tools, template, allow_without_logprobs=allow_without_logprobs, label=where
        )
        counts.update(inexact)
        counts["histories_split"] += len(found) > 1
        pieces += found
    return pieces, counts


def prepare(
    groups: list[TrajectoryGroup],
    template: ChatTemplate,
    *,
    scale_rewards: bool = True,
    allow_training_without_logprobs: bool = False,
    max_length: int | None = None,
    overlong: Literal["skip", "truncate"] = "skip",
    advantage_balance: float = 0.0,
) -> Prepared:
    """Validate and tokenize; zero-variance groups and overlong sequences are skipped (or truncated) and counted."""
    check_rewards(groups)
    out = Prepared([])
    for key in ("context_mismatch_tokens", "contexts_from_template", "choices_without_engine_ids"):
        out.counts[key] = 0  # reported every step: 0 is the news
    for g, group in enumerate(groups):
        trajectories = list(group.trajectories)
        out.counts["groups"] += 1
        out.counts["trajectories"] += len(trajectories)
        if len(trajectories) < 2:
            out.counts["groups_skipped_single_trajectory"] += 1
            out.counts["trajectories_skipped_single_trajectory"] += len(trajectories)
            continue
        advs = balance(advantages([t.reward for t in trajectories], scale_rewards), advantage_balance)
        if not any(advs):
            out.counts["groups_skipped_zero_variance"] += 1
            out.counts["trajectories_skipped_zero_variance"] += len(trajectories)
            continue
        for t, (trajectory, adv) in enumerate(zip(trajectories, advs, strict=True)):
            if adv == 0:
                out.counts["trajectories_skipped_zero_advantage"] += 1
                continue
            pieces, counts = tokenize_trajectory(
                trajectory, template, allow_without_logprobs=allow_training_without_logprobs, label=_label(g, t)
            )
            out.counts.update(counts)
            kept = []
            for piece in pieces:
                out.counts["context_mismatch_tokens"] += piece.context_mismatch()
                if max_length is not None and len(piece.token_ids) > max_length:
                    if overlong == "skip" or not any(piece.mask[:max_length]):
                        out.counts["sequences_skipped_overlong"] += 1
                        continue
                    piece = Piece(piece.token_ids[:max_length], piece.logprobs[:max_length], piece.mask[:max_length])
                    out.counts["sequences_truncated"] += 1
                kept.append(piece)
            if not kept:
                out.counts["trajectories_skipped_untrainable"] += 1
                continue
            # ART's weight: one over the trajectory's trained tokens, over all of its sequences.
            n = sum(sum(p.mask) for p in kept)
            for piece in kept:
                out.sequences.append(Sequence(piece.token_ids, piece.logprobs, piece.mask, adv, 1.0 / (n + 1e-6), g))
            out.counts["trajectories_used"] += 1
            out.counts["sequences"] += len(kept)
            out.counts["tokens_trained"] += n
    return out
