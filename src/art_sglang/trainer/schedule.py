"""ART's optimizer steps for one `train()` call, as its LocalBackend takes them (openpipe-art 0.5.23).

LocalBackend packs nothing: each sequence (a trajectory, or one of its histories) is its own row, and it trains
`grad_accumulation_sequences` rows (1 unless configured) per optimizer step, each row's loss a mean over its
trained tokens. Before that, over the whole call: each group's rows are shuffled (seeded by the group's index),
then all rows (seeded by their count); weights are scaled to a mean of 1 per trained token and advantages divided
by their weighted mean magnitude. The first call of a trainer process begins with one warm-up step at a learning
rate of 1e-9 on the first row's first 1024 tokens. So a learning rate tuned on ART means the same here.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from .sequence import Sequence

WARMUP_LEARNING_RATE = 1e-9
WARMUP_TOKENS = 1024


def art_rows(sequences: list[Sequence]) -> list[Sequence]:
    """The call's sequences in ART's order, with ART's batch-wide weights and advantages."""
    by_group: dict[int, list[Sequence]] = {}
    for s in sequences:
        by_group.setdefault(s.group, []).append(s)
    rows: list[Sequence] = []
    for group, members in by_group.items():
        random.Random(group).shuffle(members)
        rows += members
    random.Random(len(rows)).shuffle(rows)
    tokens = [sum(s.mask) for s in rows]
    total = sum(tokens)
    if not total:
        return rows
    weight_mean = sum(n * s.weight for n, s in zip(tokens, rows, strict=True)) / total
    weight_scale = 1 / weight_mean if weight_mean > 0 else 1.0
    advantage_mean = sum(n * abs(s.advantage) * s.weight * weight_scale for n, s in zip(tokens, rows, strict=True))
    advantage_mean /= total
    advantage_scale = 1 / advantage_mean if advantage_mean > 0 else 1.0
    return [replace(s, weight=s.weight * weight_scale, advantage=s.advantage * advantage_scale) for s in rows]


def optimizer_batches(rows: list[Sequence], grad_accumulation_sequences: int) -> list[list[Sequence]]:
    """The rows of each optimizer step."""
    return [rows[i : i + grad_accumulation_sequences] for i in range(0, len(rows), grad_accumulation_sequences)]


def warmup_row(row: Sequence) -> Sequence:
    n = WARMUP_TOKENS
    original = row.original_logprobs[:n] if row.original_logprobs is not None else None
    return replace(
        row, token_ids=row.token_ids[:n], logprobs=row.logprobs[:n], mask=row.mask[:n], original_logprobs=original
    )


def with_precalculated(rows: list[Sequence], logprobs: list[list[float]]) -> list[Sequence]:
    """ART's precalculate_logprobs: the policy's logprobs before the call's first step become each row's old ones
    (on its trained tokens, as `PolicyTrainer.sequence_logprobs` returns them); the sampler's become the original."""
    out = []
    for s, values in zip(rows, logprobs, strict=True):
        old = [math.nan] * len(s)
        for t, value in zip(s.trained_positions(), values, strict=True):
            old[t] = value
        out.append(replace(s, logprobs=old, original_logprobs=s.logprobs))
    return out
