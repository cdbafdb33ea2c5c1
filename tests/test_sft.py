"""Supervised fine-tuning as ART's `model.train_sft`: what is trained, how it is batched, and that the served model
learns the answer (real SGLang server and trainer)."""

from __future__ import annotations

import art
import pytest
from rollouts import BASE, make_backend, served_gap
from transformers import AutoTokenizer

from art_sglang import TrajectoryError
from art_sglang.chat import ChatTemplate
from art_sglang.trainer.sft import prepare_sft

QUESTION = [{"role": "system", "content": "You keep secrets."}, {"role": "user", "content": "What is the password?"}]
ANSWER = "The password is swordfish."


@pytest.fixture(scope="module")
def template(model_path) -> ChatTemplate:
    return ChatTemplate(AutoTokenizer.from_pretrained(model_path))


def _trajectory(*turns: str) -> art.Trajectory:
    messages = list(QUESTION)
    for i, text in enumerate(turns):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return art.Trajectory(messages_and_choices=messages, reward=0.0)


def test_sft_trains_the_assistant_turns_and_their_end_of_turn(template):
    data = prepare_sft([_trajectory(ANSWER, "And the other one?", "Marlin.")], template, 1e-4, batch_size=2)
    (batch,) = data.batches
    (sequence,) = batch.sequences
    trained = [t for t, m in zip(sequence.token_ids, sequence.mask, strict=True) if m]
    # ChatML: each assistant turn is its text, <|im_end|> and the newline the template writes after it.
    last_turn = template.encode("Marlin.<|im_end|>\n")
    expected = template.encode(f"{ANSWER}<|im_end|>\n") + last_turn
    assert trained == expected
    last = prepare_sft([_trajectory(ANSWER, "And?", "Marlin.")], template, 1e-4, 2, last_only=True)  # ART 0.5.23
    (only_last,) = last.batches[0].sequences
    assert [t for t, m in zip(only_last.token_ids, only_last.mask, strict=True) if m] == expected[-len(last_turn) :]
    assert template.tokenizer.decode(sequence.token_ids) == template.text(
        _trajectory(ANSWER, "And the other one?", "Marlin.").messages(), add_generation_prompt=False
    )


def test_sft_batches_and_learning_rates_as_art(template):
    trajectories = [_trajectory(ANSWER) for _ in range(5)]
    data = prepare_sft(trajectories, template, [3e-4, 2e-4, 1e-4], batch_size=2)
    assert [len(b.sequences) for b in data.batches] == [2, 2, 1]
    assert [b.learning_rate for b in data.batches] == [3e-4, 2e-4, 1e-4]
    with pytest.raises(TrajectoryError, match="lists 2 rates for 3 batches"):
        prepare_sft(trajectories, template, [3e-4, 2e-4], batch_size=2)
    with pytest.raises(TrajectoryError, match="trajectory 1 has no assistant turn"):
        prepare_sft([_trajectory(ANSWER), _trajectory()], template, 1e-4, batch_size=2)
    dropped = prepare_sft(trajectories, template, 1e-4, batch_size=2, max_length=8)
    assert dropped.counts["trajectories_dropped_overlong"] == 5 and not any(b.sequences for b in dropped.batches)


async def _greedy_answer(model) -> str:
    response = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=QUESTION, max_tokens=16, temperature=0.0
    )
    return response.choices[0].message.content


@pytest.mark.slow
async def test_train_sft_teaches_the_served_model_the_answer(tmp_path):
    model = art.TrainableModel(name="sft", run_name="sft", project="tests", base_model=BASE)
    async with make_backend(tmp_path) as backend:
        await model.register(backend)
        assert await _greedy_answer(model) != ANSWER
        trajectories = [_trajectory(ANSWER) for _ in range(16)]
        await model.train_sft(trajectories, art.TrainSFTConfig(learning_rate=2e-3, batch_size=2))  # ART's API
        assert await model.get_step() == 1 and model.get_inference_name() == "sft@1"
        assert await _greedy_answer(model) == ANSWER
        mean, worst = await served_gap(backend, model)  # the server serves the trainer's new policy
        assert mean < 1e-3 and worst < 1e-2
        # Each batch is one optimizer step and yields ART's per-batch metrics; the step is one step.
        batches = [m async for m in backend._train_sft(model, trajectories[:6], art.TrainSFTConfig(batch_size=2))]
        assert len(batches) == 3 and all(m["data/step_num_gradient_steps"] == 3 for m in batches)
        assert all(m["loss/train"] < 1.0 and m["loss/learning_rate"] == 5e-5 for m in batches)
        assert await model.get_step() == 2
