"""`art-sglang demo`: train SmolLM2-135M-Instruct with RL through SGLangBackend until it visibly learns.

The task: answer questions in exactly one word (reward 1/number of words). The base model rambles; a few steps
of GRPO teach it brevity. Each step prints one table row; at the end a plot of the reward and of where each
step's time went is saved in the model's directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

TASKS = ("one-word",)


@dataclass
class StepRow:
    step: int
    reward_mean: float
    reward_std: float
    rollout_s: float
    train_s: float
    sync_s: float
    sync_method: str
    rollout_tok_s: float
    cache_hit: float
    logprob_gap: float
    prep_s: float = 0.0  # inside train(): persisting the trajectories, tokenizing, waiting for the lock
    other_s: float = 0.0  # outside rollout and train(): logging, the plot's bookkeeping
    wall_s: float = 0.0  # the whole step, rollout to logged


HEADER = ("step", "reward", "± std", "rollout s", "train s", "sync s", "tok/s", "cache hit", "lp gap")


def format_row(r: StepRow) -> str:
    return (
        f"{r.step:>4}  {r.reward_mean:>6.3f}  {r.reward_std:>5.3f}  {r.rollout_s:>9.1f}  {r.train_s:>7.1f}  "
        f"{r.sync_s:>6.3f} {r.sync_method:<7} {r.rollout_tok_s:>6.0f}  {r.cache_hit:>8.0%}  {r.logprob_gap:>7.1e}"
    )


def header() -> str:
    return (
        f"{HEADER[0]:>4}  {HEADER[1]:>6}  {HEADER[2]:>5}  {HEADER[3]:>9}  {HEADER[4]:>7}  "
        f"{HEADER[5]:>6} {'(method)':<7} {HEADER[6]:>6}  {HEADER[7]:>8}  {HEADER[8]:>7}"
    )


def plot(rows: list[StepRow], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    means = [r.reward_mean for r in rows]
    ax1.plot(steps, means, marker="o", label="mean reward")
    ax1.fill_between(
        steps,
        [m - r.reward_std for m, r in zip(means, rows, strict=True)],
        [m + r.reward_std for m, r in zip(means, rows, strict=True)],
        alpha=0.2,
        label="± std",
    )
    ax1.set_xlabel("step (policy that sampled)")
    ax1.set_ylabel("reward")
    ax1.set_ylim(0, 1.05)
    ax1.set_title("reward")
    ax1.legend()
    bottom = [0.0] * len(rows)
    for name, values in (
        ("rollout", [r.rollout_s for r in rows]),
        ("train", [r.train_s for r in rows]),
        ("sync", [r.sync_s for r in rows]),
        ("other", [r.prep_s + r.other_s for r in rows]),
    ):
        ax2.bar(steps, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax2.set_xlabel("step")
    ax2.set_ylabel("seconds")
    ax2.set_title("where each step's time went")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


async def run(args: argparse.Namespace) -> list[StepRow]:
    import art
    from tqdm.auto import tqdm

    from .backend import SGLangBackend
    from .config import SGLangConfig, TrainerConfig
    from .tasks import ONE_WORD_QUESTIONS, one_word_rollout

    rng = random.Random(args.seed)
    model = art.TrainableModel(name=args.name, run_name=args.name, project=args.project, base_model=args.model)
    backend = SGLangBackend(
        path=args.path,
        sglang_config=SGLangConfig(weight_sync_method=args.sync, dtype=args.dtype, max_total_tokens=32768),
        trainer_config=TrainerConfig(lora_rank=16, lora_alpha=32, seed=args.seed),
    )
    rows: list[StepRow] = []
    async with backend:
        print(f"[demo] mode {backend.placement.mode}: {backend.placement.reason}")
        print(f"[demo] starting the SGLang server and the trainer for {args.model} (about 30 s on a CPU) ...")
        t0 = time.monotonic()
        await model.register(backend)
        print(f"[demo] ready in {time.monotonic() - t0:.0f} s; serving at {model.inference_base_url}")

        async def rollout(question: str) -> art.Trajectory:
            return await one_word_rollout(model, question, max_tokens=args.max_tokens)

        print(header())
        start_step = await backend._get_step(model)
        for i in range(args.steps):
            questions = rng.sample(ONE_WORD_QUESTIONS, k=min(args.groups_per_step, len(ONE_WORD_QUESTIONS)))
            t_roll = time.monotonic()
            groups = await art.gather_trajectory_groups(
                [art.trajectory_group([rollout(q) for _ in range(args.group_size)]) for q in questions],
                pbar_desc=f"rollout {start_step + i}",
                pbar_total_completion_tokens=False,
            )
            rollout_s = time.monotonic() - t_roll
            rewards = [t.reward for g in groups for t in g.trajectories]
            with tqdm(total=1, desc=f"train {start_step + i}", leave=False) as bar:
                result = await backend.train(model, groups, learning_rate=args.learning_rate)
                bar.update(1)
            train_call_s = time.monotonic() - t_roll - rollout_s
            m = result.metrics
            await model.log(groups, metrics=m, step=result.step, split="train")
            wall_s = time.monotonic() - t_roll
            row = StepRow(
                step=result.step - 1,
                reward_mean=statistics.fmean(rewards),
                reward_std=statistics.pstdev(rewards),
                rollout_s=rollout_s,
                train_s=m.get("time/train_s", 0.0),
                sync_s=m.get("time/sync_s", 0.0),
                sync_method=backend.model_run(model).sync.method,
                rollout_tok_s=m.get("rollout/completion_tokens", 0.0) / max(rollout_s, 1e-9),
                cache_hit=m.get("rollout/cache_hit_ratio", 0.0),
                logprob_gap=m.get("engine_trainer_logprob_gap", 0.0),
                prep_s=max(0.0, train_call_s - m.get("time/train_s", 0.0) - m.get("time/sync_s", 0.0)),
                other_s=max(0.0, wall_s - rollout_s - train_call_s),
                wall_s=wall_s,
            )
            rows.append(row)
            tqdm.write(format_row(row))
        out = plot(
            rows,
            Path(model._get_output_dir()) / "demo.png",
            f"{args.model.split('/')[-1]}: '{args.task}' task, {args.sync} sync",
        )
    first, last_two = rows[0].reward_mean, statistics.fmean(r.reward_mean for r in rows[-2:])
    print(f"[demo] reward {first:.3f} at the first step -> {last_two:.3f} over the last two")
    print(f"[demo] plot: {out}")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt (GRPO group)")
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--task", choices=TASKS, default="one-word")
    p.add_argument(
        "--model",
        default="HuggingFaceTB/SmolLM2-135M-Instruct",
        help="base model: a local directory, a model in the HF cache, or the bundled SmolLM2",
    )
    p.add_argument("--learning-rate", type=float, default=1e-5)  # ART's optimizer steps: one per trajectory
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--sync", choices=("lora", "disk", "restart"), default="lora")
    p.add_argument("--dtype", default="auto", help="server and trainer dtype (auto: float32 on the CPU, bf16 on a GPU)")
    p.add_argument("--path", default=".art")
    p.add_argument("--project", default="art-sglang-demo")
    p.add_argument("--name", default=None, help="model name (default: a new one per run)")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    for var, value in (
        ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(var, value)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    if args.name is None:
        args.name = f"smollm2-{time.strftime('%Y%m%d-%H%M%S')}"
    asyncio.run(run(args))
    return 0
