"""ART 0.5.23's PipelineTrainer (async RL) on SGLangBackend, unchanged, against a real SGLang server on this CPU.

Rollouts for later steps run while earlier steps train; each rollout holds an adapter lease on the step it samples
from, and the served version stamps prove it ran on that step's own weights. An old checkpoint is served exactly
under an exact lease, or refused.
"""

from __future__ import annotations

import contextlib
import io
import math

import art
import openai
import pytest
from art.pipeline_trainer import PipelineTrainer, make_group_rollout_fn
from art.pipeline_tuner.config import PipelineRuntimeConfig
from rollouts import BASE, make_backend, rollout

from art_sglang import paths
from art_sglang.errors import LeaseError
from art_sglang.tasks import ONE_WORD_QUESTIONS
from art_sglang.trainer.sequence import Sequence

pytestmark = pytest.mark.server
STEPS = 7


def stamps(trajectory: art.Trajectory) -> list[int]:
    """The step that sampled each reply of the trajectory, as the gateway stamped it."""
    return [c.weight_version for c in trajectory.messages_and_choices if not isinstance(c, dict)]


def span_versions(trajectory: art.Trajectory) -> list[int]:
    """The policy of each reply's tokens, from the `policy_token_spans` ART's PipelineTrainer checks."""
    choices = [c for c in trajectory.messages_and_choices if not isinstance(c, dict)]
    return [span["policy_version"] for c in choices for span in c.model_extra["policy_token_spans"]]


async def fixed_sequence_logprobs(run, adapter: str | None) -> tuple[list[float], Sequence]:
    """The engine's logprobs of one fixed reply, under `adapter`."""
    prompt = run.template.render([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True)
    reply = run.template.encode("Apple. It is a sweet fruit.")
    ids = prompt + reply
    sequence = Sequence(ids, [math.nan] * len(ids), [False] * len(prompt) + [True] * len(reply), 0.0, 1.0, 0)
    return await run.client.score(ids, len(prompt), lora_path=adapter), sequence


async def run_pipeline(
    art_path,
    name: str,
    max_steps_off_policy: int,
    steps: int,
    eval_every: int = 0,
    retention=None,
    base: str = BASE,
    **options,
):
    model = art.TrainableModel(name=name, run_name=name, project="tests", base_model=base)
    backend = make_backend(art_path)
    await model.register(backend)
    run = backend.model_run(model)
    engine0, sequence = await fixed_sequence_logprobs(run, run.sync.current)
    (trainer0,) = await run.trainer.logprobs([sequence])
    record = {"model": model, "backend": backend, "run": run, "batches": [], "results": [], "evals": []}
    record.update(trainer0=trainer0, engine0=engine0, loaded_during=[])
    train = backend.train

    async def recording_train(model, groups, **kwargs):
        groups = list(groups)
        record["batches"].append((run.step, groups))
        result = await train(model, groups, **kwargs)
        record["results"].append(result)
        record["loaded_during"].append(sorted(run.sync.loaded))
        return result

    backend.train = recording_train

    async def single(model, scenario, config):
        return await rollout(model, scenario["question"])

    async def evaluate(model, step, config):
        trajectory = await rollout(model, ONE_WORD_QUESTIONS[0], max_tokens=4)
        record["evals"].append((step, model.get_inference_name(), stamps(trajectory), span_versions(trajectory)))
        return [trajectory]

    trainer = PipelineTrainer(
        model,
        backend,
        make_group_rollout_fn(single, n=4),
        [{"question": q} for q in ONE_WORD_QUESTIONS[:4]] * 50,
        None,
        eval_fn=evaluate if eval_every else None,
        pipeline=PipelineRuntimeConfig(num_rollout_workers=4, min_batch_size=4, max_batch_size=4),
        learning_rate=2e-4,
        max_steps=steps,
        max_steps_off_policy=max_steps_off_policy,
        eval_every_n_steps=eval_every,
        eval_at_start=False,
        log_interval_seconds=3600,
        checkpoint_retention_strategy=retention,
        **options,
    )
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # ART prints the failures it swallows (an eval's)
        await trainer.train(handle_signals=False)
    record["failures"] = [line for line in printed.getvalue().splitlines() if "failed" in line.lower()]
    record["completed_evals"] = sorted(trainer.state.completed_eval_steps)  # ART's: the evals it accepted and logged
    return record


@pytest.fixture(scope="module")
async def one_off(tmp_path_factory):
    eligible: list[list[int]] = []

    def keep_step_0(context):  # ART's checkpoint retention: it sees the steps it may delete, and keeps step 0
        eligible.append([c.step for c in context.checkpoints])
        return {0}

    record = await run_pipeline(
        tmp_path_factory.mktemp("art"),
        "pipe1",
        max_steps_off_policy=1,
        steps=STEPS,
        eval_every=2,
        retention=keep_step_0,
    )
    record["eligible"] = eligible
    yield record
    await record["backend"].close()


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


async def test_pipeline_trainer_completes_and_learns(one_off):
    assert [r.step for r in one_off["results"]] == list(range(1, STEPS + 1))
    assert not one_off["failures"], one_off["failures"]
    # Against every sample of the base policy (the first batch and more: with a step off policy the second batch
    # samples it too), not one batch of 16: a lucky first batch alone made this fail once in CI.
    batches = [[t for g in groups for t in g.trajectories] for _, groups in one_off["batches"]]
    base = [t.reward for batch in batches for t in batch if t.initial_policy_version == 0]
    last = [mean(t.reward for t in batch) for batch in batches[-2:]]
    assert len(base) >= 16 and mean(last) > mean(base) + 0.2, (mean(base), last)


async def test_every_rollout_ran_on_the_step_its_lease_named(one_off):
    lags = []
    for trained_at, groups in one_off["batches"]:
        for group in groups:
            for trajectory in group.trajectories:
                leased = trajectory.initial_policy_version  # set by PipelineTrainer from the lease it held
                assert stamps(trajectory) == span_versions(trajectory) == [leased], (leased, stamps(trajectory))
                lags.append(trained_at - leased)
    assert max(lags) <= 1  # max_steps_off_policy
    assert max(lags) == 1  # rollouts did overlap training: some sampled a step that was being replaced
    # The backend reports the same, from the stamps.
    reported = [r.metrics["policy/steps_off_policy_max"] for r in one_off["results"]]
    assert max(reported) == 1


async def test_eval_runs_on_the_exact_checkpoint(one_off):
    assert [step for step, *_ in one_off["evals"]] == [2, 4, 6]
    for step, name, stamped, spans in one_off["evals"]:
        assert name == f"pipe1@{step}" and stamped == [step] and spans == [step]
    assert one_off["completed_evals"] == [2, 4, 6]  # ART accepted them: it refuses an eval with no policy spans


async def test_checkpoint_retention_deletes_what_the_strategy_drops(one_off):
    # Eval steps (2, 4, 6) are saved; other steps' checkpoints go once a newer one is durable; the strategy kept step 0.
    assert any(2 in steps for steps in one_off["eligible"])  # offered once its eval was done
    steps = paths.checkpoint_steps(one_off["run"].model_dir)
    assert 0 in steps and 7 in steps and 2 not in steps and 4 not in steps, steps  # kept, current, deleted
    assert set(steps) <= {0, 6, 7}  # 6: its eval may still have been scheduled at step 7's retention


async def test_released_adapters_are_unloaded(one_off):
    run = one_off["run"]
    await run.sync.close()  # pending unloads
    assert sorted(run.sync.loaded) == [6, 7]  # the newest and the one before it; no lease is held
    on_server = (await run.client.models())[1:]
    assert sorted(on_server) == sorted(run.sync.loaded.values())
    assert all(len(loaded) <= 4 for loaded in one_off["loaded_during"])  # bounded by max_loras_per_batch


async def test_an_exact_lease_serves_an_old_checkpoint_exactly(one_off):
    model, backend, run = one_off["model"], one_off["backend"], one_off["run"]
    client = model.openai_client()
    question = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match=r"step 0 of \S+ is no longer loaded"):
        await client.chat.completions.create(model="pipe1@0", messages=question, max_tokens=2)
    async with backend.exact_adapter_lease(model, 0):
        assert model.get_inference_name() == "pipe1@0"
        reply = await client.chat.completions.create(model=model.get_inference_name(), messages=question, max_tokens=2)
        assert reply.choices[0].model_extra["weight_version"] == 0
        engine, _ = await fixed_sequence_logprobs(run, run.gateway.route("pipe1@0").adapter)
        now, _ = await fixed_sequence_logprobs(run, run.gateway.route("pipe1").adapter)
    assert model.get_inference_name() == "pipe1@7"
    # Step 0's checkpoint, loaded again, scores as the trainer scored step 0 before training; step 7 does not.
    assert mean(abs(a - b) for a, b in zip(engine, one_off["trainer0"], strict=True)) < 1e-3
    assert mean(abs(a - b) for a, b in zip(now, one_off["trainer0"], strict=True)) > 1e-2
    await run.sync.close()
    assert 0 not in run.sync.loaded  # released: unloaded again
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="pipe1@0", messages=question, max_tokens=2)


async def test_a_lease_that_cannot_be_served_says_why(one_off):
    model, backend = one_off["model"], one_off["backend"]
    with pytest.raises(LeaseError, match="step 3 of 'pipe1' is not loaded and has no checkpoint"):
        async with backend.exact_adapter_lease(model, 3):  # not an eval step: its checkpoint was not kept
            pass
    with pytest.raises(LeaseError, match="does not exist yet"):
        async with backend.exact_adapter_lease(model, 9):
            pass


async def test_two_steps_off_policy_with_a_kl_penalty_on_a_lagged_step(tmp_path_factory, tiny_base):
    """PipelineTrainer's KL lag: each step (saved with save_checkpoint=False, no eval) asks for the step before as
    its KL reference, which ART's semantics keep on disk. (The tiny random model: nothing here is about learning.)"""
    record = await run_pipeline(
        tmp_path_factory.mktemp("art"),
        "pipe2",
        max_steps_off_policy=2,
        steps=3,
        base=str(tiny_base),
        kl_penalty_coef=0.05,
        kl_penalty_step_lag=1,
    )
    try:
        assert [r.step for r in record["results"]] == [1, 2, 3] and not record["failures"], record["failures"]
        assert all(r.checkpoint_path is None for r in record["results"])  # none asked for...
        assert paths.checkpoint_steps(record["run"].model_dir) == [0, 1, 2, 3]  # ...all written, as ART does
        assert all("kl_policy_ref" in r.metrics for r in record["results"] if "loss" in r.metrics)
        lags = []
        for trained_at, groups in record["batches"]:
            for trajectory in (t for g in groups for t in g.trajectories):
                assert stamps(trajectory) == [trajectory.initial_policy_version]
                lags.append(trained_at - trajectory.initial_policy_version)
        assert 1 <= max(lags) <= 2
    finally:
        await record["backend"].close()
