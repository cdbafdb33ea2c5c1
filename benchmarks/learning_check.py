"""How far test_backend's RL run lifts the one-word reward, run after run (issue 27: a learning check on few samples
is the shape of flake to fix at its cause, by measuring its spread and asserting what holds).

Each run is test_backend's `trained` fixture's loop: a fresh SGLangBackend (`make_backend`, the `lora` sync), 32
samples of the base policy, then `--steps` RL steps of `--questions` x 4 samples at `--lr` through ART's API. A run's
margin is the mean reward of its last two batches minus the base policy's (the test asserts margin > 0.2). The
report gives every run's batch rewards and margin, per configuration, and is written after each run.

    .venv/bin/python benchmarks/learning_check.py --runs 3 --configs 4:2e-4,8:2e-4 \\
        --out docs/results/learning_check_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import art  # noqa: E402
from rollouts import BASE, gather, make_backend, mean_reward  # noqa: E402

from art_sglang.tasks import ONE_WORD_QUESTIONS  # noqa: E402


async def one_run(questions: int, lr: float, steps: int, index: int) -> dict:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="learning-check-") as path:
        backend = make_backend(path)
        name = f"lc{index}"
        model = art.TrainableModel(name=name, run_name=name, project="bench", base_model=BASE)
        try:
            await model.register(backend)
            asked = ONE_WORD_QUESTIONS[:questions]
            # 32 samples of the base policy besides the first batch, as the test draws them.
            base = [mean_reward(await gather(model, asked[:4])) for _ in range(2)]
            batches = []
            for _ in range(steps):
                groups = await gather(model, asked)
                batches.append(mean_reward(groups))
                await backend.train(model, groups, learning_rate=lr, save_checkpoint=False)
        finally:
            await backend.close()
    base_reward = (batches[0] + sum(base) / len(base)) / 2
    return {
        "base": round(base_reward, 4),
        "batches": [round(b, 4) for b in batches],
        "margin": round((batches[-1] + batches[-2]) / 2 - base_reward, 4),
        "seconds": round(time.monotonic() - started, 1),
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4, help="runs per configuration")
    p.add_argument("--configs", default="4:2e-4", help="QUESTIONS:LR,... (4 samples per question and step)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report: dict = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "configs": {},
    }
    configs = [(int(q), float(lr)) for q, lr in (c.split(":") for c in args.configs.split(","))]
    for i in range(args.runs):  # configurations interleaved: a slow spell of the machine falls on all of them
        for questions, lr in configs:
            key = f"{questions} questions x 4, lr {lr:g}"
            entry = report["configs"].setdefault(key, {"runs": []})
            entry["runs"].append(await one_run(questions, lr, args.steps, i))
            margins = [r["margin"] for r in entry["runs"]]
            entry["margin_min"], entry["margin_mean"] = min(margins), round(statistics.mean(margins), 4)
            entry["below_0.2"] = sum(m <= 0.2 for m in margins)
            text = json.dumps(report, indent=2)
            print(text, flush=True)
            if args.out:
                args.out.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
