"""256 agents at once, end to end, on this CPU: nothing breaks or serializes at ART's concurrency.

A real SGLangBackend (SmolLM2-135M-Instruct, the default SGLangConfig and TrainerConfig but for the tool-call chat
template of the agent tests and the trainer's two threads, which it has to itself once the rollouts are done)
serves `--agents` concurrent episodes through ART's OpenAI client, each three assistant turns: two forced tool calls
with their results, then an answer (tests/rollouts.py: agent_episodes, the agent tests' episode). Then one
`backend.train()` on all of them. It reports:
- errors (episodes that raised), requests, wall time, the most requests in flight at the gateway and the most the
  server decoded in one batch (from its log: `Decode batch, #running-req`);
- the prefix-cache hit (cached / prompt tokens, as the engine reported each turn, in the step's rollout metrics);
- exactness: every trained turn sits in a training sequence after exactly the prompt the engine was given, with
  exactly its sampled ids (tests/rollouts.py: trained_turns_are_exact), and the engine's logprobs against the
  trainer's on the policy that sampled them (mean and max |gap|);
- the step: its time and what the trainer took.
Throughput here is the CPU's; what is shown is that 256 at once complete, exactly. The report is written after
each phase (a run cut short keeps what it measured).

    .venv/bin/python benchmarks/agents_at_scale.py --out docs/results/agents_at_scale_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import art  # noqa: E402
from rollouts import AGENT_TEMPLATE, BASE, agent_episodes, logprob_gaps, trained_turns_are_exact  # noqa: E402

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig  # noqa: E402
from art_sglang.trainer.data import prepare  # noqa: E402


def save(report: dict[str, object], out: Path | None) -> None:
    """Written after each phase, so that a run cut short keeps what it measured."""
    text = json.dumps(report, indent=2, default=str)
    print(text, flush=True)
    if out:
        out.write_text(text + "\n")


def most_running(log: Path) -> int:
    """The largest batch the server decoded, from its scheduler's log lines (a prefill line's count is not a batch:
    in the first run one read 478 with 256 agents)."""
    counts = re.findall(r"Decode batch, #running-req: (\d+)", log.read_text(errors="replace"))
    return max(map(int, counts), default=0)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=256)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.agents % args.group_size:
        p.error("--agents must be a multiple of --group-size")

    # The defaults but for the agent tests' template, and the trainer's two threads: the server is idle while it works.
    backend = SGLangBackend(
        path=tempfile.mkdtemp(prefix="agents-"),
        sglang_config=SGLangConfig(chat_template=AGENT_TEMPLATE),
        trainer_config=TrainerConfig(cpu_threads=2),
    )
    model = art.TrainableModel(name="agents", run_name="scale", project="bench", base_model=BASE)
    report: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%F %T"),
        "command": " ".join(sys.argv),
        "settings": {
            "agents": args.agents,
            "group_size": args.group_size,
            "model": BASE,
            "config": "defaults, but the agent tests' chat template and TrainerConfig(cpu_threads=2)",
        },
    }
    try:
        t0 = time.perf_counter()
        await model.register(backend)
        run = backend.model_run(model)
        report["start_seconds"] = time.perf_counter() - t0

        # Warm the grammar compiler once (its first regex compiles slowly), then all agents at once.
        await agent_episodes(model, "What is 1 + 1?")
        peak, done = 0, asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, sum(run.gateway.in_flight.values()))
                await asyncio.sleep(0.05)

        questions = [f"What is {a} + {b}?" for a in range(10) for b in range(10)]
        episodes = [
            agent_episodes(model, questions[g % len(questions)], temperature=1.0)
            for g in range(args.agents // args.group_size)
            for _ in range(args.group_size)
        ]
        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        results = await asyncio.gather(*episodes, return_exceptions=True)
        seconds = time.perf_counter() - t0
        done.set()
        await watcher
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        trajectories = [t for r in results if not isinstance(r, BaseException) for t in r]
        requests = sum(1 for t in trajectories for i in t.messages_and_choices if hasattr(i, "logprobs"))
        groups = [
            art.TrajectoryGroup(trajectories[i : i + args.group_size])
            for i in range(0, len(trajectories), args.group_size)
        ]
        for g in groups:  # distinct rewards: every episode trains (what is measured is the data path at scale)
            for i, t in enumerate(g.trajectories):
                t.reward = float(i)
        report["rollouts"] = {
            "episodes": args.agents,
            "errors": len(errors),
            "first_errors": errors[:3],
            "requests": requests,
            "seconds": seconds,
            "requests_per_s": requests / seconds,
            "most_in_flight_at_gateway": peak,
            "most_running_on_server": most_running(run.server.log_path),
        }
        save(report, args.out)

        t0 = time.perf_counter()
        checked, sequences = trained_turns_are_exact(groups, run.template)  # raises where a turn is not exact
        gaps = await logprob_gaps(run, prepare(groups, run.template).sequences)
        report["exactness"] = {
            "trained_turns_checked": checked,
            "training_sequences": sequences,
            "logprob_gap_mean": sum(gaps) / len(gaps),
            "logprob_gap_max": max(gaps),
            "tokens_compared": len(gaps),
            "seconds": time.perf_counter() - t0,
        }
        save(report, args.out)

        t0 = time.perf_counter()
        result = await backend.train(model, groups)
        report["step"] = {
            "seconds": time.perf_counter() - t0,
            "step": result.step,
            "metrics": {k: v for k, v in result.metrics.items() if not k.startswith("rollout/")},
        }
        # What the step reports of the rollouts since the last step (the grammar warm-up's 3 requests among them).
        report["rollouts"]["cache"] = {k: v for k, v in result.metrics.items() if k.startswith("rollout/")}
    finally:
        await backend.close()
    save(report, args.out)


if __name__ == "__main__":
    asyncio.run(main())
