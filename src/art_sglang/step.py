"""One training step, owned from start to end: persist → prepare → train → checkpoint and publish → metrics.

A step either completes (the server serves step N, the trainer is at step N) or leaves the model as it was at step
N-1: the trainer is reloaded from N-1's checkpoint, N's checkpoint (if any was written) is removed, the gate is
open and the server serves N-1. Only the trajectories stay (`train_inputs/N.jsonl`): nothing sampled is lost, and
the next `train()` takes step N again with exactly one update. A supervised step (`train_sft`) is one step the same
way, however many batches it trains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import art
from art import LocalTrainResult

from . import paths
from .chat import ChatTemplate
from .config import TrainerConfig
from .errors import ConfigError, StepFailedError, TrainerCrashedError
from .gateway import Gateway
from .leases import Leases
from .plots import plot_rows
from .server import SGLangClient, SGLangServer
from .sync import GpuTimeShare, WeightSync
from .sync.base import Durable
from .trainer.core import StepOptions
from .trainer.data import prepare
from .trainer.schedule import art_rows
from .trainer.sft import prepare_sft
from .trainer.worker import TrainerGroup

if TYPE_CHECKING:
    from .serving import Serving

log = logging.getLogger("art_sglang")


@dataclass
class ModelRun:
    """Everything started for one model, and where its policy stands. The server, its client and gateway may be
    shared with other models (serving.py)."""

    model: art.TrainableModel
    model_dir: Path
    base: Path
    template: ChatTemplate  # the trainer's (the gateway has its own copy: tokenizers are not shared by threads)
    trainer: TrainerGroup
    serving: Serving
    sync: WeightSync
    timeshare: GpuTimeShare | None  # shared mode (one GPU)
    step: int  # the published step: what the server serves and what the trainer holds between steps
    merged_root: Path
    leases: Leases  # ART's adapter leases: steps that stay served by their own adapters
    trainer_config: TrainerConfig  # the backend's, with the model's own settings applied (internal_config.py)
    published_pid: int | None = None  # the server process the model's policy was last published to
    trainer_restarts: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time
    # What the server serves changes only under this: a step from its publish to its end, or a republish (which
    # may run while a step trains: the server serves `step` until that step's publish).
    publishing: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def server(self) -> SGLangServer:
        return self.serving.server

    @property
    def client(self) -> SGLangClient:
        return self.serving.client

    @property
    def gateway(self) -> Gateway:
        return self.serving.gateway

    @property
    def restarts(self) -> int:
        """Of the server, after crashes (counted once however many models it serves)."""
        return self.serving.restarts

    def checkpoint(self, step: int) -> Path:
        return paths.checkpoint_dir(self.model_dir, step)


@dataclass
class TrainCall:
    """One `train()` call's checked options."""

    options: StepOptions
    prep: dict[str, Any]  # keywords of trainer.data.prepare
    save_checkpoint: bool = True
    kl_reference_step: int | None = None  # ART's kl_penalty_reference_step: that checkpoint is the KL reference
    plot_tensors: bool = False


async def train_step(run: ModelRun, groups: list[Any], call: TrainCall) -> LocalTrainResult:
    """Take RL step `run.step + 1` on `groups` (ART's optimizer steps, trainer/schedule.py); the caller holds
    `run.lock`."""
    started, step = time.monotonic(), run.step + 1
    inputs = paths.train_inputs(run.model_dir, step)
    write_atomic(inputs, "\n".join(g.model_dump_json() for g in groups))  # before anything can fail
    options = _with_reference(run, call)
    prepared = await asyncio.to_thread(prepare, groups, run.template, **call.prep)  # bad input: an error, no change
    if call.plot_tensors and prepared.sequences:
        plot = await asyncio.to_thread(plot_rows, art_rows(prepared.sequences), run.model_dir)
        log.info("step %d: training rows plotted in %s", step, plot)

    async def train() -> dict[str, float]:
        if not prepared.sequences:
            log.warning("step %d: no trainable data (every group's rewards were equal); policy unchanged", step)
            return {}
        return await run.trainer.train(prepared.sequences, options)

    policy = policy_metrics(groups, run.step)
    result = await _take_step(run, step, started, inputs, train, prepared.counts, call.save_checkpoint)
    result.metrics.update(policy)
    return result


def policy_metrics(groups: list[Any], current: int) -> dict[str, float]:
    """How far behind `current` the policies that sampled the trajectories were: each reply carries the step that
    sampled it (the gateway's `weight_version`); a trajectory counts as its oldest reply."""
    lags = []
    for group in groups:
        for trajectory in group.trajectories:
            histories = [trajectory.messages_and_choices]
            histories += [h.messages_and_choices for h in trajectory.additional_histories]
            versions = [
                v
                for history in histories
                for item in history
                if not isinstance(item, dict) and isinstance(v := getattr(item, "weight_version", None), int)
            ]
            if versions:  # a reply of a step that failed and was rolled back counts as current
                lags.append(max(0, current - min(versions)))
    if not lags:
        return {}
    return {"policy/steps_off_policy_mean": sum(lags) / len(lags), "policy/steps_off_policy_max": float(max(lags))}


def _with_reference(run: ModelRun, call: TrainCall) -> StepOptions:
    """The options with the KL reference adapter resolved to a directory that holds one."""
    options = call.options
    if call.kl_reference_step is not None and options.kl_reference is None:  # as ART: a given path wins
        options = replace(options, kl_reference=str(run.checkpoint(call.kl_reference_step)))
    if options.kl_reference is not None and not (Path(options.kl_reference) / "adapter_model.safetensors").is_file():
        raise ConfigError(
            "kl_penalty_reference_step" if call.kl_reference_step is not None else "kl_ref_adapter_path",
            call.kl_reference_step if call.kl_reference_step is not None else options.kl_reference,
            f"no LoRA adapter (adapter_model.safetensors) in {options.kl_reference}; this model's checkpoints are "
            f"steps {paths.checkpoint_steps(run.model_dir)}",
        )
    return options


async def sft_step(
    run: ModelRun,
    trajectories: list[Any],
    learning_rate: float | list[float],
    batch_size: int,
    max_length: int | None,
    last_only: bool,
) -> tuple[LocalTrainResult, list[dict[str, float]]]:
    """Take step `run.step + 1` as supervised fine-tuning (one optimizer step per batch), all or nothing like an RL
    step; returns the step's result and each batch's metrics. The caller holds `run.lock`."""
    started, step = time.monotonic(), run.step + 1
    inputs = paths.train_inputs(run.model_dir, step).with_suffix(".sft.jsonl")
    write_atomic(inputs, "\n".join(t.model_dump_json() for t in trajectories))
    data = await asyncio.to_thread(
        prepare_sft, trajectories, run.template, learning_rate, batch_size, max_length, last_only
    )
    batches: list[dict[str, float]] = []

    async def train() -> dict[str, float]:
        batches.clear()
        for batch in data.batches:
            if batch.sequences:
                metrics = await run.trainer.sft(batch.sequences, batch.learning_rate)
                batches.append({**metrics, "learning_rate": batch.learning_rate})
        tokens = sum(b["tokens"] for b in batches)
        return {
            "loss": sum(b["loss"] * b["tokens"] for b in batches) / max(tokens, 1.0),
            "tokens": tokens,
            "optimizer_steps": float(len(batches)),
        }

    result = await _take_step(run, step, started, inputs, train, data.counts, save_checkpoint=True)
    return result, batches


async def _take_step(
    run: ModelRun,
    step: int,
    started: float,
    inputs: Path,
    train: Callable[[], Awaitable[dict[str, float]]],
    counts: Counter[str],
    save_checkpoint: bool,
) -> LocalTrainResult:
    """Train, publish and checkpoint `step` once its inputs are saved and prepared; on any failure, recover."""
    rollout = rollout_metrics(run.gateway.take_counters(run.model.name))
    stage, server_pid = "train", run.server.pid
    train_metrics: dict[str, float] = {}
    publishing = contextlib.AsyncExitStack()  # holds run.publishing from the publish to the step's end
    try:
        if not run.trainer.running:  # it crashed in an earlier step: start again from the last checkpoint
            await restart_trainer(run)
        if run.server.crash_reason() is not None or run.published_pid != run.server.pid:
            stage = "publish"  # an earlier restart or republish failed: the server serves `run.step` again first
            await republish_current(run)
            stage, server_pid = "train", run.server.pid
        async with _held_until_published(run):
            async with run.timeshare.trainer_turn() if run.timeshare else contextlib.nullcontext():
                t0 = time.monotonic()
                train_metrics = await train()
                train_seconds = time.monotonic() - t0
                stage = "publish"  # the server gets the GPU back first
            await publishing.enter_async_context(run.publishing)

            async def durable() -> None:  # before anything answers as `step` (WeightSync.publish)
                nonlocal stage
                try:
                    await run.trainer.save_checkpoint(run.checkpoint(step), step)
                except BaseException:
                    stage = "checkpoint"
                    raise

            sync_metrics = await publish(run, step, durable)
    except BaseException as e:
        await publishing.aclose()  # a republish of the last step (this recovery's, or the crash watch's) may go
        republish = stage in ("publish", "checkpoint") or run.server.pid != server_pid
        await recover(run, step, republish=republish)
        if not isinstance(e, Exception):
            raise  # cancelled: the model is back at the last step; the cancellation goes on
        what = f"step {step} failed in the {'trainer' if isinstance(e, TrainerCrashedError) else stage} stage"
        message = (
            f"{what}; the policy stays at step {run.step}, the trainer was reset to it and no checkpoint was kept "
            f"for step {step}. Its trajectories are saved in {inputs}; the next train() takes step {step} again.\n"
            f"Cause: {type(e).__name__}: {e}"
        )
        raise (TrainerCrashedError if isinstance(e, TrainerCrashedError) else StepFailedError)(message) from e
    run.step = step
    await publishing.aclose()
    metrics: dict[str, float] = {**train_metrics, **rollout}
    metrics.update({f"data/{k}": float(v) for k, v in counts.items()})
    metrics.update({f"sync/{k}": float(v) for k, v in sync_metrics.items()})
    metrics["time/train_s"] = train_seconds
    metrics["time/sync_s"] = sync_metrics["sync_seconds"]
    metrics["time/step_s"] = time.monotonic() - started
    metrics["server/restarts"] = float(run.restarts)
    metrics["trainer/restarts"] = float(run.trainer_restarts)
    log.info(
        "step %d: %s sync in %.3f s, train %.1f s, %d tokens",
        step,
        run.sync.method,
        sync_metrics["sync_seconds"],
        train_seconds,
        int(train_metrics.get("tokens", 0)),
    )
    # As ART 0.5.23's LocalBackend: every step's checkpoint is written and kept (a KL reference, a lease or a resume
    # may name it); save_checkpoint=False only leaves checkpoint_path out. `delete_checkpoints` removes them.
    checkpoint = run.checkpoint(step) if save_checkpoint else None
    return LocalTrainResult(step=step, metrics=metrics, checkpoint_path=str(checkpoint) if checkpoint else None)


@contextlib.asynccontextmanager
async def _held_until_published(run: ModelRun) -> AsyncIterator[None]:
    """Shared mode: requests wait at the gateway from before the trainer takes the GPU until the new step is
    published (meanwhile the server has no KV cache, or is not running). Elsewhere they flow on the last step."""
    if run.timeshare is None:
        yield
        return
    async with run.gateway.closed():
        await run.gateway.wait_idle(600)
        yield


async def recover(run: ModelRun, failed: int, *, republish: bool) -> None:
    """Put the model back at `run.step` after step `failed` went wrong anywhere after its inputs were saved."""
    log.warning("art-sglang: step %d failed; going back to step %d", failed, run.step)
    shutil.rmtree(run.checkpoint(failed), ignore_errors=True)  # it was never published
    republish = republish or run.server.crash_reason() is not None
    if republish and not run.sync.needs_trainer:  # first: nothing may answer as the failed step meanwhile
        await republish_current(run)
        republish = False
    # A trainer that died is started again by the next train(), so that this error is not delayed by a start.
    if run.trainer.running:  # its adapter and optimizer may hold the failed step's update
        try:
            await run.trainer.load_checkpoint(run.checkpoint(run.step))
        except Exception as e:
            log.error("art-sglang: could not reset the trainer to step %d (%s); the next step restarts it", run.step, e)
            run.trainer.stop()
    if republish:
        if not run.trainer.running:  # the merged-weights syncs export the policy from it
            try:
                await restart_trainer(run)
            except Exception as e:  # `lora` republishes from the checkpoint without it
                log.error("art-sglang: could not start the trainer again (%s); the next step tries again", e)
        await republish_current(run)


async def publish(run: ModelRun, step: int, durable: Durable | None = None) -> dict[str, float]:
    """Make the server serve `step` of the model (see WeightSync.publish)."""
    metrics = await run.sync.publish(step, run.checkpoint(step), durable)
    run.published_pid = run.server.pid
    return metrics


async def republish_current(run: ModelRun) -> None:
    """Make the server serve `run.step` again: restart it if it is down (counted), then publish."""
    async with run.publishing, run.gateway.closed():
        await run.serving.restart_if_down()
        await publish(run, run.step)


async def restart_trainer(run: ModelRun) -> None:
    log.warning("art-sglang: starting the trainer workers again from checkpoint %d", run.step)
    await run.trainer.start()
    await run.trainer.load_checkpoint(run.checkpoint(run.step))
    if run.timeshare is not None:
        await run.trainer.offload()  # as after start-up: the server holds the GPU between steps
    run.trainer_restarts += 1


def rollout_metrics(counters: dict[int, Any]) -> dict[str, float]:
    """Gateway counters since the last step, over all policy versions (requests of the current one dominate)."""
    keys = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "rescored_requests")
    keys += ("warmup_requests", "warmup_prompt_tokens", "warmup_cached_tokens")
    total = {k: float(sum(c.get(k, 0) for c in counters.values())) for k in keys}
    out = {f"rollout/{k}": v for k, v in total.items()}
    out["rollout/cache_hit_ratio"] = total["cached_tokens"] / total["prompt_tokens"] if total["prompt_tokens"] else 0.0
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
