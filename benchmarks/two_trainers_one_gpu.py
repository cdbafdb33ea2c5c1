"""Two models' trainers on one GPU, as two TrainableModels on one SGLangBackend place them (same training devices).

Each model has its own trainer worker process (TrainerGroup) on the same GPU. Measured: a step alone, then both
trainers stepping at once (each its own batch), the GPU memory in use with one and with two trainers loaded (from
nvidia-smi: the workers are separate processes), and the combined throughput against one trainer alone.

Model: random weights in Qwen2.5-1.5B's shape, bf16, LoRA rank 16 on all linear layers (benchmarks/trainer_gpu.py).

    python benchmarks/two_trainers_one_gpu.py --out results.json     # on a GPU machine
    python benchmarks/two_trainers_one_gpu.py --tiny                 # on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_gpu import make_batch, qwen_config  # noqa: E402

from art_sglang.trainer.core import StepOptions, TrainerSettings  # noqa: E402
from art_sglang.trainer.worker import TrainerGroup  # noqa: E402


def gpu_memory_used_gib() -> float:
    """All processes' memory on GPU 0 (nan without nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return float("nan")
    return float(out.strip()) / 1024


async def steps(group: TrainerGroup, batch, options: StepOptions, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await group.train(batch, options)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


async def measure(path: str, batches: list, n: int, devices: list[int], log_dir: Path) -> dict:
    settings = TrainerSettings(path, lora_rank=16, lora_alpha=32, micro_batch_tokens=8192, logprob_chunk=2048)
    # One optimizer step over the batch per call, after the call's scoring pass (as trainer_gpu.py's dp rows).
    options = StepOptions(learning_rate=1e-5, grad_accumulation_sequences=len(batches[0]))
    groups = [TrainerGroup(settings, devices=devices, log_dir=log_dir / f"model{i}") for i in range(2)]
    idle = gpu_memory_used_gib()
    try:
        await groups[0].start()
        await groups[0].train(batches[0], options)  # warm-up
        alone = await steps(groups[0], batches[0], options, n)
        one_loaded = gpu_memory_used_gib()
        await groups[1].start()
        await groups[1].train(batches[1], options)  # warm-up
        two_loaded = gpu_memory_used_gib()
        t0 = time.perf_counter()
        both = await asyncio.gather(*(steps(g, b, options, n) for g, b in zip(groups, batches, strict=True)))
        both_wall = time.perf_counter() - t0
        two_peak = gpu_memory_used_gib()
    finally:
        await asyncio.gather(*(g.shutdown() for g in groups))
    return {
        "step_seconds_alone": median(alone),
        "step_seconds_side_by_side": [median(t) for t in both],
        "wall_seconds_two_models_n_steps_each": both_wall,
        "wall_seconds_one_model_n_steps": sum(alone),
        # Steps per second of both models together, against one trainer alone on the GPU.
        "combined_throughput_vs_alone": (2 * n / both_wall) / (1 / median(alone)),
        "gpu_memory_gib": {"idle": idle, "one_trainer": one_loaded, "two_trainers": two_loaded, "after": two_peak},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, measures nothing")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    config = qwen_config(args.tiny)
    workdir = Path(tempfile.mkdtemp(prefix="qwen-shape-"))
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(workdir)
    seq = 64 if args.tiny else args.seq
    batches = [make_batch(args.batch, seq, config.vocab_size, seed) for seed in (0, 1)]
    devices = [] if args.tiny else [0]
    result = asyncio.run(measure(str(workdir), batches, args.steps, devices, workdir / "logs"))
    result.update(
        machine=platform.node(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        date=time.strftime("%F %T"),
        batch=args.batch,
        seq=seq,
        steps=args.steps,
        command=" ".join(sys.argv),
    )
    tokens = args.batch * seq
    alone = result["step_seconds_alone"]
    print(f"one trainer alone: {alone:.3f} s/step ({tokens / alone:,.0f} tok/s)")
    for i, s in enumerate(result["step_seconds_side_by_side"]):
        print(f"model {i}, side by side: {s:.3f} s/step")
    print(f"both together: {result['combined_throughput_vs_alone']:.2f}x one trainer's steps/s")
    print("GPU memory (GiB):", {k: round(v, 1) for k, v in result["gpu_memory_gib"].items()})
    shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
