"""From ART trajectories to supervised fine-tuning batches, as ART's `train_sft` makes them.

Each trajectory is its conversation rendered by the chat template; the tokens the template writes for each
assistant turn (its text, tool calls and end of turn, up to the next turn) are trained, the rest is context. The
trajectories are taken `batch_size` at a time in the order given, each batch one optimizer step at its own learning
rate (ART's `TrainSFTConfig`: one rate, or one per batch).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..chat import ChatTemplate
from ..errors import TrajectoryError
from .sequence import Sequence


@dataclass
class SFTBatch:
    sequences: list[Sequence]
    learning_rate: float


@dataclass
class SFTData:
    batches: list[SFTBatch]
    counts: Counter[str] = field(default_factory=Counter)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def sft_sequence(
    messages: list[dict[str, Any]], tools: Any, template: ChatTemplate, last_only: bool = False
) -> Sequence:
    """The rendered conversation with its assistant turns (or only the last one) marked trainable."""
    ids = template.render(messages, tools, add_generation_prompt=False)
    mask = [False] * len(ids)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    for i in turns[-1:] if last_only else turns:
        start = _common_prefix(template.render(messages[:i], tools, add_generation_prompt=True), ids)
        end = _common_prefix(template.render(messages[: i + 1], tools, add_generation_prompt=False), ids)
        mask[start:end] = [True] * max(end - start, 0)
    return Sequence(ids, [math.nan] * len(ids), mask, 1.0, 1.0, 0)


def prepare_sft(
    trajectories: list[Any],
    template: ChatTemplate,
    learning_rate: float | list[float],
    batch_size: int,
    max_length: int | None = None,
    last_only: bool = False,
) -> SFTData:
    """Batches of `batch_size` trajectories with their learning rates (ART's `assistant_turns="last"`: `last_only`).
    Trajectories longer than `max_length` are dropped and counted; one with no assistant turn is an error."""
    if not trajectories:
        raise TrajectoryError("train_sft() got no trajectories: pass at least one art.Trajectory with an answer.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise TrajectoryError(f"TrainSFTConfig.batch_size={batch_size!r} is invalid: an integer >= 1 or 'auto'")
    n_batches = math.ceil(len(trajectories) / batch_size)
    rates = learning_rate if isinstance(learning_rate, list) else [learning_rate] * n_batches
    if len(rates) < n_batches:
        raise TrajectoryError(
            f"TrainSFTConfig.learning_rate lists {len(rates)} rates for {n_batches} batches of {batch_size} "
            f"trajectories: give one rate per batch (or a single number)."
        )
    out = SFTData([])
    for b in range(n_batches):
        sequences = []
        for t, trajectory in enumerate(trajectories[b * batch_size : (b + 1) * batch_size], start=b * batch_size):
            sequence = sft_sequence(trajectory.messages(), trajectory.tools, template, last_only)
            out.counts["trajectories"] += 1
            if max_length is not None and len(sequence) > max_length:
                out.counts["trajectories_dropped_overlong"] += 1
                continue
            if not any(sequence.mask):
                raise TrajectoryError(
                    f"trajectory {t} has no assistant turn to learn from: SFT trains on the assistant messages of "
                    "each trajectory. Add the answer as {'role': 'assistant', 'content': ...}."
                )
            sequences.append(sequence)
            out.counts["tokens_trained"] += sum(sequence.mask)
        out.batches.append(SFTBatch(sequences, float(rates[b])))
    return out
