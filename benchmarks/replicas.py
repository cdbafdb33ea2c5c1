"""1 vs 2 SGLang replicas on a GRPO workload: rollout throughput, prefix-cache reuse, and the sync's time.

For each replica count, a real SGLangBackend on SmolLM2-135M-Instruct (CPU, each replica one thread) runs rounds of
GRPO rollouts through ART's client (8 prompts x 4 samples, 24 tokens each, the one-word task's prompts), takes one
RL step (`--method lora`: the adapter loaded on every replica before the route flips; `disk`: the merged layers on
every replica under the gate; `restart`: a rolling restart), and runs the rounds again on the new policy. Same seed,
prompts and settings for both; the replica count is the only difference.

    .venv/bin/python benchmarks/replicas.py --out docs/results/replicas_cpu.json
    .venv/bin/python benchmarks/replicas.py --method restart --rounds 1 --out docs/results/replicas_restart_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import art  # noqa: E402

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig  # noqa: E402
from art_sglang.tasks import ONE_WORD_QUESTIONS, one_word_rollout  # noqa: E402

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


async def rounds(
    model: art.TrainableModel, n: int, group_size: int, max_tokens: int
) -> tuple[dict[str, float], list[art.TrajectoryGroup]]:
    """`n` rounds of one group per prompt: throughput and cache reuse as the engine reported them, and the last
    round's groups."""
    t0 = time.perf_counter()
    prompt = cached = completion = requests = 0
    groups: list[art.TrajectoryGroup] = []
    for _ in range(n):
        groups = await art.gather_trajectory_groups(
            [
                art.trajectory_group([one_word_rollout(model, q, max_tokens=max_tokens) for _ in range(group_size)])
                for q in ONE_WORD_QUESTIONS
            ],
            pbar_desc=None,
        )
        for t in (t for g in groups for t in g.trajectories):
            prompt += t.metrics["prompt_tokens"]
            cached += t.metrics["cached_tokens"]
            completion += len(t.messages_and_choices[-1].logprobs.content or [])
            requests += 1
    seconds = time.perf_counter() - t0
    metrics = {
        "seconds": seconds,
        "requests": requests,
        "requests_per_s": requests / seconds,
        "completion_tokens_per_s": completion / seconds,
        "cache_hit_ratio": cached / prompt if prompt else 0.0,
    }
    return metrics, groups


async def measure(replicas: int, args: argparse.Namespace) -> dict[str, object]:
    backend = SGLangBackend(
        path=tempfile.mkdtemp(prefix=f"replicas-{replicas}-"),
        sglang_config=SGLangConfig(
            dtype="float32",
            max_total_tokens=16384,
            server_timeout=300,
            replicas=replicas,
            weight_sync_method=args.method,
        ),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16, seed=0),
    )
    model = art.TrainableModel(name="bench", run_name=f"r{replicas}", project="bench", base_model=BASE)
    try:
        t0 = time.perf_counter()
        await model.register(backend)
        started = time.perf_counter() - t0
        before, groups = await rounds(model, args.rounds, args.group_size, args.max_tokens)
        result = await backend.train(model, groups, learning_rate=2e-4)
        after, _ = await rounds(model, args.rounds, args.group_size, args.max_tokens)
        run = backend.model_run(model)
        return {
            "replicas": replicas,
            "start_seconds": started,
            "before_step": before,
            "after_step": after,
            "sync_seconds": result.metrics["time/sync_s"],
            "sync": {k.removeprefix("sync/"): v for k, v in result.metrics.items() if k.startswith("sync/")},
            "train_seconds": result.metrics["time/train_s"],
            "requests_by_replica": list(run.gateway.upstreams.sent),
        }
    finally:
        await backend.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["lora", "disk", "restart"], default="lora")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results = [await measure(n, args) for n in (1, 2)]
    one, two = results
    ratio = two["before_step"]["requests_per_s"] / one["before_step"]["requests_per_s"]  # type: ignore[index]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%F %T"),
        "command": " ".join(sys.argv),
        "settings": vars(args) | {"out": str(args.out)},
        "results": results,
        "throughput_2_vs_1": ratio,
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
