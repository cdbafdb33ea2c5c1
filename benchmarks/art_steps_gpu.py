"""ART's optimizer steps on GPUs: what a train() call costs with one step per sequence (ART's LocalBackend) against one
step over the batch (`grad_accumulation_sequences` = the batch), on one GPU and data parallel over all visible ones;
and the options that take their own path on a GPU (bf16 autocast): a checkpoint as the KL reference, precalculated
logprobs with truncated importance sampling.

Model: random weights in Qwen2.5-1.5B's shape (benchmarks/trainer_gpu.py), bf16, LoRA rank 16 on all linear layers.
Batch: B sequences of S tokens (a quarter prompt), as trainer_gpu.py builds them, in groups of 4.

    python benchmarks/art_steps_gpu.py --out results.json      # on a GPU machine (2 GPUs for the data-parallel rows)
    python benchmarks/art_steps_gpu.py --tiny                   # a smoke test on the CPU, measures nothing
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_gpu import make_batch, qwen_config  # noqa: E402

from art_sglang.trainer.core import StepOptions, TrainerSettings  # noqa: E402
from art_sglang.trainer.loss import LossConfig  # noqa: E402
from art_sglang.trainer.worker import TrainerGroup  # noqa: E402


async def timed_calls(group: TrainerGroup, seqs, options: StepOptions, calls: int) -> dict:
    await group.train(seqs, options)  # warm-up (compiles, and ART's warm-up step)
    times, metrics = [], {}
    for _ in range(calls):
        t0 = time.perf_counter()
        metrics = await group.train(seqs, options)
        times.append(time.perf_counter() - t0)
    call = sorted(times)[len(times) // 2]
    tokens = sum(len(s) for s in seqs)
    return {"call_seconds": call, "tokens_per_second": tokens / call, "optimizer_steps": metrics["optimizer_steps"]}


async def main_async(args: argparse.Namespace) -> dict:
    config = qwen_config(args.tiny)
    workdir = Path(tempfile.mkdtemp(prefix="qwen-shape-"))
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(workdir)
    seqs = [
        dataclasses.replace(s, group=i // 4)
        for i, s in enumerate(make_batch(args.batch, args.seq, config.vocab_size, 0))
    ]
    gpus = torch.cuda.device_count()
    results: dict = {
        "machine": platform.node(),
        "gpu": torch.cuda.get_device_name(0) if gpus else "cpu",
        "gpus": gpus,
        "torch": torch.__version__,
        "date": time.strftime("%F %T"),
        "batch": args.batch,
        "seq": args.seq,
    }
    for n in sorted({1, max(gpus, 1)}):
        settings = TrainerSettings(
            str(workdir), lora_rank=16, lora_alpha=32, micro_batch_tokens=8192, logprob_chunk=2048
        )
        group = TrainerGroup(settings, devices=list(range(n)) if gpus else [], log_dir=workdir / f"logs{n}")
        await group.start()
        try:
            art = await timed_calls(group, seqs, StepOptions(1e-5), args.calls)
            batch = await timed_calls(group, seqs, StepOptions(1e-5, grad_accumulation_sequences=len(seqs)), args.calls)
            results[f"{n}gpu_art_default"] = art
            results[f"{n}gpu_one_step_per_call"] = batch
            print(
                f"{n} GPU(s): ART's steps {art['call_seconds']:.2f} s a call ({art['tokens_per_second']:,.0f} tok/s, "
                f"{art['optimizer_steps']:.0f} steps); one step {batch['call_seconds']:.2f} s "
                f"({batch['tokens_per_second']:,.0f} tok/s)",
                flush=True,
            )
            if n == 1:  # the GPU paths of the options: a checkpoint as KL reference; precalculated logprobs
                reference = await group.save_checkpoint(workdir / "ckpt" / "0001", step=1)
                await group.train(seqs, StepOptions(1e-5))
                loss = LossConfig(kl_penalty_coef=0.1, truncated_importance_sampling=2.0)
                options = StepOptions(1e-5, loss, kl_reference=str(reference), precalculate_logprobs=True)
                m = await group.train(seqs, options)
                results["options_check"] = {k: m[k] for k in ("loss", "grad_norm", "kl_policy_ref", "optimizer_steps")}
                assert all(math.isfinite(v) for v in results["options_check"].values()), results["options_check"]
                assert m["kl_policy_ref"] != 0.0  # the policy moved since the reference checkpoint
                print(f"options check: {results['options_check']}", flush=True)
        finally:
            await group.shutdown()
    if gpus > 1:
        for kind in ("art_default", "one_step_per_call"):
            results[f"dp_scaling_{kind}"] = (
                results[f"{gpus}gpu_{kind}"]["tokens_per_second"] / results[f"1gpu_{kind}"]["tokens_per_second"]
            )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, measures nothing")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.batch, args.seq, args.calls = 4, 64, 1
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
