"""Overlap: the synchronous loop against ART's PipelineTrainer (async RL) on the one-word task, same everything else.

Each mode starts a fresh SGLangBackend on SmolLM2-135M-Instruct (server and trainer one core each on a CPU) and
trains the same number of steps on the same batches of questions (seeded), same learning rate and group size:
- `sync`: rollouts of a step, then `backend.train`, as the demo does;
- `pipeline-1`, `pipeline-2`: `PipelineTrainer` with `max_steps_off_policy` 1 and 2: rollouts for the next steps
  run while a step trains, each under an adapter lease on the step it samples.
Measured per mode: wall time from the first rollout to the last step, steps per hour, the server's idle fraction
(gateway sampled every 50 ms: no request in flight), the mean steps off policy of the trained trajectories (the
backend's `policy/steps_off_policy_mean`, from each reply's served version), the reward of each step's batch, and
the final policy's reward on every question (4 samples each), measured the same way for each mode.

    .venv/bin/python benchmarks/pipeline_overlap.py --out docs/results/pipeline_overlap_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import art  # noqa: E402
from art.pipeline_trainer import PipelineTrainer, make_group_rollout_fn  # noqa: E402
from art.pipeline_tuner.config import PipelineRuntimeConfig  # noqa: E402

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig  # noqa: E402
from art_sglang.tasks import ONE_WORD_QUESTIONS, one_word_rollout  # noqa: E402

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def batches(steps: int, groups: int, seed: int) -> list[list[str]]:
    """The questions of each step, the same for every mode."""
    rng = random.Random(seed)
    return [rng.sample(ONE_WORD_QUESTIONS, k=groups) for _ in range(steps)]


class IdleSampler:
    """The fraction of samples at which the gateway had no request in flight."""

    def __init__(self, backend: SGLangBackend, model: art.TrainableModel, period: float = 0.05) -> None:
        self.gateway, self.period = backend.model_run(model).gateway, period
        self.idle = self.total = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.total += 1
            self.idle += sum(self.gateway.in_flight.values()) <= 0
            await asyncio.sleep(self.period)

    def __enter__(self) -> IdleSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def fraction(self) -> float:
        return self.idle / max(self.total, 1)


async def run_mode(mode: str, args: argparse.Namespace, root: Path) -> dict:
    name = f"overlap-{mode}"
    model = art.TrainableModel(name=name, run_name=name, project="bench", base_model=BASE)
    backend = SGLangBackend(
        path=root,
        sglang_config=SGLangConfig(weight_sync_method="lora", dtype="float32", max_total_tokens=32768),
        trainer_config=TrainerConfig(lora_rank=16, lora_alpha=32, seed=args.seed),
    )
    plan = batches(args.steps, args.groups, args.seed)
    steps: list[dict] = []
    async with backend:
        await model.register(backend)

        async def rollout(question: str) -> art.Trajectory:
            return await one_word_rollout(model, question, max_tokens=args.max_tokens)

        def record(result, groups) -> None:
            rewards = [t.reward for g in groups for t in g.trajectories]
            steps.append(
                {
                    "step": result.step,
                    "wall_s": time.monotonic() - started,
                    "reward": statistics.fmean(rewards),
                    "steps_off_policy_mean": result.metrics.get("policy/steps_off_policy_mean", 0.0),
                    "train_s": result.metrics.get("time/train_s", 0.0),
                }
            )

        started = time.monotonic()
        with IdleSampler(backend, model) as idle:
            if mode == "sync":
                for questions in plan:
                    groups = await art.gather_trajectory_groups(
                        [art.trajectory_group([rollout(q) for _ in range(args.group_size)]) for q in questions],
                        pbar_desc=None,
                    )
                    record(await backend.train(model, groups, learning_rate=args.learning_rate), groups)
            else:
                train = backend.train

                async def recording_train(model, groups, **kwargs):
                    groups = list(groups)
                    result = await train(model, groups, **kwargs)
                    record(result, groups)
                    return result

                backend.train = recording_train

                async def single(model, scenario, config):
                    return await rollout(scenario["question"])

                trainer = PipelineTrainer(
                    model,
                    backend,
                    make_group_rollout_fn(single, n=args.group_size),
                    # the same questions in the same order, cycled: PipelineTrainer leaves out groups whose rewards
                    # are all equal (no gradient), so it needs more than `steps` batches of them
                    [{"question": q} for questions in plan * 3 for q in questions],
                    None,
                    pipeline=PipelineRuntimeConfig(
                        num_rollout_workers=args.groups, min_batch_size=args.groups, max_batch_size=args.groups
                    ),
                    learning_rate=args.learning_rate,
                    max_steps=args.steps,
                    max_steps_off_policy=int(mode.split("-")[1]),
                    eval_every_n_steps=0,
                    eval_at_start=False,
                    log_interval_seconds=3600,
                )
                await trainer.train(handle_signals=False)
        wall = time.monotonic() - started
        # The final policy on every question, the same way for each mode (PipelineTrainer leaves groups whose
        # rewards are all equal out of its batches, so batch rewards alone would favour the synchronous loop).
        final = await art.gather_trajectory_groups(
            [art.trajectory_group([rollout(q) for _ in range(args.group_size)]) for q in ONE_WORD_QUESTIONS],
            pbar_desc=None,
        )
    rewards = [s["reward"] for s in steps]
    return {
        "mode": mode,
        "steps": len(steps),
        "wall_s": wall,
        "steps_per_hour": 3600 * len(steps) / wall,
        "server_idle_fraction": idle.fraction,
        "steps_off_policy_mean": statistics.fmean(s["steps_off_policy_mean"] for s in steps),
        "reward_first": rewards[0],
        "reward_last_two": statistics.fmean(rewards[-2:]),
        "final_reward": statistics.fmean(t.reward for g in final for t in g.trajectories),
        "per_step": steps,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = [s["step"] for s in r["per_step"]]
        rewards = [s["reward"] for s in r["per_step"]]
        ax1.plot(steps, rewards, marker="o", label=r["mode"])
        ax2.plot([s["wall_s"] / 60 for s in r["per_step"]], rewards, marker="o", label=r["mode"])
    ax1.set_xlabel("step")
    ax2.set_xlabel("wall time (min)")
    for ax in (ax1, ax2):
        ax.set_ylabel("mean reward of the step's batch")
        ax.set_ylim(0, 1.05)
        ax.legend()
    fig.suptitle("one-word task, SmolLM2-135M: synchronous loop vs PipelineTrainer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def main(args: argparse.Namespace) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="overlap-") as tmp:
        for mode in args.modes:
            print(f"[overlap] {mode} ...", flush=True)
            results.append(await run_mode(mode, args, Path(tmp)))
            r = results[-1]
            print(
                f"[overlap] {mode}: {r['wall_s']:.0f} s, {r['steps_per_hour']:.1f} steps/h, idle "
                f"{r['server_idle_fraction']:.0%}, off-policy {r['steps_off_policy_mean']:.2f}, batch reward "
                f"{r['reward_first']:.3f} -> {r['reward_last_two']:.3f}, final policy {r['final_reward']:.3f}",
                flush=True,
            )
    base = next((r for r in results if r["mode"] == "sync"), None)
    for r in results:
        r["speedup_vs_sync"] = r["steps_per_hour"] / base["steps_per_hour"] if base else None
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    plot(results, path.with_suffix(".png"))
    print(
        "| mode | wall s | steps/h | vs sync | server idle | steps off policy | batch reward first -> last two "
        "| final policy's reward |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['wall_s']:.0f} | {r['steps_per_hour']:.1f} | {r['speedup_vs_sync']:.2f}x | "
            f"{r['server_idle_fraction']:.0%} | {r['steps_off_policy_mean']:.2f} | {r['reward_first']:.3f} -> "
            f"{r['reward_last_two']:.3f} | {r['final_reward']:.3f} |"
        )
    print(f"[overlap] results: {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--groups", type=int, default=8, help="questions (groups) per step (the demo's 8)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-5)  # the demo's
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=["sync", "pipeline-1", "pipeline-2"])
    p.add_argument("--out", default="docs/results/pipeline_overlap.json")
    asyncio.run(main(p.parse_args()))
