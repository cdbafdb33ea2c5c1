"""Two SGLang replicas of SmolLM2-135M-Instruct behind the gateway, through ART's API, on this CPU (each replica and
the trainer one thread: throughput does not scale here; this is about exactness and failures)."""

from __future__ import annotations

import asyncio
import os
import signal

import art
import pytest
from rollouts import BASE, gather, wait_until

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig
from art_sglang.errors import ConfigError
from art_sglang.gateway.upstreams import affinity_key
from art_sglang.procs import alive, process_group_members
from art_sglang.server import ReplicaSet
from art_sglang.tasks import ONE_WORD_INSTRUCTION, ONE_WORD_QUESTIONS
from art_sglang.trainer.data import prepare

QUESTIONS = ONE_WORD_QUESTIONS[:4]


def question_message(question: str) -> dict[str, str]:
    return {"role": "user", "content": question + ONE_WORD_INSTRUCTION}  # as one_word_rollout sends it


def mean_reward(groups) -> float:
    rewards = [t.reward for g in groups for t in g.trajectories]
    return sum(rewards) / len(rewards)


async def replicas_serve(run, groups) -> list[float]:
    """Each replica's version label, adapters and logprobs against the trainer's, on samples of `groups`: the largest
    |replica - trainer| gap of each replica (scored on each replica directly, not through the router)."""
    sync, client = run.sync, run.client
    assert sorted(client.admitted) == list(range(len(client.replicas)))
    probe = [g.model_copy(deep=True) for g in groups[:2]]
    for group in probe:  # every sample a training sequence
        for i, t in enumerate(group.trajectories):
            t.reward = float(i)
    sequences = prepare(probe, run.template).sequences
    trainer = await run.trainer.logprobs(sequences)
    gaps = []
    for replica in client.replicas:
        assert (await replica.model_info())["weight_version"] == str(run.step)
        assert sorted((await replica.models())[1:]) == sorted(sync.loaded.values())
        worst = 0.0
        for s, ours in zip(sequences, trainer, strict=True):
            positions = s.trained_positions()
            served = await replica.score(s.token_ids, positions[0], lora_path=sync.current)
            engine = [served[t - positions[0]] for t in positions]
            worst = max(worst, *(abs(a - b) for a, b in zip(engine, ours, strict=True)))
        gaps.append(worst)
    return gaps


async def test_two_replicas_train_in_step_and_survive_a_replica_crash(tmp_path):
    backend = SGLangBackend(
        path=tmp_path,
        sglang_config=SGLangConfig(dtype="float32", max_total_tokens=16384, server_timeout=240, replicas=2),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )
    model = art.TrainableModel(name="twins", run_name="twins", project="tests", base_model=BASE)
    processes: set[int] = set()
    try:
        await model.register(backend)
        run = backend.model_run(model)
        replicas = run.server
        assert isinstance(replicas, ReplicaSet)
        upstreams = run.gateway.upstreams
        assert upstreams.urls == replicas.urls and len(set(replicas.urls)) == 2
        for i, s in enumerate(replicas.replicas):
            assert s.log_path.name == f"sglang-{i}.log" and s.log_path.is_file()
            processes |= process_group_members(s.pid)

        rewards = []
        for step in (1, 2):
            groups = await gather(model, QUESTIONS)
            rewards.append(mean_reward(groups))
            result = await backend.train(model, groups, learning_rate=2e-4)
            assert result.step == step
            # The new policy is on every replica before anything is routed to it: same label, same adapters, and
            # each serves exactly the trainer's policy.
            gaps = await replicas_serve(run, groups)
            assert all(g < 1e-3 for g in gaps), gaps
        # Each question's conversation went to one replica, the questions to both; the samples of a group reused
        # their prompt's prefix on it.
        chosen = [upstreams._sticky[affinity_key({"messages": [question_message(q)]})] for q in QUESTIONS]
        assert sorted(set(chosen)) == [0, 1], chosen
        assert sum(upstreams.sent) == 2 * 16, upstreams.sent
        assert all(t.metrics["cached_tokens"] > 0 for g in groups for t in g.trajectories[1:])

        # SIGKILL one replica while 16 rollouts run: its requests go to the other; nothing fails.
        victim = replicas.replicas[0]
        old_pid = victim.pid
        rollouts = asyncio.create_task(gather(model, QUESTIONS, max_tokens=24, ignore_eos=True))
        await wait_until(lambda: sum(run.gateway.in_flight.values()) >= 8, what="rollouts in flight")
        await asyncio.sleep(1.0)
        cut_off = upstreams.busy[0]
        os.killpg(old_pid, signal.SIGKILL)
        await wait_until(lambda: 0 not in run.client.admitted, timeout=5, what="the dead replica taken out")
        groups = await asyncio.wait_for(rollouts, timeout=600)
        assert cut_off > 0  # the killed replica had requests running: they were sent again
        assert sum(len(g.trajectories) for g in groups) == 16
        assert {t.metadata["weight_version"] for g in groups for t in g.trajectories} == {"2"}
        # It comes back on the current policy before it takes requests again; the server as a whole never went down.
        await wait_until(
            lambda: victim.pid not in (None, old_pid) and 0 in run.client.admitted, timeout=400, what="rejoin"
        )
        assert run.restarts == 0 and replicas.restarts == 1 and run.gateway.held > 0
        processes |= process_group_members(victim.pid)
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps
        # The next step goes to both.
        groups = await gather(model, QUESTIONS)
        rewards.append(mean_reward(groups))
        result = await backend.train(model, groups, learning_rate=2e-4)
        assert result.step == 3
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps
        assert rewards[-1] > rewards[0], rewards  # it learns (the one-word task rises within a few steps)
    finally:
        await backend.close()
    assert processes and not [p for p in processes if alive(p)]  # the replicas leave nothing behind


def test_replicas_refuse_what_they_cannot_do_yet():
    with pytest.raises(ConfigError, match="replicas take new policies with 'lora' only"):
        SGLangConfig(replicas=2, weight_sync_method="disk")
    with pytest.raises(ConfigError, match="integer >= 1"):
        SGLangConfig(replicas=0)
    with pytest.raises(ConfigError, match="each replica takes a free port"):
        SGLangConfig(replicas=2, port=30000)
