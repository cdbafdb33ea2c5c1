"""backend.train()'s options, checked before anything runs: what is taken, what has no effect (as in ART's
LocalBackend), and what is refused with the reason."""

from __future__ import annotations

import pytest

from art_sglang import ConfigError, SGLangBackend, TrainerConfig
from art_sglang.backend import _ART_DEFAULTS


@pytest.fixture
def backend(tmp_path) -> SGLangBackend:
    return SGLangBackend(path=tmp_path, trainer_config=TrainerConfig(max_sequence_length=4096))


def test_supported_options_reach_the_step(backend):
    options, prep, save = backend._train_options(
        {
            "learning_rate": 1e-4,
            "loss_fn": "ppo",
            "epsilon": 0.1,
            "normalize_advantages": False,
            "save_checkpoint": False,
        }
    )
    assert options.learning_rate == 1e-4 and options.loss.loss_fn == "ppo" and options.loss.epsilon == 0.1
    assert prep["scale_rewards"] is False and save is False
    options, _, _ = backend._train_options(
        {"mask_prob_ratio": True, "kimi_k2_tau": 0.1, "max_negative_advantage_importance_sampling_weight": 2.0}
    )  # their loss is checked against ART's in test_loss.py
    assert options.loss.mask_prob_ratio and options.loss.kimi_k2_tau == 0.1
    assert options.loss.max_negative_advantage_importance_sampling_weight == 2.0
    assert backend._train_options({"kl_penalty_source": "sample"})[0].loss.kl_penalty_source == "sample"
    assert backend._train_options({"advantage_balance": -0.5})[1]["advantage_balance"] == -0.5
    with pytest.raises(ConfigError, match="advantage_balance=2 is invalid: a number from -1 to 1"):
        backend._train_options({"advantage_balance": 2})
    with pytest.raises(ConfigError, match="kimi_k2_tau='x' is invalid"):
        backend._train_options({"kimi_k2_tau": "x"})
    options, _, _ = backend._train_options({"precalculate_logprobs": True, "truncated_importance_sampling": 2.0})
    assert options.precalculate_logprobs and options.loss.truncated_importance_sampling == 2.0
    with pytest.raises(ConfigError, match="truncated_importance_sampling=2.0 .*pass precalculate_logprobs=True"):
        backend._train_options({"truncated_importance_sampling": 2.0})


def test_packed_sequence_length_drops_longer_sequences_as_art(backend):
    _, prep, _ = backend._train_options({"packed_sequence_length": 2048})
    assert prep["max_length"] == 2048 and prep["overlong"] == "skip"
    _, prep, _ = backend._train_options({"packed_sequence_length": 8192})  # TrainerConfig's limit is lower
    assert prep["max_length"] == 4096
    with pytest.raises(ConfigError, match="packed_sequence_length=1 is invalid"):
        backend._train_options({"packed_sequence_length": 1})


@pytest.mark.parametrize(
    "key, value",
    [
        ("optimizer_save_interval", 1),  # ART's Megatron backend only
        ("final_training_step", 10),
        ("scale_learning_rate_by_reward_std_dev", True),  # read by nothing in ART
        ("logprob_calculation_chunk_size", 512),  # memory, not values
    ],
)
def test_options_without_effect_in_arts_localbackend_are_accepted(backend, key, value):
    backend._train_options({key: value})


@pytest.mark.parametrize(
    "key, value",
    [
        ("plot_tensors", True),
        ("kl_ref_adapter_path", "/checkpoints/0003"),
        ("grad_accumulation_sequences", 4),
        ("adam_params", {"betas": (0.9, 0.95)}),
    ],
)
def test_options_not_implemented_are_refused_unless_at_their_default(backend, key, value):
    with pytest.raises(ConfigError, match=rf"{key}=.* not supported by SGLangBackend yet: leave it at"):
        backend._train_options({key: value})
    backend._train_options({key: _ART_DEFAULTS[key]})  # ART's default is accepted


def test_an_unknown_option_names_the_supported_ones(backend):
    with pytest.raises(ConfigError, match="learning_rte=.*unknown train\\(\\) option; supported: .*learning_rate"):
        backend._train_options({"learning_rte": 1e-5})
