"""Where one trainer step spends GPU time: torch.profiler over a step of PolicyTrainer (Qwen2.5-1.5B shape).

python benchmarks/profile_trainer_step.py [--adapter-dtype auto] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trainer_gpu import make_batch, qwen_config  # noqa: E402

from art_sglang.trainer.core import PolicyTrainer, StepOptions, TrainerSettings  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adapter-dtype", default="float32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    config = qwen_config(False)
    workdir = tempfile.mkdtemp()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(workdir)
    trainer = PolicyTrainer(
        TrainerSettings(
            workdir,
            lora_rank=16,
            lora_alpha=32,
            micro_batch_tokens=8192,
            logprob_chunk=2048,
            adapter_dtype=args.adapter_dtype,
            compile=args.compile,
        )
    )
    seqs = make_batch(4, 2048, config.vocab_size, 0)
    opts = StepOptions(learning_rate=1e-5)
    t0 = time.perf_counter()
    for _ in range(3):
        trainer.train_step(seqs, opts)
    torch.cuda.synchronize()
    print(f"warm-up (3 steps, compile included): {time.perf_counter() - t0:.1f} s")
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step(seqs, opts)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = sorted(times)[2]
    print(
        f"adapter {args.adapter_dtype} compile={args.compile}: {step * 1000:.0f} ms/step, {4 * 2048 / step:,.0f} tok/s"
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.train_step(seqs, opts)
        torch.cuda.synchronize()
    if args.rows:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
