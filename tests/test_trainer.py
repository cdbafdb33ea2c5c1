"""The trainer worker process: learning, checkpoints, merged export, crashes, and data parallelism."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import shutil
import signal
from pathlib import Path

import art
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from trajectories import answer_ids, choice
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from art_sglang.chat import ChatTemplate
from art_sglang.trainer.core import StepOptions, TrainerSettings, replace_dir, restore_replaced
from art_sglang.trainer.data import prepare
from art_sglang.trainer.loss import LossConfig
from art_sglang.trainer.sequence import Sequence
from art_sglang.trainer.worker import TrainerCrashedError, TrainerGroup


@pytest.fixture(scope="module")
def tok(model_path):
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tok):
    """A random 2-layer Llama with SmolLM2's tokenizer: fast enough for process and parallelism tests."""
    path = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def yes_no_groups(tok, n_groups: int = 2, per_group: int = 4) -> list[art.TrajectoryGroup]:
    groups = []
    for g in range(n_groups):
        question = f"Question {g}: answer yes or no. Is water wet?"
        trajectories = []
        for i in range(per_group):
            answer = "yes" if i % 2 == 0 else "no"
            trajectories.append(
                art.Trajectory(
                    messages_and_choices=[
                        {"role": "user", "content": question},
                        choice(tok, answer_ids(tok, answer), [math.nan] * len(answer_ids(tok, answer))),
                    ],
                    reward=1.0 if answer == "yes" else 0.0,
                )
            )
        groups.append(art.TrajectoryGroup(trajectories))
    return groups


def with_logprobs(seqs: list[Sequence], logprobs: list[list[float]]) -> list[Sequence]:
    """Sequences whose sampler logprobs are the given policy's (on-policy data)."""
    out = []
    for s, lps in zip(seqs, logprobs, strict=True):
        full = [math.nan] * len(s)
        positions = s.trained_positions()
        for i, lp in zip(positions, lps, strict=True):
            full[i] = lp
        out.append(Sequence(s.token_ids, full, s.mask, s.advantage, s.weight, s.group))
    return out


def mean_logprob(logprobs: list[list[float]], seqs: list[Sequence], rewarded: bool) -> float:
    """Mean logprob of the answer's first token (the decision) over rewarded or unrewarded sequences."""
    picked = [lp[0] for lp, s in zip(logprobs, seqs, strict=True) if (s.advantage > 0) == rewarded]
    return sum(picked) / len(picked)


async def test_steps_raise_the_probability_of_rewarded_completions(tok, model_path, tmp_path):
    seqs = prepare(yes_no_groups(tok), ChatTemplate(tok), allow_training_without_logprobs=True).sequences
    settings = TrainerSettings(str(model_path), lora_rank=8, lora_alpha=16, threads=1)
    group = TrainerGroup(settings, devices=[], log_dir=tmp_path)
    await group.start()
    try:
        before = await group.logprobs(seqs)
        metrics = None
        for _ in range(3):
            current = await group.logprobs(seqs)
            metrics = await group.train(with_logprobs(seqs, current), StepOptions(learning_rate=2e-4))
            # On-policy data: the engine/trainer gap is zero up to float noise on the first micro-step.
            assert metrics["engine_trainer_logprob_gap"] < 1e-4
        after = await group.logprobs(seqs)
    finally:
        await group.shutdown()
    assert mean_logprob(after, seqs, True) > mean_logprob(before, seqs, True) + 0.5
    assert mean_logprob(after, seqs, False) < mean_logprob(before, seqs, False) - 0.5
    assert metrics["tokens"] == sum(sum(s.mask) for s in seqs)
    assert metrics["grad_norm"] > 0 and math.isfinite(metrics["loss"]) and metrics["entropy"] > 0


async def test_checkpoint_is_plain_peft_atomic_and_resumable(tok, model_path, tmp_path):
    seqs = prepare(yes_no_groups(tok, 1), ChatTemplate(tok), allow_training_without_logprobs=True).sequences
    settings = TrainerSettings(str(model_path), peft_args={"r": 4, "lora_alpha": 8}, threads=1)
    group = TrainerGroup(settings, devices=[], log_dir=tmp_path / "logs")
    await group.start()
    try:
        await group.train(seqs, StepOptions(learning_rate=1e-3))
        ckpt = await group.save_checkpoint(tmp_path / "checkpoints" / "0001", step=1)
        trained = await group.logprobs(seqs)
        export = await group.export_merged(tmp_path / "merged")
        changed = await group.export_merged(tmp_path / "changed", changed_only=True, dtype="bfloat16")
        # A copy: safetensors maps the file, and the next export rewrites it in place.
        before = {k: v.clone() for k, v in load_file(tmp_path / "changed" / "model.safetensors").items()}
        # The next step's export rewrites the same file in place, in the server's dtype or the trainer's.
        await group.train(seqs, StepOptions(learning_rate=1e-3))
        await group.export_merged(tmp_path / "merged2")
        await group.export_merged(tmp_path / "changed", changed_only=True, dtype="bfloat16")
        await group.export_merged(tmp_path / "changed32", changed_only=True)
        await group.load_checkpoint(ckpt)  # back at step 1 for the checks below
    finally:
        await group.shutdown()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0001"]  # no temporary left
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4  # peft_args honoured
    assert export["export_bytes"] > 0 and export["export_seconds"] >= 0

    # Plain PEFT loads the checkpoint and gives the trainer's logprobs.
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, ckpt).eval()
    s = seqs[0]
    with torch.no_grad():
        logits = peft_model(torch.tensor([s.token_ids])).logits[0, :-1]
    targets = torch.tensor(s.token_ids[1:])
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0][torch.tensor(s.mask[1:])]
    assert torch.allclose(lp, torch.tensor(trained[0]), atol=1e-4)

    # The merged export equals the adapter applied to the base.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(torch.tensor([s.token_ids])).logits[0, :-1]
    assert torch.allclose(merged_logits, logits, atol=1e-3)

    # For an in-place update: only the adapted layers, in the server's dtype, equal to the full export's.
    full, part = load_file(tmp_path / "merged" / "model.safetensors"), before
    assert part and all(k.endswith("_proj.weight") for k in part) and "model.embed_tokens.weight" not in part
    assert all(part[k].dtype == torch.bfloat16 and torch.equal(part[k], full[k].bfloat16()) for k in part)
    assert changed["export_bytes"] < export["export_bytes"] / 2
    full2 = load_file(tmp_path / "merged2" / "model.safetensors")
    again, fp32 = (load_file(tmp_path / d / "model.safetensors") for d in ("changed", "changed32"))
    assert not all(torch.equal(again[k], part[k]) for k in part)  # rewritten with the new step
    assert all(torch.equal(again[k], full2[k].bfloat16()) and torch.equal(fp32[k], full2[k]) for k in part)

    # A new worker resumes at the checkpoint's step with the same weights.
    group = TrainerGroup(settings, devices=[], log_dir=tmp_path / "logs")
    await group.start()
    try:
        assert await group.load_checkpoint(ckpt) == 1
        resumed = await group.logprobs(seqs)
        assert [x for row in resumed for x in row] == pytest.approx([x for row in trained for x in row], abs=1e-6)
    finally:
        await group.shutdown()


def listening_addresses(pids: list[int]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses the processes `pids` listen on (TCP, from /proc), IPv4-mapped IPv6 ones as IPv4."""
    sockets = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if (target := os.readlink(fd)).startswith("socket:["):
                    sockets.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in sockets:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
            address = ipaddress.ip_address(raw)
            found.append(getattr(address, "ipv4_mapped", None) or address)
    return found


async def test_two_gloo_workers_equal_one_process(tok, tiny_model, tmp_path):
    seqs = prepare(yes_no_groups(tok, 2, 4), ChatTemplate(tok), allow_training_without_logprobs=True).sequences
    options = StepOptions(learning_rate=1e-2, loss=LossConfig(loss_fn="ppo"))
    adapters = []
    for workers in (1, 2):
        settings = TrainerSettings(str(tiny_model), lora_rank=4, seed=7, threads=1, micro_batch_tokens=64)
        group = TrainerGroup(settings, devices=[], log_dir=tmp_path / f"w{workers}", cpu_workers=workers)
        await group.start()
        try:
            assert len(group.pids) == workers
            metrics = await group.train(seqs, options)
            # The ranks' rendezvous and collectives listen on loopback only (PyTorch's TCP store would listen on
            # every interface).
            assert all(a.is_loopback for a in listening_addresses(group.pids)), listening_addresses(group.pids)
            metrics["sft"] = await group.sft(seqs, 1e-2)  # a supervised step after it: the same over 2 ranks too
            ckpt = await group.save_checkpoint(tmp_path / f"w{workers}" / "ckpt", step=1)
        finally:
            await group.shutdown()
        adapters.append((load_file(str(ckpt / "adapter_model.safetensors")), metrics))
    (one, m1), (two, m2) = adapters
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k
    assert m1["tokens"] == m2["tokens"]
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-4)
    assert (
        m1["sft"]["loss"] == pytest.approx(m2["sft"]["loss"], rel=1e-4) and m1["sft"]["tokens"] == m2["sft"]["tokens"]
    )


async def test_a_dead_worker_raises_clearly_instead_of_hanging(tok, tiny_model, tmp_path):
    settings = TrainerSettings(str(tiny_model), lora_rank=4, threads=1)
    group = TrainerGroup(settings, devices=[], log_dir=tmp_path)
    await group.start()
    pid = group.pids[0]
    os.kill(pid, signal.SIGKILL)
    seqs = prepare(yes_no_groups(tok, 1), ChatTemplate(tok), allow_training_without_logprobs=True).sequences
    with pytest.raises(TrainerCrashedError, match=rf"rank 0 \(pid {pid}\) exited with code -9 during 'train'"):
        await group.train(seqs, StepOptions())
    with pytest.raises(TrainerCrashedError, match="not running"):
        await group.train(seqs, StepOptions())


async def test_a_failing_command_reports_the_worker_traceback(tiny_model, tmp_path):
    group = TrainerGroup(TrainerSettings(str(tiny_model), lora_rank=4, threads=1), devices=[], log_dir=tmp_path)
    await group.start()
    try:
        with pytest.raises(TrainerCrashedError, match="(?s)failed during 'load_checkpoint'.*adapter_model.safetensors"):
            await group.load_checkpoint(tmp_path / "no-such-checkpoint")
    finally:
        await group.shutdown()


async def test_bad_base_model_fails_at_start_with_the_log(tmp_path):
    group = TrainerGroup(TrainerSettings(str(tmp_path / "missing-model")), devices=[], log_dir=tmp_path)
    with pytest.raises(TrainerCrashedError, match="during 'start'"):
        await group.start()
    assert group.pids == []


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_logprobs_and_their_gradient_match_full_vocabulary_autograd(chunk):
    from art_sglang.trainer.core import token_logprobs

    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight, targets = torch.randn(101, 16, generator=g), torch.randint(0, 101, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    lp, entropy = token_logprobs(hidden, weight, targets, chunk)
    (lp * upstream).sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    log_probs = torch.log_softmax(hidden @ weight.T, -1)
    reference = log_probs.gather(-1, targets[:, None])[:, 0]
    (reference * upstream).sum().backward()
    torch.testing.assert_close(lp, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, hidden.grad, atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad


def test_recomputed_activations_and_split_micro_batches_take_the_same_step(tok, tiny_model):
    """Activation checkpointing (ART's default on a GPU, TrainerConfig.gradient_checkpointing) changes memory, not the
    step; a sequence longer than micro_batch_tokens is trained in a micro-batch of its own, not dropped."""
    from art_sglang.trainer.core import PolicyTrainer

    seqs = prepare(yes_no_groups(tok, 2, 4), ChatTemplate(tok), allow_training_without_logprobs=True).sequences
    longest = max(len(s) for s in seqs)
    options = StepOptions(learning_rate=1e-2, loss=LossConfig(loss_fn="ppo"))
    steps = []
    for budget, checkpointing in ((longest * len(seqs), False), (longest - 1, False), (longest - 1, True)):
        settings = TrainerSettings(
            str(tiny_model),
            lora_rank=4,
            seed=3,
            threads=1,
            micro_batch_tokens=budget,
            gradient_checkpointing=checkpointing,
        )
        trainer = PolicyTrainer(settings)
        assert trainer.model.is_activation_checkpointing == checkpointing
        metrics = trainer.train_step(seqs, options)
        steps.append((metrics, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}))
    (whole, reference), *others = steps
    for metrics, adapter in others:
        assert metrics["loss_sum"] == pytest.approx(whole["loss_sum"], rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
        for name, weight in reference.items():
            torch.testing.assert_close(adapter[name], weight, atol=1e-6, rtol=1e-5)
    assert not PolicyTrainer(
        TrainerSettings(str(tiny_model), threads=1)
    ).model.is_activation_checkpointing  # CPU default


def test_right_padding_without_a_mask_changes_no_logprob(tiny_model):
    from art_sglang.trainer.core import PolicyTrainer

    trainer = PolicyTrainer(TrainerSettings(str(tiny_model), threads=1))
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (5, 17, 40):
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        mask = [i >= 2 for i in range(n)]
        seqs.append(Sequence(ids, [math.nan] * n, mask, 1.0, 1.0 / (n - 2), 0))
    together = trainer.sequence_logprobs(seqs)  # one micro-batch, right-padded to 40
    for s, batched in zip(seqs, together, strict=True):
        (alone,) = trainer.sequence_logprobs([s])
        assert len(batched) == len(s) - 2
        torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), atol=1e-5, rtol=1e-5)


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_whole(tiny_model, tmp_path, monkeypatch):
    import errno

    from art_sglang.trainer.core import PolicyTrainer

    trainer = PolicyTrainer(TrainerSettings(str(tiny_model), threads=1))
    first = trainer.save_checkpoint(tmp_path / "checkpoints" / "0001", step=1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def disk_full(*args, **kwargs):  # a failing write, as on a full filesystem
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*0002 \(No space left on device\).*Free space"):
        trainer.save_checkpoint(tmp_path / "checkpoints" / "0002", step=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0001"]  # no partial directory
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_a_resave_keeps_one_complete_copy_at_every_moment(tmp_path):
    target = tmp_path / "0003"
    target.mkdir()
    (target / "adapter").write_text("old")
    new = tmp_path / ".0003.tmp-x"
    new.mkdir()
    (new / "adapter").write_text("new")
    replace_dir(new, target)
    assert (target / "adapter").read_text() == "new" and not list(tmp_path.glob(".*"))
    # A crash after the old copy went aside and before the new one arrived: start-up puts the old one back, and
    # drops a partial write.
    aside = tmp_path / ".0003.old-y"
    aside.mkdir()
    os.rename(target, aside / "0003")
    (tmp_path / ".0004.tmp-z").mkdir()
    restore_replaced(tmp_path)
    assert (target / "adapter").read_text() == "new" and not list(tmp_path.glob(".*"))


def test_merged_exports_refuse_layers_the_checkpoint_names_otherwise(tiny_model, tmp_path):
    """A checkpoint stored without the `model.` prefix loads in transformers, but merged layers saved under the
    loaded model's names would never reach a server reading the checkpoint's: the export says so."""
    from art_sglang.trainer.core import PolicyTrainer

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_model, renamed)
    state = load_file(renamed / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, renamed / "model.safetensors")
    trainer = PolicyTrainer(TrainerSettings(str(renamed), threads=1))
    for changed_only in (False, True):
        with pytest.raises(RuntimeError, match=r"not in the base checkpoint under these names.*'lora'"):
            trainer.export_merged(tmp_path / f"out-{changed_only}", changed_only=changed_only)


def test_a_checkpoint_as_the_kl_reference(tiny_model, tmp_path):
    """ART's kl_penalty_reference_step / kl_ref_adapter_path: the reference is that adapter on the base model, not
    the base model itself, and the policy's own adapter is back in place after the step."""
    from art_sglang.trainer.core import PolicyTrainer

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (24,), generator=g).tolist()
    seq = Sequence(ids, [math.nan] * 24, [i >= 8 for i in range(24)], 1.0, 1.0, 0)
    trainer = PolicyTrainer(TrainerSettings(str(tiny_model), lora_rank=4, threads=1, seed=2))
    for _ in range(3):
        trainer.train_step([seq], StepOptions(1e-2))
    reference = trainer.save_checkpoint(tmp_path / "0003", step=3)
    at_reference = trainer.sequence_logprobs([seq])[0]
    kl = LossConfig(kl_penalty_coef=0.5)

    def kl_of(directory) -> float:
        m = trainer.train_step([seq], StepOptions(1e-9, kl, kl_reference=directory))
        return m["kl_sum"] / m["kl_batches"]

    assert kl_of(str(reference)) == pytest.approx(0.0, abs=1e-6)  # the policy is (to lr 1e-9) its own reference
    from_base = kl_of(None)
    assert abs(from_base) > 1e-3  # the base model differs from the trained policy
    for _ in range(3):
        trainer.train_step([seq], StepOptions(1e-2))
    now = trainer.sequence_logprobs([seq])[0]
    expected = sum(a - b for a, b in zip(now, at_reference, strict=True)) / len(now)
    assert kl_of(str(reference)) == pytest.approx(expected, abs=1e-5)
    # Its own adapter came back (fp32 round-off: 1.9e-6 seen on logprobs near -10; another adapter moves them by more)
    assert trainer.sequence_logprobs([seq])[0] == pytest.approx(now, abs=1e-5)

    other = PolicyTrainer(TrainerSettings(str(tiny_model), lora_rank=8, threads=1))
    with pytest.raises(ValueError, match=r"KL reference adapter .*0003 \(r=4.*does not have the policy's LoRA shape"):
        other.train_step([seq], StepOptions(1e-9, kl, kl_reference=str(reference)))
