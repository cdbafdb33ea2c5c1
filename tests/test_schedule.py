"""ART's optimizer steps per train() call (trainer/schedule.py): the rows, their weights and advantages against
ART's own packing, the number of steps, and one step's update against ART's loss and optimizer settings."""

from __future__ import annotations

import math

import pytest
import torch
from art.preprocessing.pack import packed_tensors_from_tokenized_results
from art.preprocessing.tokenize import TokenizedResult
from art_compat import art_loss
from test_trainer import tiny_model, tok  # noqa: F401  (fixtures)

from art_sglang.trainer.core import PolicyTrainer, StepOptions, TrainerSettings
from art_sglang.trainer.loss import LossConfig
from art_sglang.trainer.schedule import WARMUP_TOKENS, art_rows, optimizer_batches, warmup_row, with_precalculated
from art_sglang.trainer.sequence import Sequence
from art_sglang.trainer.worker import TrainerGroup


def random_sequences(n: int, seed: int = 0, groups: int = 3) -> list[Sequence]:
    """Sequences as prepare() makes them: a prompt, a sampled reply with logprobs, ART's weight 1 / reply tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, reply = int(torch.randint(4, 9, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(0, 1000, (prompt + reply,), generator=g).tolist()
        mask = [t >= prompt for t in range(prompt + reply)]
        logprobs = [-float(torch.rand(1, generator=g)) * 3 if m else math.nan for m in mask]
        advantage = float(torch.randn(1, generator=g))
        out.append(Sequence(ids, logprobs, mask, advantage, 1.0 / reply, i % groups))
    return out


def arts_rows(sequences: list[Sequence]) -> dict[tuple[int, ...], tuple[float, float]]:
    """ART's packing, unpacked as its LocalBackend runs it: each row's (weight, advantage), by its tokens."""
    results = [
        TokenizedResult(
            advantage=s.advantage,
            chat="",
            token_ids=s.token_ids,
            input_pos=list(range(len(s))),
            assistant_mask=[int(m) for m in s.mask],
            logprobs=s.logprobs,
            pixel_values=None,
            image_grid_thw=None,
            trajectory=None,
            choice_offsets=[],
            extra_logprobs={},
            _tokenizer=None,
            weight=s.weight,
            prompt_id=s.group,
        )
        for s in sequences
    ]
    packed = packed_tensors_from_tokenized_results(results, 32, pad_token_id=0, pack_results=False)
    out = {}
    for r in range(packed["tokens"].shape[0]):
        mask = packed["assistant_mask"][r]
        n = int((packed["group_ids"][r] != -1).sum())
        out[tuple(packed["tokens"][r, :n].tolist())] = (
            packed["weights"][r][mask][0].item(),
            packed["advantages"][r][mask][0].item(),
        )
    return out


def test_rows_weights_and_advantages_equal_arts_packing():
    sequences = random_sequences(7)
    ours = art_rows(sequences)
    expected = arts_rows(sequences)
    assert len(ours) == len(expected) == 7
    for s in ours:
        weight, advantage = expected[tuple(s.token_ids)]
        assert s.weight == pytest.approx(weight, rel=1e-5) and s.advantage == pytest.approx(advantage, rel=1e-5)
    # ART 0.5.23's order: seeded shuffles, so the same call gives the same order every time.
    assert [s.token_ids for s in art_rows(sequences)] == [s.token_ids for s in ours]
    assert sorted(map(tuple, (s.token_ids for s in ours))) == sorted(map(tuple, (s.token_ids for s in sequences)))


def test_optimizer_batches_and_the_warmup_row():
    rows = random_sequences(7)
    assert [len(b) for b in optimizer_batches(rows, 1)] == [1] * 7  # ART's LocalBackend: one row a step
    assert [len(b) for b in optimizer_batches(rows, 3)] == [3, 3, 1]
    long = Sequence(list(range(3000)), [math.nan] * 3000, [True] * 3000, 1.0, 1.0, 0)
    assert len(warmup_row(long)) == WARMUP_TOKENS == 1024


def test_one_optimizer_step_equals_arts_loss_and_optimizer(tiny_model):  # noqa: F811
    """Our step on one row against a plain PEFT model trained with `art.loss.loss_fn` on ART's packed row, then
    clipped at 0.1 and stepped with AdamW as ART's trainer arguments set it (betas 0.9/0.99, weight decay 0.1)."""
    settings = TrainerSettings(str(tiny_model), lora_rank=4, threads=1, seed=5)
    sequences = random_sequences(4, seed=1, groups=2)
    ours = PolicyTrainer(settings)
    reference = PolicyTrainer(settings)  # the same initial adapter
    config = LossConfig(loss_fn="ppo", kl_penalty_coef=0.0)
    for _ in range(2):  # the second step starts from AdamW moments, as every step after ART's first
        rows = art_rows(sequences)
        row = rows[0]
        ours.train_step([row], StepOptions(1e-2, config, step_sequences=1))

        results = arts_rows(sequences)
        weight, advantage = results[tuple(row.token_ids)]
        n = len(row)
        inputs = {
            "tokens": torch.tensor([row.token_ids]),
            "logprobs": torch.tensor([row.logprobs]),
            "advantages": torch.tensor([[advantage if m else 0.0 for m in row.mask]]),
            "weights": torch.tensor([[weight if m else 0.0 for m in row.mask]]),
            "assistant_mask": torch.tensor([row.mask]),
            "group_ids": torch.zeros(1, n, dtype=torch.long),
        }
        model = reference.model
        model.train()
        logits = model(input_ids=inputs["tokens"]).logits.float()
        next_ids = torch.nn.functional.pad(inputs["tokens"][:, 1:], (0, 1), value=0)
        new_logprobs = torch.log_softmax(logits, -1).gather(-1, next_ids[..., None])[..., 0]
        art_loss(inputs, new_logprobs, None, {"ppo": True}).policy_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.params, 0.1)
        for group in reference.optimizer.param_groups:
            group.update(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
        reference.optimizer.step()
        reference.optimizer.zero_grad()
        for mine, theirs in zip(ours.params, reference.params, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)  # 0.1% of an AdamW step at lr 1e-2
    assert any(p.abs().sum() > 0 for p in ours.params if p.shape[0] > p.shape[1])  # lora_B moved off zero


@pytest.mark.slow
async def test_a_call_takes_one_step_per_row_plus_arts_warmup_once(tok, tiny_model, tmp_path):  # noqa: F811
    sequences = random_sequences(5, seed=2)
    group = TrainerGroup(TrainerSettings(str(tiny_model), lora_rank=4, threads=1), devices=[], log_dir=tmp_path)
    await group.start()
    try:
        first = await group.train(sequences, StepOptions(1e-3))
        second = await group.train(sequences, StepOptions(1e-3, grad_accumulation_sequences=2))
        checkpoint = await group.save_checkpoint(tmp_path / "ckpt", step=2)
        await group.shutdown()
        await group.start()  # a new trainer process warms up again, as ART's
        third = await group.train(sequences, StepOptions(1e-3))
    finally:
        await group.shutdown()
    assert (first["optimizer_steps"], first["warmup_steps"]) == (5, 1)
    assert (second["optimizer_steps"], second["warmup_steps"]) == (3, 0)
    assert (third["optimizer_steps"], third["warmup_steps"]) == (5, 1)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {1 + 5 + 3}  # AdamW's own count of its steps
    assert first["tokens"] == sum(sum(s.mask[1:]) for s in sequences)


def test_precalculated_logprobs_replace_the_samplers_as_the_old_policy(tiny_model):  # noqa: F811
    """ART's precalculate_logprobs: the ratio is taken against the policy before the call's first update, whatever
    the sampler reported; so a step on wildly wrong sampler logprobs equals one on unknown ones (treated as the
    current policy), and the sampler's are kept as the original ones."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (30,), generator=g).tolist()
    mask = [i >= 10 for i in range(30)]
    updates = []
    for logprobs, precalculate in (([math.nan] * 30, False), ([-20.0] * 30, True)):
        trainer = PolicyTrainer(TrainerSettings(str(tiny_model), threads=1, seed=3))
        sequence = Sequence(ids, logprobs, mask, 1.0, 1.0, 0)
        if precalculate:
            (sequence,) = with_precalculated([sequence], trainer.sequence_logprobs([sequence]))
            assert sequence.original_logprobs == logprobs
        metrics = trainer.train_step([sequence], StepOptions(1e-2, LossConfig()))
        updates.append((metrics["loss_sum"], trainer.sequence_logprobs([sequence])[0]))
    (loss_a, after_a), (loss_b, after_b) = updates
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert after_a == pytest.approx(after_b, abs=1e-6)
