"""Faults and load against a real SGLang server and trainer: each failure is a named, tested behaviour.

The tests of this module share one backend (lora sync) and run in order: syncs under load, the server killed
mid-rollout, the trainer killed mid-step; the last one ends it and resumes with a new backend.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections import Counter

import art
import openai
import pytest
from rollouts import BASE, gather, make_backend, rollout, wait_until

from art_sglang import TrainerCrashedError, paths
from art_sglang.errors import ArtSGLangError
from art_sglang.tasks import ONE_WORD_QUESTIONS

# 16 prompts x 4 samples: GRPO-shaped load. ignore_eos keeps each request running for its whole length.
LOAD_PROMPTS = [f"{q} (variant {i})" for i in range(2) for q in ONE_WORD_QUESTIONS]


def in_flight(run) -> int:
    return sum(run.gateway.in_flight.values())


def saved_trajectories(run, step: int) -> int:
    lines = paths.train_inputs(run.model_dir, step).read_text().splitlines()
    return sum(len(json.loads(line)["trajectories"]) for line in lines)


def checkpoint_names(run) -> list[str]:
    return sorted(p.name for p in (run.model_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def art_path(tmp_path_factory):
    return tmp_path_factory.mktemp("art-reliability")


@pytest.fixture(scope="module")
async def live(art_path):
    model = art.TrainableModel(name="reliable", run_name="reliable", project="tests", base_model=BASE)
    backend = make_backend(art_path)
    await model.register(backend)
    groups = await gather(model, ONE_WORD_QUESTIONS[:2], group_size=2)  # a small batch to train on
    yield {"model": model, "backend": backend, "groups": groups, "run": backend.model_run(model)}
    await backend.close()


async def test_three_syncs_while_64_requests_are_in_flight(live, caplog):
    model, backend, run = live["model"], live["backend"], live["run"]
    pid, crashes = run.server.pid, run.restarts
    at_sync: list[int] = []
    publish = run.sync.publish

    async def counting_publish(step, checkpoint, durable=None):
        at_sync.append(in_flight(run))
        return await publish(step, checkpoint, durable)

    run.sync.publish = counting_publish
    caplog.set_level(logging.WARNING)
    try:
        for _ in range(3):
            before = run.step
            requests = [
                asyncio.create_task(rollout(model, q, max_tokens=32, ignore_eos=True))
                for q in LOAD_PROMPTS
                for _ in range(4)
            ]
            await wait_until(lambda: in_flight(run) == 64, what="64 requests at the gateway")
            result = await backend.train(model, live["groups"], learning_rate=1e-4)
            responses = await asyncio.gather(*requests, return_exceptions=True)
            errors = [r for r in responses if isinstance(r, BaseException)]
            assert errors == [], errors[:3]
            versions = Counter(r.metadata["weight_version"] for r in responses)
            # lora: a request runs whole on the adapter it was routed to, and says which one that was.
            assert set(versions) <= {str(before), str(result.step)}, versions
            assert versions[str(before)] > 0, versions
    finally:
        run.sync.publish = publish
    assert at_sync == [64] * 3  # every sync happened with all 64 requests in flight
    assert run.server.pid == pid and run.restarts == crashes  # no server crash
    assert "unloading anyway" not in caplog.text  # no adapter was unloaded under a running request


async def test_server_killed_mid_rollout_loses_no_request_and_cuts_a_stream_with_an_error(live):
    """The whole server SIGKILLed while 32 rollouts and a stream run: the watcher restarts it on its port; every
    rollout is held and sent again, so none is lost; the stream had already sent chunks, cannot be sent again and ends
    in an error, so a partial reply is never taken for a whole one."""
    model, backend, run = live["model"], live["backend"], live["run"]
    restarts, held, step = run.restarts, run.gateway.held, run.step
    port = run.server.port

    chunks, streaming = 0, asyncio.Event()

    async def stream() -> None:
        nonlocal chunks
        reply = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(),
            messages=[{"role": "user", "content": "Count slowly."}],
            max_tokens=256,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        with pytest.raises(openai.APIError, match="failed mid-stream"):
            async for _ in reply:
                chunks += 1
                if chunks == 3:
                    streaming.set()

    streamed = asyncio.create_task(stream())
    await asyncio.wait_for(streaming.wait(), timeout=120)
    rollouts = asyncio.create_task(gather(model, LOAD_PROMPTS[:8], group_size=4, max_tokens=32, ignore_eos=True))
    await wait_until(lambda: in_flight(run) == 33, what="32 rollouts and the stream at the gateway")
    await asyncio.sleep(1.0)  # past the prefix warm-up: decoding
    cut_off = in_flight(run)
    os.killpg(run.server.pid, signal.SIGKILL)  # the whole server: launcher, scheduler, detokenizer
    groups = await asyncio.wait_for(rollouts, timeout=600)
    await asyncio.wait_for(streamed, timeout=60)
    assert cut_off == 33 and chunks < 256  # the stream was cut off, and its client knows
    assert sum(len(g.trajectories) for g in groups) == 32  # every rollout completed
    assert run.restarts == restarts + 1 and run.server.running and run.server.port == port
    assert run.gateway.held - held >= cut_off - 1  # each cut-off rollout was held and sent again
    assert {t.metadata["weight_version"] for g in groups for t in g.trajectories} == {str(step)}
    result = await backend.train(model, groups, learning_rate=1e-4)  # the step trains
    assert result.step == step + 1
    assert result.metrics["server/restarts"] == restarts + 1
    assert saved_trajectories(run, result.step) == 32


async def kill_trainer_mid_step(backend, model, run, groups) -> float:
    """Start a step, SIGKILL the trainer worker while it trains; return seconds from the kill to the error."""
    step = run.step
    task = asyncio.create_task(backend.train(model, groups, learning_rate=1e-4))
    await wait_until(lambda: run.trainer._busy.locked(), what="the trainer to start the step")
    await asyncio.sleep(0.3)
    os.killpg(run.trainer.pids[0], signal.SIGKILL)
    killed = time.monotonic()
    expected = rf"step {step + 1} failed in the trainer stage; the policy stays at step {step}"
    with pytest.raises(TrainerCrashedError, match=expected):
        await asyncio.wait_for(task, timeout=60)
    return time.monotonic() - killed


async def test_trainer_killed_mid_step_raises_quickly_and_the_next_step_restarts_it(live):
    model, backend, run = live["model"], live["backend"], live["run"]
    step = run.step
    assert await kill_trainer_mid_step(backend, model, run, live["groups"]) < 10
    assert checkpoint_names(run)[-1] == f"{step:04d}"  # nothing of the failed step is visible
    assert not [p for p in (run.model_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert saved_trajectories(run, step + 1) == 4  # its trajectories were kept
    assert model.get_inference_name() == f"reliable@{step}"
    result = await backend.train(model, live["groups"], learning_rate=1e-4)
    assert result.step == step + 1 and result.metrics["trainer/restarts"] == 1


async def test_after_a_trainer_kill_a_new_backend_resumes_from_the_last_complete_step(live, art_path):
    model, backend, run = live["model"], live["backend"], live["run"]
    step = run.step
    await kill_trainer_mid_step(backend, model, run, live["groups"])
    await backend.close()
    model = art.TrainableModel(name="reliable", run_name="reliable", project="tests", base_model=BASE)
    async with make_backend(art_path) as fresh:
        await model.register(fresh)
        assert model.get_inference_name() == f"reliable@{step}"
        groups = await gather(model, ONE_WORD_QUESTIONS[:2], group_size=2)
        result = await fresh.train(model, groups, learning_rate=1e-4)
        assert result.step == step + 1


@pytest.mark.parametrize("damage", ["config", "weights"])
async def test_a_corrupt_checkpoint_on_resume_names_the_directory_and_the_fix(tmp_path, damage):
    model = art.TrainableModel(name="corrupt", run_name="corrupt", project="tests", base_model=BASE)
    checkpoint = tmp_path / "tests" / "models" / "corrupt" / "checkpoints" / "0003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{not json" if damage == "config" else "{}")
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\x08\x00" if damage == "weights" else b"")
    problem = "adapter_config.json is not valid JSON" if damage == "config" else "safetensors cannot be read"
    async with make_backend(tmp_path) as backend:
        with pytest.raises(ArtSGLangError, match=rf"checkpoint .*0003 is incomplete or corrupt .*{problem}.*Delete"):
            await model.register(backend)  # registering a trainable model starts its run
        assert backend._runs == {}  # nothing was started
