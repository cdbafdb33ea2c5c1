"""Two trainable models on one base model, one backend: one SGLang server (this CPU, real SmolLM2-135M) serves both.

Each model trains with its own trainer and checkpoints while the other trains too; every reply a model's name gets
comes from that model's own newest adapter (the engine's logprobs equal that model's trainer's, and the two policies
differ), its step metrics count only its own requests, and a server crash in the middle of one model's step fails
nothing: both come back exactly.
"""

from __future__ import annotations

import asyncio
import os
import signal

import art
import pytest
from rollouts import BASE, gather, make_backend, served_gap, wait_until

from art_sglang.errors import ArtSGLangError
from art_sglang.tasks import ONE_WORD_QUESTIONS
from art_sglang.trainer.data import prepare

pytestmark = pytest.mark.server

QUESTIONS = ONE_WORD_QUESTIONS[:2]
GROUP = 4


def trainable(name: str, **kwargs) -> art.TrainableModel:
    return art.TrainableModel(name=name, run_name=name, project="tests", base_model=BASE, **kwargs)


async def trainer_logprobs(run, groups) -> list[list[float]]:
    """`run`'s trainer's logprobs of the sampled tokens of `groups`."""
    return await run.trainer.logprobs(prepare(groups, run.template).sequences)


async def distinct_rewards(rollouts) -> list[art.TrajectoryGroup]:
    """The groups, each sample rewarded differently: every sample trains, so each step moves the policy."""
    groups = await rollouts
    for group in groups:
        for i, trajectory in enumerate(group.trajectories):
            trajectory.reward = float(i)
    return groups


async def train_and_check(backend, model, learning_rate: float, steps: int) -> list[dict]:
    """Rollouts and a step, `steps` times; after each step, the gap between what the server answers under the
    model's name and what its trainer holds (the other model trains meanwhile)."""
    out = []
    for _ in range(steps):
        groups = await distinct_rewards(gather(model, QUESTIONS, group_size=GROUP))
        result = await backend.train(model, groups, learning_rate=learning_rate)
        out.append({"groups": groups, "result": result, "gap": await served_gap(backend, model, questions=2)})
    return out


async def test_two_models_share_one_server_and_train_concurrently_without_crossing(tmp_path):
    backend = make_backend(tmp_path)
    alpha, beta = trainable("alpha"), trainable("beta")
    try:
        await alpha.register(backend)
        await beta.register(backend)
        a, b = backend.model_run(alpha), backend.model_run(beta)
        # One server and one gateway: one copy of the base weights; each model its own trainer and directory.
        assert a.serving is b.serving and a.server.pid == b.server.pid
        assert alpha.inference_base_url == beta.inference_base_url
        assert a.trainer is not b.trainer and a.model_dir != b.model_dir

        runs = await asyncio.gather(
            train_and_check(backend, alpha, 2e-4, steps=2), train_and_check(backend, beta, 1e-3, steps=2)
        )
        for model, run, history in zip((alpha, beta), (a, b), runs, strict=True):
            assert [h["result"].step for h in history] == [1, 2] and run.step == 2
            for h in history:
                mean, largest = h["gap"]
                assert largest < 1e-3, f"{model.name} at step {h['result'].step} served other weights: {h['gap']}"
                # Counted per model: this model's rollouts and the previous check's 2 requests, never the other's.
                checks = 2 if h["result"].step > 1 else 0
                assert h["result"].metrics["rollout/requests"] == len(QUESTIONS) * GROUP + checks
                versions = {t.messages_and_choices[-1].weight_version for g in h["groups"] for t in g.trajectories}
                assert versions == {h["result"].step - 1}  # sampled by this model's step before it
            assert [p.name for p in sorted((run.model_dir / "checkpoints").iterdir())] == ["0000", "0001", "0002"]
            assert all(name.startswith(f"{model.name}-step") for name in run.sync.loaded.values())

        # The two policies differ, so the gaps above tell them apart: the same replies, scored by each trainer.
        groups = runs[0][-1]["groups"]
        ours, theirs = await trainer_logprobs(a, groups), await trainer_logprobs(b, groups)
        assert max(abs(x - y) for s, t in zip(ours, theirs, strict=True) for x, y in zip(s, t, strict=True)) > 1e-2

        # Both models' adapters side by side on the one server.
        on_server = set(await a.client.models())
        assert set(a.sync.loaded.values()) | set(b.sync.loaded.values()) <= on_server

        # A crash while alpha trains: the watch restarts the server once and publishes both models again at their
        # steps; alpha's step trains on, then publishes its new step on the new server: nothing fails.
        restarts = a.restarts
        groups = await distinct_rewards(gather(alpha, QUESTIONS, group_size=GROUP))
        training = asyncio.create_task(backend.train(alpha, groups, learning_rate=2e-4))
        await wait_until(lambda: a.trainer._busy.locked(), what="alpha's trainer to start the step")
        os.killpg(a.server.pid, signal.SIGKILL)
        result = await asyncio.wait_for(training, timeout=600)
        assert result.step == 3 and a.step == 3
        await wait_until(lambda: b.published_pid == a.server.pid, timeout=300, what="beta published again")
        assert a.published_pid == a.server.pid and a.server.crash_reason() is None
        assert a.restarts == b.restarts == restarts + 1  # one server restart, counted once
        for model in (alpha, beta):
            assert (await served_gap(backend, model, questions=2))[1] < 1e-3

        # A model the server cannot serve as it runs is refused with the setting that differs.
        other = trainable("gamma", _internal_config=art.dev.InternalModelConfig(engine_args={"max_loras": 8}))
        with pytest.raises(ArtSGLangError, match=r"SGLangConfig\.max_loras_per_batch: 8 \(server: 4\)"):
            await other.register(backend)
        # Runs are ART's (project, run name): another project's `alpha` is its own run, never this one's. The gateway
        # routes by model name, so it cannot share this server under that name, and is refused saying so.
        namesake = art.TrainableModel(name="alpha", run_name="alpha", project="elsewhere", base_model=BASE)
        with pytest.raises(ArtSGLangError, match=r"a model named 'alpha' \(project 'tests', run 'alpha'\) is already"):
            await namesake.register(backend)
        assert backend.model_run(alpha) is a and a.step == 3
    finally:
        await backend.close()
