"""ART's RL losses ("cispo" and "ppo") with ART's option names and semantics, on target-aligned tensors.

All tensors are [batch, tokens] and aligned to the token being predicted: `new_logprobs[b, t]` is the trainer's
log-probability of target token t, `old_logprobs[b, t]` the sampler's (nan where unknown: treated as sampled
by the current policy). tests/test_loss.py checks this against `art.loss.loss_fn` to 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "average", "geometric_average")
LOG_RATIO_BOUND = 20.0  # ART 0.5.23 clamps log-ratios here before exp (fp32)


@dataclass
class LossConfig:
    loss_fn: Literal["cispo", "ppo"] = "cispo"
    epsilon: float | None = None  # None: 0.2 for ppo, 1.0 for cispo
    epsilon_high: float | None = None  # None: epsilon for ppo, 4.0 for cispo
    importance_sampling_level: Literal["token", "sequence", "average", "geometric_average"] = "token"
    kl_penalty_coef: float = 0.0
    kl_penalty_source: Literal["current_learner", "sample"] = "current_learner"  # whose logprobs the KL is of
    max_negative_advantage_importance_sampling_weight: float | None = None  # as ART: caps every token's ratio
    mask_prob_ratio: bool = False  # ratios outside the clip range count as 0
    kimi_k2_tau: float | None = None  # advantages minus tau * (new - old logprob)
    truncated_importance_sampling: float | None = None  # loss * min(p_old / p_sampler, U): needs original logprobs

    def __post_init__(self) -> None:
        if self.loss_fn not in ("cispo", "ppo"):
            raise ValueError(f"loss_fn={self.loss_fn!r} is invalid: 'cispo' or 'ppo'")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r} is invalid: one of "
                f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
            )
        if self.kl_penalty_source not in ("current_learner", "sample"):
            raise ValueError(f"kl_penalty_source={self.kl_penalty_source!r} is invalid: 'current_learner' or 'sample'")
        for name in (
            "max_negative_advantage_importance_sampling_weight",
            "kimi_k2_tau",
            "truncated_importance_sampling",
        ):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool)):
                raise ValueError(f"{name}={value!r} is invalid: None or a number")

    def clip_range(self) -> tuple[float, float]:
        if self.loss_fn == "ppo":
            eps = 0.2 if self.epsilon is None else self.epsilon
            high = eps if self.epsilon_high is None else self.epsilon_high
        else:
            eps = 1.0 if self.epsilon is None else self.epsilon
            high = 4.0 if self.epsilon_high is None else self.epsilon_high
        return 1 - eps, 1 + high


@dataclass
class LossTerms:
    policy_loss_sum: torch.Tensor  # sum over tokens of loss * weight * mask
    kl_policy_ref: torch.Tensor | None  # mean KL per token of the policy (or sampler) from the reference


def sequence_mean(values: torch.Tensor, seq_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each masked token gets the mean of `values` over the masked tokens of its sequence."""
    ids = torch.where(mask > 0, seq_ids, 0).long()
    size = int(ids.max().item()) + 1
    sums = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, ids.flatten(), values.flatten())
    counts = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(
        0, ids.flatten(), torch.ones_like(values).flatten()
    )
    return (sums / counts.clamp(min=1))[ids]


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    seq_ids: torch.Tensor,
    config: LossConfig,
    ref_logprobs: torch.Tensor | None = None,
    original_logprobs: torch.Tensor | None = None,
) -> LossTerms:
    """`seq_ids` numbers the sequences from 1 (0 = padding); it matters for sequence-level importance sampling and
    the KL penalty, which ART computes per sequence. For ART's loss of a sequence (a token mean), scale its weights
    by 1 / its trained tokens.
    `original_logprobs`: the sampler's, where `old_logprobs` were computed by the trainer before the step (ART's
    precalculate_logprobs); truncated importance sampling corrects between the two."""
    mask = mask.to(new_logprobs.dtype)
    old = torch.where(torch.isfinite(old_logprobs), old_logprobs, new_logprobs.detach())
    diff = new_logprobs - old
    ratio = torch.exp(diff.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    level = config.importance_sampling_level
    if level != "token":
        sequence_ratio = torch.exp(sequence_mean(diff, seq_ids, mask).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        if level == "sequence":
            ratio = sequence_ratio
        elif level == "average":
            ratio = (ratio + sequence_ratio) / 2
        else:  # geometric_average
            ratio = ratio**0.5 * sequence_ratio**0.5
    low, high = config.clip_range()
    # In ART's order, and as ART tests them (a 0 turns an option off).
    if config.max_negative_advantage_importance_sampling_weight:
        ratio = torch.clamp(ratio, max=config.max_negative_advantage_importance_sampling_weight)
    if config.mask_prob_ratio:
        ratio = torch.where((ratio > low) & (ratio < high), ratio, 0.0)
    if config.kimi_k2_tau:
        advantages = advantages - config.kimi_k2_tau * diff.detach()
    kl = None
    if config.kl_penalty_coef > 0 and ref_logprobs is not None:
        # ART's KL shaping: tokens that drift further from the reference than average lose advantage.
        source = old if config.kl_penalty_source == "sample" else new_logprobs
        kl_per_token = (source - ref_logprobs).detach() * mask
        # ART takes the mean per packed row, and a row holds one sequence (LocalBackend packs nothing).
        kl_mean = sequence_mean(kl_per_token, seq_ids, mask)
        advantages = advantages + config.kl_penalty_coef * (kl_mean - kl_per_token) * mask
        kl = kl_per_token.sum() / (mask.sum() + 1e-6)
    if config.loss_fn == "ppo":
        loss = -torch.min(ratio * advantages, torch.clip(ratio, low, high) * advantages)
    else:  # CISPO: clipped, detached importance weight times the REINFORCE term
        loss = -(torch.clip(ratio.detach(), low, high) * advantages * new_logprobs)
    if config.truncated_importance_sampling:
        if original_logprobs is None:
            raise ValueError("truncated_importance_sampling needs the sampler's logprobs (precalculate_logprobs=True)")
        original = torch.where(torch.isnan(original_logprobs), new_logprobs.detach(), original_logprobs)
        loss = loss * torch.clamp(torch.exp(old - original), max=config.truncated_importance_sampling).detach()
    return LossTerms((loss * weights * mask).sum(), kl)
