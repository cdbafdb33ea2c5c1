"""A backend as the tests configure it, and rollouts of the one-word task through ART's OpenAI client."""

from __future__ import annotations

import art

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig
from art_sglang.tasks import one_word_rollout

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_backend(path, method: str = "lora") -> SGLangBackend:
    return SGLangBackend(
        path=path,
        sglang_config=SGLangConfig(
            dtype="float32", max_total_tokens=16384, weight_sync_method=method, server_timeout=240
        ),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )


rollout = one_word_rollout  # the tests' name for one episode of the task


async def gather(model, questions, group_size=4, **kwargs):
    return await art.gather_trajectory_groups(
        [art.TrajectoryGroup(rollout(model, q, **kwargs) for _ in range(group_size)) for q in questions],
        pbar_desc=None,
    )
