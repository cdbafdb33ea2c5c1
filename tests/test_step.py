"""A training step is all or nothing: a failure at any stage after the trajectories are saved leaves the model at
its last step (trainer reset, failed checkpoint removed, gate open, the server serving the last step, proven by its
logprobs), and the next train() takes the step again with exactly one optimizer update.

Real SGLang server and trainer on this CPU. Failures a real server cannot be made to produce on demand (an adapter
load refused, a checkpoint write failing, a resume failing) are injected by replacing one call for one use: each is
named `fake_*` below. The server killed during the sync is real.
"""

from __future__ import annotations

import asyncio
import os
import signal

import art
import pytest
import torch
from rollouts import BASE, gather, make_backend, requests_during, rollout, served_gap, wait_until

from art_sglang import SGLangAPIError, SGLangServer, StepFailedError
from art_sglang.config import Placement
from art_sglang.tasks import ONE_WORD_QUESTIONS
from art_sglang.trainer.worker import TrainerGroup


def optimizer_updates(run, step: int) -> int:
    """How many optimizer steps the checkpoint of `step` has taken, from its saved AdamW state."""
    state = torch.load(run.checkpoint(step) / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    return int(next(iter(state.values()))["step"]) if state else 0


def steps_taken(result) -> int:
    """The optimizer steps a train() call reports: ART's one per sequence, and the warm-up of a new trainer."""
    return int(result.metrics["optimizer_steps"] + result.metrics["warmup_steps"])


def fail_once(obj, name: str, error: BaseException) -> None:
    """Make `obj.name` raise `error` on its next call only (an injected failure)."""
    original = getattr(obj, name)

    async def fake(*args, **kwargs):
        setattr(obj, name, original)
        raise error

    setattr(obj, name, fake)


async def assert_back_at(backend, model, step: int) -> None:
    run = backend.model_run(model)
    assert run.step == step and model.get_inference_name() == f"{model.name}@{step}"
    assert not run.checkpoint(step + 1).exists()
    assert run.gateway.gate_open  # requests flow
    after = await rollout(model, ONE_WORD_QUESTIONS[1])
    assert after.metadata["weight_version"] == str(step)
    mean, worst = await served_gap(backend, model)  # the server serves exactly the trainer's step
    assert mean < 1e-3 and worst < 1e-2, (mean, worst)


async def retry_takes_one_update(backend, model, groups, step: int) -> None:
    before = optimizer_updates(backend.model_run(model), step - 1)
    result = await backend.train(model, groups, learning_rate=1e-4)
    assert result.step == step and result.metrics["optimizer_steps"] == 4  # one per trajectory
    # The failed attempt left no update behind: the checkpoint holds the previous step's and this call's only.
    assert optimizer_updates(backend.model_run(model), step) == before + steps_taken(result)


@pytest.fixture(scope="module")
async def live(tmp_path_factory):
    model = art.TrainableModel(name="atomic", run_name="atomic", project="tests", base_model=BASE)
    backend = make_backend(tmp_path_factory.mktemp("atomic"))
    await model.register(backend)
    groups = await gather(model, ONE_WORD_QUESTIONS[:2], group_size=2)
    for i, t in enumerate(t for g in groups for t in g.trajectories):
        t.reward = float(i % 2)  # every group trains
    yield backend, model, groups
    await backend.close()


async def test_adapter_load_refused(live):
    backend, model, groups = live
    run = backend.model_run(model)
    step = run.step
    fake_refusal = SGLangAPIError("/load_lora_adapter", 400, "injected: adapter refused")
    fail_once(run.client, "load_lora_adapter", fake_refusal)
    with pytest.raises(StepFailedError, match=rf"(?s)step {step + 1} failed in the publish stage.*injected"):
        await backend.train(model, groups, learning_rate=1e-4)
    await assert_back_at(backend, model, step)
    # The refused adapter's file is gone from the RAM disk; those of the adapters still loaded stay.
    files = {p.name for p in (run.merged_root / "adapters").iterdir()}
    assert files <= set(run.sync.loaded.values()), (files, run.sync.loaded)
    await retry_takes_one_update(backend, model, groups, step + 1)


async def test_checkpoint_write_fails(live):
    """A step is served only once its checkpoint is durable: one that fails there was never answered as."""
    backend, model, groups = live
    run = backend.model_run(model)
    step = run.step
    during: list[str] = []
    save = run.trainer.save_checkpoint

    async def fake_full_disk(*args, **kwargs):  # a client asks while the checkpoint is being written, then it fails
        run.trainer.save_checkpoint = save
        during.append((await rollout(model, ONE_WORD_QUESTIONS[1], max_tokens=2)).metadata["weight_version"])
        raise OSError(28, "injected: No space left on device")

    run.trainer.save_checkpoint = fake_full_disk
    with pytest.raises(StepFailedError, match=rf"(?s)step {step + 1} failed in the checkpoint stage.*No space"):
        await backend.train(model, groups, learning_rate=1e-4)
    assert during == [str(step)]  # answered by the last durable step, never by the failed one
    assert (model.name, step + 1) not in run.gateway.counters
    await assert_back_at(backend, model, step)
    await retry_takes_one_update(backend, model, groups, step + 1)


async def test_server_killed_during_the_sync(live):
    backend, model, groups = live
    run = backend.model_run(model)
    step, restarts = run.step, run.restarts
    publish = run.sync.publish

    async def killed_first(*args, **kwargs):
        run.sync.publish = publish
        os.killpg(run.server.pid, signal.SIGKILL)  # the whole server, as the sync begins
        await asyncio.sleep(0.2)
        return await publish(*args, **kwargs)

    run.sync.publish = killed_first
    with pytest.raises(StepFailedError, match=rf"(?s)step {step + 1} failed in the publish stage.*ServerUnreachable"):
        await backend.train(model, groups, learning_rate=1e-4)
    assert run.server.crash_reason() is None and run.restarts == restarts + 1  # restarted once, by the step
    await assert_back_at(backend, model, step)
    await asyncio.sleep(1.5)  # the crash watcher must not restart it a second time
    assert run.restarts == restarts + 1
    await retry_takes_one_update(backend, model, groups, step + 1)


async def test_a_cancelled_step_leaves_the_model_at_its_last_step(live):
    """Cancelling train() while the trainer works: the workers are stopped (their step's outcome is unknown, and a
    reader thread cannot be cancelled), the policy stays, and the next train() starts them again and takes the step."""
    backend, model, groups = live
    run = backend.model_run(model)
    step = run.step
    training = asyncio.create_task(backend.train(model, groups, learning_rate=1e-4))
    await wait_until(lambda: run.trainer._busy.locked(), what="the trainer to start the step")
    await asyncio.sleep(0.5)
    training.cancel()
    with pytest.raises(asyncio.CancelledError):
        await training
    assert not run.trainer.running
    assert run.step == step and not run.checkpoint(step + 1).exists() and run.gateway.gate_open
    assert (await rollout(model, ONE_WORD_QUESTIONS[1])).metadata["weight_version"] == str(step)
    await retry_takes_one_update(backend, model, groups, step + 1)
    await assert_back_at(backend, model, step + 1)  # the restarted trainer holds what the server serves


async def test_two_train_calls_at_once_run_one_after_the_other(live):
    backend, model, groups = live
    run = backend.model_run(model)
    step, before = run.step, optimizer_updates(run, run.step)
    first, second = await asyncio.gather(
        backend.train(model, groups, learning_rate=1e-4, plot_tensors=True),
        backend.train(model, groups, learning_rate=1e-4),
    )
    assert sorted([first.step, second.step]) == [step + 1, step + 2]
    assert optimizer_updates(run, step + 2) == before + steps_taken(first) + steps_taken(second)
    assert len(list(run.model_dir.glob("packed_tensors_plot_*.png"))) == 1  # ART's plot_tensors, for one call


async def test_shared_mode_time_shares_and_a_server_that_does_not_come_back_fails_the_step(
    tmp_path, monkeypatch, tiny_base
):
    """Shared mode on this CPU: release is unavailable here, so the server stops while the trainer works and starts
    again on the new policy (on a GPU the same flow uses release/resume_memory_occupation). When it does not come back
    (`fake_start`, injected), the step fails and the model serves its last step; the retry takes exactly one update,
    with requests coming throughout. (The tiny random model: what is tested is the flow and the recovery.)"""
    order: list[str] = []
    for cls, name in ((SGLangServer, "start"), (TrainerGroup, "offload")):
        original = getattr(cls, name)

        async def recorded(self, *args, _original=original, _what=f"{cls.__name__}.{name}", **kwargs):
            order.append(_what)
            return await _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, recorded)
    model = art.TrainableModel(
        name="shared-atomic", run_name="shared-atomic", project="tests", base_model=str(tiny_base)
    )
    backend = make_backend(tmp_path)
    backend.placement = Placement("shared", None, [], "forced for this test")
    async with backend:
        await model.register(backend)
        # The server starts only once the trainer has moved to CPU memory: it sizes its KV pool from what is free.
        assert order == ["TrainerGroup.offload", "SGLangServer.start"]
        run = backend.model_run(model)
        assert run.timeshare is not None and run.timeshare.use_release is False
        groups = await gather(model, ONE_WORD_QUESTIONS[:2], group_size=2)
        for i, t in enumerate(t for g in groups for t in g.trajectories):
            t.reward = float(i % 2)
        fail_once(run.server, "start", RuntimeError("injected: the server did not come back"))
        with pytest.raises(StepFailedError, match="(?s)step 1 failed in the publish stage.*did not come back"):
            await backend.train(model, groups, learning_rate=1e-2)
        assert run.server.running
        await assert_back_at(backend, model, 0)

        pid, before = run.server.pid, optimizer_updates(run, 0)
        result, errors = await requests_during(model, backend.train(model, groups, learning_rate=1e-2))
        assert errors == []
        assert result.step == 1 and result.metrics["optimizer_steps"] == 4  # one per trajectory
        assert optimizer_updates(run, 1) == before + steps_taken(result)  # the failed attempt left no update
        assert run.server.pid != pid and run.server.running
        after = await rollout(model, ONE_WORD_QUESTIONS[0])
        assert after.metadata["weight_version"] == "1"
        mean, worst = await served_gap(backend, model)  # the restarted server serves the trainer's step 1
        assert mean < 1e-3 and worst < 1e-2, (mean, worst)
