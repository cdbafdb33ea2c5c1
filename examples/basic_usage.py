"""The design's "Basic Usage (Auto-detect GPUs)" snippet, with our import path, made runnable.

    BASE_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct .venv/bin/python examples/basic_usage.py

The snippet's lines are unchanged except the import; around them: a rollout that makes `trajectory_groups`
(a one-word-answer task), asyncio.run, and BASE_MODEL (the snippet's model needs its weights on this machine).
"""

import asyncio
import os

import art

from art_sglang import SGLangBackend  # the design: from art.sglang_backend import SGLangBackend
from art_sglang.tasks import ONE_WORD_INSTRUCTION, ONE_WORD_QUESTIONS, one_word_reward


async def rollout(model: art.TrainableModel, question: str) -> art.Trajectory:
    messages = [{"role": "user", "content": question + ONE_WORD_INSTRUCTION}]
    response = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=messages, max_tokens=12, temperature=1.0
    )
    choice = response.choices[0]
    return art.Trajectory(messages_and_choices=[*messages, choice], reward=one_word_reward(choice.message.content))


async def main() -> None:
    # --- the design's snippet -------------------------------------------------------------------------------
    model = art.TrainableModel(
        name="my-model",
        run_name="my-model",
        base_model=os.environ.get("BASE_MODEL", "Qwen/Qwen2.5-3B-Instruct"),
        project="my-project",
    )

    # Auto-detects GPU count:
    # - 2+ GPUs: split mode (recommended)
    # - 1 GPU: shared mode (fallback)
    backend = SGLangBackend()
    await backend.register(model)
    # --- glue: the snippet assumes trajectory groups exist ------------------------------------------------
    await model.register(backend)  # ART's usual entry: starts the server and gives the model its endpoint
    trajectory_groups = await art.gather_trajectory_groups(
        [art.trajectory_group([rollout(model, q) for _ in range(4)]) for q in ONE_WORD_QUESTIONS[:2]]
    )
    # --- the design's snippet -------------------------------------------------------------------------------
    # Everything else works like LocalBackend
    result = await backend.train(model, trajectory_groups)
    # --- glue ---------------------------------------------------------------------------------------------
    print(f"trained step {result.step}; checkpoint {result.checkpoint_path}")
    await model.log(trajectory_groups, metrics=result.metrics, step=result.step, split="train")
    await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
