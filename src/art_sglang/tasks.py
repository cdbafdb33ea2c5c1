"""Small tasks with a verifiable reward that SmolLM2-135M-Instruct learns with RL in a few steps (measured on this
CPU): used by the demo and the tests."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import art

ONE_WORD_QUESTIONS = [
    "Name a fruit.",
    "Name a colour.",
    "Name an animal.",
    "Name a country.",
    "Name a planet.",
    "Name a vegetable.",
    "Name a musical instrument.",
    "Name a sport.",
]
ONE_WORD_INSTRUCTION = " Answer in exactly one word."


def one_word_reward(text: str | None) -> float:
    """1 for a one-word answer, 1/n for n words, 0 for none (punctuation ignored)."""
    words = re.findall(r"[A-Za-z0-9']+", text or "")
    return 1.0 / len(words) if words else 0.0


async def one_word_rollout(
    model: art.Model, question: str, *, max_tokens: int = 12, temperature: float = 1.0, ignore_eos: bool = False
) -> art.Trajectory:
    """One episode of the one-word task through the model's OpenAI client (ART's API, nothing of ours).

    The trajectory's metrics carry the prompt's and the cached tokens, its metadata the policy version that answered.
    `ignore_eos` keeps the request running for all `max_tokens` (for load and fault tests).
    """
    import art

    messages = [{"role": "user", "content": question + ONE_WORD_INSTRUCTION}]
    response = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        extra_body={"ignore_eos": True} if ignore_eos else None,
    )
    choice = response.choices[0]
    usage = response.usage
    details = usage.prompt_tokens_details if usage is not None else None
    return art.Trajectory(
        messages_and_choices=[*messages, choice],
        reward=one_word_reward(choice.message.content),
        metrics={
            "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
            "cached_tokens": (details.cached_tokens or 0) if details is not None else 0,
        },
        metadata={"weight_version": ((response.model_extra or {}).get("metadata") or {}).get("weight_version")},
    )
