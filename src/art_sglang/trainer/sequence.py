"""The unit of training data, shared by the user's process and the trainer workers.

Kept apart from data.py because `import art` patches transformers (for the version ART pins), which breaks
model forward passes on ours: trainer workers must never import art.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sequence:
    """One training sequence. `logprobs[i]` is the sampler's logprob of `token_ids[i]` (nan where not sampled)."""

    token_ids: list[int]
    logprobs: list[float]
    mask: list[bool]  # True on sampled (trainable) tokens
    advantage: float
    weight: float  # ART: 1 / (trainable tokens of the trajectory); rescaled over the batch before training
    group: int  # index of the trajectory group it came from
    # The sampler's logprobs where `logprobs` were precalculated by the trainer (ART's precalculate_logprobs).
    original_logprobs: list[float] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def trained_positions(self) -> list[int]:
        """The positions of the trained tokens, in order: what `PolicyTrainer.sequence_logprobs` scores (the first
        token is never predicted)."""
        return [t for t in range(1, len(self.token_ids)) if self.mask[t]]
