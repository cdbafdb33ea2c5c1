"""Where one trainer step spends GPU time: torch.profiler over a step of PolicyTrainer (Qwen2.5-1.5B shape).

python benchmarks/profile_trainer_step.py [--adapter-dtype auto] [--compile layer|model|none]

--compile layer: each decoder layer compiled on its own (the trainer's default on a GPU); model: the whole
backbone as one graph (fewer guards and launches between layers, a longer first compile).
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
    p.add_argument(
        "--compile",
        default="layer",
        help="comma-separated scope[:sdpa], scope in layer, model, none; sdpa in "
        "cudnn (PyTorch's first choice on Hopper), flash; the last is profiled",
    )
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace", default=None, help="also write a Chrome trace (host and GPU) of one step here")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    config = qwen_config(False)
    workdir = tempfile.mkdtemp()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(workdir)
    seqs = make_batch(4, 2048, config.vocab_size, 0)
    opts = StepOptions(learning_rate=1e-5)
    for variant in args.compile.split(","):
        scope, _, sdpa = variant.partition(":")
        torch.backends.cuda.enable_cudnn_sdp(sdpa != "flash")
        trainer = PolicyTrainer(
            TrainerSettings(
                workdir,
                lora_rank=16,
                lora_alpha=32,
                micro_batch_tokens=8192,
                logprob_chunk=2048,
                adapter_dtype=args.adapter_dtype,
                compile=scope == "layer",
            )
        )
        if scope == "model":
            trainer._backbone().compile()
        t0 = time.perf_counter()
        for _ in range(3):
            trainer.train_step(seqs, opts)
        torch.cuda.synchronize()
        print(f"[{variant}] warm-up (3 steps, compile included): {time.perf_counter() - t0:.1f} s")
        times = []
        for _ in range(7):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.train_step(seqs, opts)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step = sorted(times)[3]
        print(
            f"[{variant}] adapter {args.adapter_dtype}: {step * 1000:.1f} ms/step (min {min(times) * 1000:.1f}), "
            f"{4 * 2048 / step:,.0f} tok/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
            flush=True,
        )
        last = variant == args.compile.split(",")[-1]
        if not last:
            del trainer
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if args.trace:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.train_step(seqs, opts)
        torch.cuda.synchronize()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.rows:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
