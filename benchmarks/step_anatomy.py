"""Step anatomy: where the wall time of a demo-sized RL step goes (rollout, train, sync, the rest).

Runs `art-sglang demo` (same flags, same defaults: 8 prompts x 4 samples, 12 tokens, LoRA r16, `lora` sync) and
splits each step's wall time into: rollout (the 32 requests), prep (inside `train()`: persisting the trajectories,
tokenizing), train (the optimizer step and the checkpoint), sync (checkpoint saved -> new policy served) and other
(logging between steps). The first step includes the trainer's warm-up and is reported apart.

    .venv/bin/python benchmarks/step_anatomy.py --steps 8 --out docs/results/step_anatomy_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from art_sglang import demo  # noqa: E402

PARTS = ("rollout_s", "prep_s", "train_s", "sync_s", "other_s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="JSON results; a PNG is written beside it")
    args = p.parse_args()
    if args.name is None:
        args.name = f"anatomy-{time.strftime('%Y%m%d-%H%M%S')}"
    scratch = None
    if args.path == ".art":  # a run of its own, removed at the end
        args.path = scratch = tempfile.mkdtemp(prefix="art-sglang-anatomy-")
    for var, value in (("LITELLM_LOCAL_MODEL_COST_MAP", "True"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    try:
        steps = asyncio.run(demo.run(args))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = [asdict(r) for r in steps]
    steady = rows[1:] or rows
    mean = {part: statistics.fmean(r[part] for r in steady) for part in (*PARTS, "wall_s")}
    share = {part: mean[part] / mean["wall_s"] for part in PARTS}
    print(f"\n{'':>12} " + " ".join(f"{p.removesuffix('_s'):>8}" for p in (*PARTS, "wall_s")))
    print(f"{'first step':>12} " + " ".join(f"{rows[0][p]:>8.2f}" for p in (*PARTS, "wall_s")))
    print(f"{'mean after':>12} " + " ".join(f"{mean[p]:>8.2f}" for p in (*PARTS, "wall_s")))
    print(f"{'share':>12} " + " ".join(f"{share[p]:>8.1%}" for p in PARTS))
    print(f"sync takes {share['sync_s']:.2%} of a step ({args.sync}); the target is < 5%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "date": time.strftime("%F %T"),
            "machine": f"{platform.node()}, {os.cpu_count()} cores",
            "command": " ".join(sys.argv),
            "steps": rows,
            "mean_after_first": mean,
            "share_after_first": share,
        }
        args.out.write_text(json.dumps(result, indent=2))
        # The demo's own plot: reward, and the time of each step split into rollout, train, sync and the rest.
        demo.plot(steps, args.out.with_suffix(".png"), f"demo-sized RL step on {os.cpu_count()} CPU cores, {args.sync}")


if __name__ == "__main__":
    main()
