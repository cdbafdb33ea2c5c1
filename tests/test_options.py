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
    call = backend._train_options(
        {
            "learning_rate": 1e-4,
            "loss_fn": "ppo",
            "epsilon": 0.1,
            "normalize_advantages": False,
            "save_checkpoint": False,
        }
    )
    options = call.options
    assert options.learning_rate == 1e-4 and options.loss.loss_fn == "ppo" and options.loss.epsilon == 0.1
    assert call.prep["scale_rewards"] is False and call.save_checkpoint is False
    options = backend._train_options(
        {"mask_prob_ratio": True, "kimi_k2_tau": 0.1, "max_negative_advantage_importance_sampling_weight": 2.0}
    ).options  # their loss is checked against ART's in test_loss.py
    assert options.loss.mask_prob_ratio and options.loss.kimi_k2_tau == 0.1
    assert options.loss.max_negative_advantage_importance_sampling_weight == 2.0
    assert backend._train_options({"kl_penalty_source": "sample"}).options.loss.kl_penalty_source == "sample"
    assert backend._train_options({"advantage_balance": -0.5}).prep["advantage_balance"] == -0.5
    with pytest.raises(ConfigError, match="advantage_balance=2 is invalid: a number from -1 to 1"):
        backend._train_options({"advantage_balance": 2})
    with pytest.raises(ConfigError, match="kimi_k2_tau='x' is invalid"):
        backend._train_options({"kimi_k2_tau": "x"})
    options = backend._train_options({"precalculate_logprobs": True, "truncated_importance_sampling": 2.0}).options
    assert options.precalculate_logprobs and options.loss.truncated_importance_sampling == 2.0
    with pytest.raises(ConfigError, match="truncated_importance_sampling=2.0 .*pass precalculate_logprobs=True"):
        backend._train_options({"truncated_importance_sampling": 2.0})


def test_packed_sequence_length_drops_longer_sequences_as_art(backend):
    prep = backend._train_options({"packed_sequence_length": 2048}).prep
    assert prep["max_length"] == 2048 and prep["overlong"] == "skip"
    prep = backend._train_options({"packed_sequence_length": 8192}).prep  # TrainerConfig's limit is lower
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


def test_kl_reference_gradient_accumulation_and_lr_power_are_checked(backend):
    call = backend._train_options(
        {"kl_penalty_coef": 0.1, "kl_penalty_reference_step": 3, "grad_accumulation_sequences": 4}
    )
    assert call.kl_reference_step == 3 and call.options.kl_reference is None
    assert call.options.grad_accumulation_sequences == 4
    assert backend._train_options({}).options.grad_accumulation_sequences == 1  # ART's LocalBackend default
    call = backend._train_options({"kl_penalty_coef": 0.1, "kl_ref_adapter_path": "/adapters/ref"})
    assert call.options.kl_reference == "/adapters/ref"
    call = backend._train_options({"kl_penalty_reference_step": 3})  # as ART: no KL penalty, no reference
    assert call.kl_reference_step is None
    backend._train_options({"num_trajectories_learning_rate_multiplier_power": 0.5})  # one trajectory a row: 1
    for key, value, allowed in [
        ("grad_accumulation_sequences", 0, "None or an integer >= 1"),
        ("kl_penalty_reference_step", -1, "None or an integer >= 0"),
        ("kl_ref_adapter_path", 3, "None or a directory"),
        ("num_trajectories_learning_rate_multiplier_power", "1", "a number"),
    ]:
        with pytest.raises(ConfigError, match=rf"{key}=.* is invalid: {allowed}"):
            backend._train_options({"kl_penalty_coef": 0.1, key: value})


@pytest.mark.parametrize("key, value", [("loss_fn_config", {"x": 1}), ("adam_params", {"betas": (0.9, 0.95)})])
def test_options_arts_localbackend_refuses_are_refused(backend, key, value):
    with pytest.raises(ConfigError, match=rf"{key}=.* ART's LocalBackend requires {key}=None, as we do"):
        backend._train_options({key: value})
    backend._train_options({key: _ART_DEFAULTS[key]})  # ART's default is accepted


def test_an_unknown_option_names_the_supported_ones(backend):
    with pytest.raises(ConfigError, match="learning_rte=.*unknown train\\(\\) option; supported: .*learning_rate"):
        backend._train_options({"learning_rte": 1e-5})


def test_the_kl_reference_step_is_this_models_checkpoint(backend, tmp_path):
    from types import SimpleNamespace

    from art_sglang import paths
    from art_sglang.step import _with_reference

    run = SimpleNamespace(model_dir=tmp_path, checkpoint=lambda step: paths.checkpoint_dir(tmp_path, step))
    (run.checkpoint(2)).mkdir(parents=True)
    (run.checkpoint(2) / "adapter_model.safetensors").write_bytes(b"")
    call = backend._train_options({"kl_penalty_coef": 0.1, "kl_penalty_reference_step": 2})
    assert _with_reference(run, call).kl_reference == str(run.checkpoint(2))
    call = backend._train_options({"kl_penalty_coef": 0.1, "kl_penalty_reference_step": 5})
    with pytest.raises(
        ConfigError, match=r"kl_penalty_reference_step=5 .*no LoRA adapter.* checkpoints are steps \[2\]"
    ):
        _with_reference(run, call)
    call = backend._train_options({"kl_penalty_coef": 0.1, "kl_ref_adapter_path": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match=r"kl_ref_adapter_path=.*nothing.* no LoRA adapter"):
        _with_reference(run, call)
