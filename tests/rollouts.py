"""A backend as the tests configure it, and rollouts of the one-word task through ART's OpenAI client."""

from __future__ import annotations

import asyncio
import time

import art

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig
from art_sglang.tasks import ONE_WORD_QUESTIONS, one_word_rollout
from art_sglang.trainer.data import prepare

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# One tool, for the agent tests and the GPU run
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]


def make_backend(path, method: str = "lora") -> SGLangBackend:
    return SGLangBackend(
        path=path,
        sglang_config=SGLangConfig(max_total_tokens=16384, weight_sync_method=method, server_timeout=240),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )


rollout = one_word_rollout  # the tests' name for one episode of the task


async def gather(model, questions, group_size=4, **kwargs):
    return await art.gather_trajectory_groups(
        [art.trajectory_group([rollout(model, q, **kwargs) for _ in range(group_size)]) for q in questions],
        pbar_desc=None,
    )


def training_sequences(run, groups):
    """The samples of `groups` as training sequences (on a copy with distinct rewards: none is left out, even once
    a group's rewards are all equal)."""
    probe = [g.model_copy(deep=True) for g in groups]
    for group in probe:
        for i, t in enumerate(group.trajectories):
            t.reward = float(i)
    return prepare(probe, run.template).sequences


def engine_logprobs(s) -> list[float]:
    """The engine's logprobs of a sequence's sampled tokens, as it returned them (what the trainer's logprobs of the
    same sequence are compared with)."""
    return [lp for lp, m in zip(s.logprobs[1:], s.mask[1:], strict=True) if m]


async def logprob_gaps(run, sequences) -> list[float]:
    """|engine - trainer| for each sampled token of `sequences`, the trainer scoring with the policy it holds now."""
    trainer = await run.trainer.logprobs(sequences)
    return [
        abs(engine - ours)
        for s, lps in zip(sequences, trainer, strict=True)
        for engine, ours in zip(engine_logprobs(s), lps, strict=True)
    ]


async def served_gap(backend, model, questions: int = 4) -> tuple[float, float]:
    """Mean and max |engine - trainer| logprob over fresh samples: ~0 only when the server serves exactly the
    policy the trainer holds (what proves a sync, rather than a version label)."""
    run = backend.model_run(model)
    trajectories = [await rollout(model, q, max_tokens=12) for q in ONE_WORD_QUESTIONS[:questions]]
    gaps = await logprob_gaps(run, training_sequences(run, [art.TrajectoryGroup(trajectories)]))
    return sum(gaps) / len(gaps), max(gaps)


async def wait_until(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
