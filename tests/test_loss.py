"""Our loss against ART's own implementation (`art.loss.loss_fn`), on random inputs."""

from __future__ import annotations

import pytest
import torch
from art_compat import art_loss

from art_sglang.trainer.loss import LossConfig, policy_loss


def shifted(t: torch.Tensor, pad) -> torch.Tensor:
    return torch.nn.functional.pad(t[:, 1:], (0, 1), value=pad)


def random_batch(seed: int, batch: int = 3, length: int = 40):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    group_ids = torch.zeros(batch, length, dtype=torch.long)
    advantages = torch.zeros(batch, length)
    weights = torch.zeros(batch, length)
    for b in range(batch):
        start = int(torch.randint(5, 15, (1,), generator=g))
        end = int(torch.randint(start + 5, length, (1,), generator=g))
        mask[b, start:end] = True
        group_ids[b, :end] = b + 1
        advantages[b, :end] = torch.randn(1, generator=g).item()
        weights[b, :end] = 1.0 / (end - start)
    logprobs = torch.where(mask, -torch.rand(batch, length, generator=g) * 3, torch.nan)
    logprobs[0, 7] = torch.nan if mask[0, 7] else logprobs[0, 7]  # an unknown sampler logprob inside a turn
    new = (shifted(logprobs, 0.0).nan_to_num(-1.0) + torch.randn(batch, length, generator=g) * 0.3).clamp(max=-1e-3)
    ref = new.detach() + torch.randn(batch, length, generator=g) * 0.2
    inputs = {
        "tokens": torch.randint(0, 100, (batch, length), generator=g),
        "logprobs": logprobs,
        "advantages": advantages,
        "assistant_mask": mask,
        "weights": weights,
        "group_ids": group_ids,
    }
    return inputs, new, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "config",
    [
        LossConfig(),
        LossConfig(loss_fn="ppo"),
        LossConfig(loss_fn="ppo", epsilon=0.1, epsilon_high=0.3),
        LossConfig(epsilon=0.5, epsilon_high=2.0),
        LossConfig(importance_sampling_level="sequence"),
        LossConfig(loss_fn="ppo", importance_sampling_level="sequence"),
        LossConfig(kl_penalty_coef=0.2),
        LossConfig(loss_fn="ppo", kl_penalty_coef=0.5),
        LossConfig(importance_sampling_level="average"),
        LossConfig(loss_fn="ppo", importance_sampling_level="geometric_average"),
        LossConfig(max_negative_advantage_importance_sampling_weight=1.1),
        LossConfig(loss_fn="ppo", max_negative_advantage_importance_sampling_weight=0.9),
        LossConfig(mask_prob_ratio=True, epsilon=0.3, epsilon_high=0.3),
        LossConfig(loss_fn="ppo", mask_prob_ratio=True),
        LossConfig(kimi_k2_tau=0.5),
        LossConfig(loss_fn="ppo", kimi_k2_tau=0.1, kl_penalty_coef=0.2, importance_sampling_level="sequence"),
    ],
    ids=[
        "cispo",
        "ppo",
        "ppo-eps",
        "cispo-eps",
        "cispo-seq",
        "ppo-seq",
        "cispo-kl",
        "ppo-kl",
        "cispo-avg",
        "ppo-geo",
        "cispo-maxw",
        "ppo-maxw",
        "cispo-mask",
        "ppo-mask",
        "cispo-tau",
        "ppo-tau-kl-seq",
    ],  # fmt: skip
)
def test_loss_and_gradient_match_art(seed, config):
    inputs, new, ref = random_batch(seed)
    art_config = {
        "ppo": config.loss_fn == "ppo",
        "importance_sampling_level": config.importance_sampling_level,
        "kl_penalty_coef": config.kl_penalty_coef,
        "max_negative_advantage_importance_sampling_weight": config.max_negative_advantage_importance_sampling_weight,
        "mask_prob_ratio": config.mask_prob_ratio,
        "kimi_k2_tau": config.kimi_k2_tau,
    }
    if config.epsilon is not None:
        art_config["epsilon"] = config.epsilon
    if config.epsilon_high is not None:
        art_config["epsilon_high"] = config.epsilon_high

    assert_matches_art(inputs, new, config, art_config, ref=ref)


def assert_matches_art(inputs, new, config: LossConfig, art_config: dict, ref=None, original=None) -> None:
    """ART's LocalBackend calls `art.loss.loss_fn` on one row (one sequence) at a time and takes its token mean.
    Ours, on the whole batch at once with each row's weights over its trained tokens, must equal the sum of those
    per-row losses, and so must the gradients, to 1e-6."""
    new_art = new.clone().requires_grad_()
    expected = 0.0
    for b in range(new.shape[0]):
        row = {k: v[b : b + 1] for k, v in inputs.items()}
        expected = (
            expected
            + art_loss(row, new_art[b : b + 1], ref[b : b + 1] if ref is not None else None, art_config).policy_loss
        )
    expected.backward()
    new_ours = new.clone().requires_grad_()
    mask = shifted(inputs["assistant_mask"], False)
    tokens = mask.sum(dim=1, keepdim=True)
    terms = policy_loss(
        new_ours,
        shifted(inputs["logprobs"], float("nan")),
        shifted(inputs["advantages"], 0.0),
        shifted(inputs["weights"], 0.0) / tokens,
        mask,
        shifted(inputs["group_ids"], 0),
        config,
        ref_logprobs=ref,
        original_logprobs=None if original is None else shifted(original, 0.0),
    )
    ours = terms.policy_loss_sum
    ours.backward()
    assert ours.item() != 0.0
    assert abs(ours.item() - expected.item()) < 1e-6
    assert torch.allclose(new_ours.grad, new_art.grad, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("loss_fn", ["cispo", "ppo"])
def test_truncated_importance_sampling_matches_art(seed, loss_fn):
    """With precalculated logprobs (the trainer's, before the step) and the sampler's as the original ones."""
    inputs, new, ref = random_batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    original = inputs["logprobs"] + torch.randn(inputs["logprobs"].shape, generator=g) * 0.5
    original[1, 12] = torch.nan  # an unknown sampler logprob
    inputs = {**inputs, "original_logprobs": original}
    config = LossConfig(loss_fn=loss_fn, truncated_importance_sampling=1.5)
    art_config = {"ppo": loss_fn == "ppo", "truncated_importance_sampling": 1.5}
    assert_matches_art(inputs, new, config, art_config, original=original)
    mask = shifted(inputs["assistant_mask"], False)
    with pytest.raises(ValueError, match="precalculate_logprobs=True"):
        policy_loss(new, new, new, new, mask, shifted(inputs["group_ids"], 0), config)


@pytest.mark.parametrize("loss_fn", ["cispo", "ppo"])
def test_kl_penalty_from_the_samples_shapes_advantages_with_the_sampler_logprobs(loss_fn):
    """ART 0.5.23's kl_penalty_source="sample" (written out from its code, as the shaping it describes):
    advantages + coef * (the row's mean KL - KL per token), the KL of the sampler's logprobs against the reference."""
    inputs, new, ref = random_batch(3)
    mask = shifted(inputs["assistant_mask"], False)
    old = shifted(inputs["logprobs"], float("nan"))
    adv, weights, seq_ids = (shifted(inputs[k], 0) for k in ("advantages", "weights", "group_ids"))
    filled = torch.where(torch.isnan(old), new, old)
    kl_per_token = (filled - ref) * mask
    row_mean = kl_per_token.sum(dim=1, keepdim=True) / (mask.sum(dim=1, keepdim=True) + 1e-6)  # ART: per row
    shaped = adv + 0.3 * (row_mean - kl_per_token) * mask
    sample = LossConfig(loss_fn=loss_fn, kl_penalty_coef=0.3, kl_penalty_source="sample")
    ours = policy_loss(new, old, adv, weights, mask, seq_ids, sample, ref_logprobs=ref).policy_loss_sum
    expected = policy_loss(new, old, shaped, weights, mask, seq_ids, LossConfig(loss_fn=loss_fn)).policy_loss_sum
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    learner = LossConfig(loss_fn=loss_fn, kl_penalty_coef=0.3)
    assert policy_loss(new, old, adv, weights, mask, seq_ids, learner, ref).policy_loss_sum.item() != pytest.approx(
        ours.item(), rel=1e-3
    )


def test_invalid_loss_options_are_named():
    with pytest.raises(ValueError, match="loss_fn='grpo'"):
        LossConfig(loss_fn="grpo")
    with pytest.raises(ValueError, match="importance_sampling_level='mean'"):
        LossConfig(importance_sampling_level="mean")
    with pytest.raises(ValueError, match="kl_penalty_source='teacher'"):
        LossConfig(kl_penalty_source="teacher")
    with pytest.raises(ValueError, match="kimi_k2_tau='0.1'"):
        LossConfig(kimi_k2_tau="0.1")
