"""Trainer throughput on a GPU: our PolicyTrainer against a plain transformers + PEFT loop, side by side.

Model: random weights in Qwen2.5-1.5B's shape, bf16, LoRA rank 16 (alpha 32) on all linear layers, AdamW.
Batch: B sequences of S tokens, the first quarter prompt (not trained), the rest sampled tokens.
The plain loop computes full-vocabulary logits and log_softmax, as a straightforward implementation does.
Also measured: checkpoint save, adapter save_pretrained, merged export, offload/reload, and data-parallel
scaling over the visible GPUs (one worker process per GPU, NCCL).

    python benchmarks/trainer_gpu.py --out results.json            # on a GPU machine
    python benchmarks/trainer_gpu.py --tiny --device cpu            # a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from art_sglang.config import ALL_LINEAR  # noqa: E402
from art_sglang.trainer.core import PolicyTrainer, StepOptions, TrainerSettings  # noqa: E402
from art_sglang.trainer.sequence import Sequence  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM datasheet


def qwen_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )


def make_batch(batch: int, seq: int, vocab: int, seed: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed)
    prompt = seq // 4
    out = []
    for b in range(batch):
        ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
        mask = [False] * prompt + [True] * (seq - prompt)
        lps = [math.nan] * prompt + (-torch.rand(seq - prompt, generator=g) * 5).tolist()
        out.append(Sequence(ids, lps, mask, 1.0 if b % 2 else -1.0, 1.0 / (seq - prompt), b))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def lora_config(r: int = 16):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM")


def plain_loop(path: str, seqs: list[Sequence], steps: int, warmup: int, device: str, checkpointing: bool) -> dict:
    """The baseline: full-vocab logits, log_softmax, a policy-gradient loss, AdamW. Nothing else."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config()).to(device)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.tensor([s.token_ids for s in seqs], device=device)
    mask = torch.tensor([s.mask for s in seqs], device=device)[:, 1:].float()
    adv = torch.tensor([s.advantage for s in seqs], device=device)[:, None]
    reset_peak(device)
    times = []
    try:
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            logits = model(input_ids=ids).logits[:, :-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            loss = -(adv * logprobs * mask).sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del logits, logprobs, loss
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        result = {"step_seconds": sorted(times)[len(times) // 2], "peak_gib": peak_gib(device), "oom": False}
    except torch.OutOfMemoryError:
        result = {"step_seconds": float("nan"), "peak_gib": peak_gib(device), "oom": True}
    del model, opt, params
    reset_peak(device)
    return result


def ours(
    path: str,
    seqs: list[Sequence],
    steps: int,
    warmup: int,
    device: str,
    micro_tokens: int,
    extras: bool,
    adapter_dtype: str = "float32",
) -> dict:
    settings = TrainerSettings(
        path,
        lora_rank=16,
        lora_alpha=32,
        device=device,
        micro_batch_tokens=micro_tokens,
        logprob_chunk=2048,
        adapter_dtype=adapter_dtype,
    )
    trainer = PolicyTrainer(settings)
    reset_peak(device)
    times = []
    result: dict = {}
    try:
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            trainer.train_step(seqs, StepOptions(learning_rate=1e-5))
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        result = {"step_seconds": sorted(times)[len(times) // 2], "peak_gib": peak_gib(device), "oom": False}
    except torch.OutOfMemoryError:
        result = {"step_seconds": float("nan"), "peak_gib": peak_gib(device), "oom": True}
    if extras and not result["oom"]:
        tmp = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        try:
            t0 = time.perf_counter()
            trainer.model.save_pretrained(tmp / "plain-adapter")
            result["adapter_save_pretrained_seconds"] = time.perf_counter() - t0
            result["adapter_bytes"] = (tmp / "plain-adapter" / "adapter_model.safetensors").stat().st_size
            t0 = time.perf_counter()
            trainer.save_checkpoint(tmp / "ckpt" / "0001", step=1)
            result["checkpoint_seconds"] = time.perf_counter() - t0
            result.update(trainer.export_merged(tmp / "merged"))
            result.update(trainer.offload())
            result.update(trainer.reload())
            sync(device)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    del trainer
    reset_peak(device)
    return result


async def data_parallel(path: str, seqs: list[Sequence], steps: int, gpus: int, log_dir: Path) -> dict:
    from art_sglang.trainer.worker import TrainerGroup

    out = {}
    for n in sorted({1, gpus}):
        settings = TrainerSettings(path, lora_rank=16, lora_alpha=32, micro_batch_tokens=8192, logprob_chunk=2048)
        group = TrainerGroup(settings, devices=list(range(n)), log_dir=log_dir / f"dp{n}")
        await group.start()
        # One optimizer step over the whole batch per call (ART's default, one per sequence, leaves ranks idle),
        # after the call's no-gradient scoring pass over the batch.
        options = StepOptions(learning_rate=1e-5, grad_accumulation_sequences=len(seqs))
        try:
            await group.train(seqs, options)  # warm-up
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                await group.train(seqs, options)
                times.append(time.perf_counter() - t0)
        finally:
            await group.shutdown()
        out[n] = sorted(times)[len(times) // 2]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model: checks the script, measures nothing")
    p.add_argument("--skip-plain-large", action="store_true")
    p.add_argument("--dp", action="store_true", help="also measure data-parallel scaling over all visible GPUs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = args.device

    config = qwen_config(args.tiny)
    workdir = Path(tempfile.mkdtemp(prefix="qwen-shape-"))
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir)
    del model
    flops_per_token = 6 * n_params + 6 * config.num_hidden_layers * config.hidden_size * args.seq  # + attention

    def tps(step_seconds: float, batch: int) -> float:
        return batch * args.seq / step_seconds

    rows = []
    results: dict = {
        "machine": platform.node(),
        "torch": torch.__version__,
        "params": n_params,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "date": time.strftime("%F %T"),
        "batch": args.batch,
        "seq": args.seq,
    }
    small = make_batch(args.batch, args.seq, config.vocab_size, 0)
    large = make_batch(2 * args.batch, args.seq, config.vocab_size, 1)
    runs = [
        ("plain", args.batch, lambda: plain_loop(str(workdir), small, args.steps, args.warmup, device, False)),
        ("plain+ckpt", args.batch, lambda: plain_loop(str(workdir), small, args.steps, args.warmup, device, True)),
        (
            "ours",
            args.batch,
            lambda: ours(str(workdir), small, args.steps, args.warmup, device, args.batch * args.seq, True),
        ),
        (
            "ours-bf16-lora",
            args.batch,
            lambda: ours(str(workdir), small, args.steps, args.warmup, device, args.batch * args.seq, False, "auto"),
        ),
        (
            "ours",
            2 * args.batch,
            lambda: ours(str(workdir), large, args.steps, args.warmup, device, args.batch * args.seq, False),
        ),
    ]
    if not args.skip_plain_large:
        runs.insert(
            1,
            ("plain", 2 * args.batch, lambda: plain_loop(str(workdir), large, args.steps, args.warmup, device, False)),
        )
    for name, batch, run in runs:
        r = run()
        r["tokens_per_second"] = tps(r["step_seconds"], batch) if not r["oom"] else float("nan")
        r["mfu"] = r["tokens_per_second"] * flops_per_token / H100_BF16_PEAK
        results[f"{name}@{batch}x{args.seq}"] = r
        rows.append((f"{name} {batch}x{args.seq}", r))
        speed = "OOM" if r["oom"] else f"{r['tokens_per_second']:,.0f} tok/s"
        print(f"{name:>11} {batch}x{args.seq}: {speed}  MFU {r['mfu']:.1%}  peak {r['peak_gib']:.1f} GiB", flush=True)
    base = results[f"plain@{args.batch}x{args.seq}"]["tokens_per_second"]
    results["speedup_vs_plain"] = results[f"ours@{args.batch}x{args.seq}"]["tokens_per_second"] / base
    print(f"ours / plain at {args.batch}x{args.seq}: {results['speedup_vs_plain']:.2f}x")
    extras = results[f"ours@{args.batch}x{args.seq}"]
    for k in (
        "adapter_bytes",
        "adapter_save_pretrained_seconds",
        "checkpoint_seconds",
        "export_seconds",
        "export_bytes",
        "offload_seconds",
        "reload_seconds",
    ):
        if k in extras:
            print(f"  {k}: {extras[k]:.3f}" if "seconds" in k else f"  {k}: {extras[k]:,.0f}")
    if args.dp and device.startswith("cuda"):
        gpus = torch.cuda.device_count()
        dp = asyncio.run(data_parallel(str(workdir), large, args.steps, gpus, workdir / "logs"))
        results["data_parallel_step_seconds"] = dp
        for n, sec in dp.items():
            print(f"data parallel on {n} GPU(s): {tps(sec, 2 * args.batch):,.0f} tok/s ({dp[1] / sec:.2f}x of 1 GPU)")
    shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
