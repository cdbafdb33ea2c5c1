"""A backend as the tests configure it, and rollouts of the one-word task through ART's OpenAI client."""

from __future__ import annotations

import art

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig
from art_sglang.tasks import ONE_WORD_INSTRUCTION, one_word_reward

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_backend(path, method: str = "lora") -> SGLangBackend:
    return SGLangBackend(
        path=path,
        sglang_config=SGLangConfig(
            dtype="float32", max_total_tokens=16384, weight_sync_method=method, server_timeout=240
        ),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )


async def rollout(
    model: art.TrainableModel, question: str, max_tokens: int = 12, ignore_eos: bool = False
) -> art.Trajectory:
    messages = [{"role": "user", "content": question + ONE_WORD_INSTRUCTION}]
    response = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,
        max_tokens=max_tokens,
        temperature=1.0,
        extra_body={"ignore_eos": True} if ignore_eos else None,
    )
    choice = response.choices[0]
    cached = (response.usage.prompt_tokens_details.cached_tokens or 0) if response.usage.prompt_tokens_details else 0
    return art.Trajectory(
        messages_and_choices=[*messages, choice],
        reward=one_word_reward(choice.message.content),
        metrics={"cached_tokens": cached, "prompt_tokens": response.usage.prompt_tokens},
        metadata={"weight_version": (response.model_extra.get("metadata") or {}).get("weight_version")},
    )


async def gather(model, questions, group_size=4, **kwargs):
    return await art.gather_trajectory_groups(
        [art.TrajectoryGroup(rollout(model, q, **kwargs) for _ in range(group_size)) for q in questions],
        pbar_desc=None,
    )
