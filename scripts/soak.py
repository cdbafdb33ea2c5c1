"""Soak: continuous rollouts and RL steps against a real SGLang server for a fixed time, with faults injected.

Every step: P prompts x G samples through ART's OpenAI client, then `backend.train`. Every `--kill-every` minutes
the server's whole process group gets SIGKILL while a step's rollouts run: the gateway must hold and resend them,
the backend must restart the server on the newest policy, and no rollout may fail. The RSS of each process
(this one, the SGLang launcher, scheduler and detokenizer, the trainer worker) is sampled every step. At the end
the backend is closed and the script checks that no process it started is alive, no port it used still listens,
and no temporary directory it made is left. The one-word task saturates within minutes (every sample scores 1, and
a group of equal rewards trains nothing), so rewards get uniform noise (`--reward-noise`): every step trains.

    .venv/bin/python scripts/soak.py --minutes 30 --out docs/results/soak_cpu.json   # + soak_cpu.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import art  # noqa: E402

from art_sglang import SGLangBackend, SGLangConfig, TrainerConfig  # noqa: E402
from art_sglang.procs import alive, process_group_members  # noqa: E402
from art_sglang.tasks import ONE_WORD_QUESTIONS, one_word_rollout  # noqa: E402

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def role(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "gone"
    if cmd.startswith("sglang::"):  # SGLang sets its children's titles: scheduler, detokenizer
        return cmd.removeprefix("sglang::").split()[0]
    if "sglang.launch_server" in cmd:
        return "launcher"
    if "resource_tracker" in cmd:
        return "resource tracker"
    return "other"


def listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def temp_entries(prefixes: tuple[str, ...] = ("tmp", "pymp-", "art-sglang", "sglang")) -> set[str]:
    """Entries of the temp directory and /dev/shm that this stack could have made (tempfile, multiprocessing, ours)."""
    out = set()
    for root in (Path(tempfile.gettempdir()), Path("/dev/shm")):
        if root.is_dir():
            out |= {str(p) for p in root.iterdir() if p.name.startswith(prefixes)}
    return out


def sample(backend: SGLangBackend, model, seen: set[int]) -> dict[str, float]:
    run = backend.model_run(model)
    out = {"backend (this process)": rss_mb(os.getpid()) or 0.0}
    pid = run.server.pid
    for member in sorted(process_group_members(pid)) if pid else []:
        seen.add(member)
        if (mb := rss_mb(member)) is not None:
            key = f"server {role(member)}"
            out[key] = out.get(key, 0.0) + mb
    for rank, worker in enumerate(run.trainer.pids):
        seen.add(worker)
        out[f"trainer rank {rank}"] = rss_mb(worker) or 0.0
    return out


async def soak(args: argparse.Namespace) -> dict:
    ports_before, temps_before = listening_ports(), temp_entries()
    semaphores_before = temp_entries(("sem.mp-",))
    workdir = Path(tempfile.mkdtemp(prefix="art-sglang-soak-"))
    model = art.TrainableModel(name="soak", run_name="soak", project="soak", base_model=BASE)
    backend = SGLangBackend(
        path=workdir,
        sglang_config=SGLangConfig(
            dtype="float32", max_total_tokens=16384, weight_sync_method=args.sync, server_timeout=300
        ),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )
    steps: list[dict] = []
    kills: list[dict] = []
    seen_pids: set[int] = set()
    used_ports: set[int] = set()
    failed_rollouts = 0
    rng = random.Random(args.seed)
    started = time.monotonic()
    async with backend:
        await model.register(backend)
        run = backend.model_run(model)
        next_kill = started + args.kill_every * 60 if args.kill_every else float("inf")
        step = 0
        while time.monotonic() - started < args.minutes * 60:
            used_ports |= {run.server.port, int(run.gateway.base_url.rsplit(":", 1)[1].split("/")[0])}
            questions = [
                ONE_WORD_QUESTIONS[(step * args.prompts + i) % len(ONE_WORD_QUESTIONS)] for i in range(args.prompts)
            ]
            t0 = time.monotonic()
            rollouts = asyncio.create_task(
                art.gather_trajectory_groups(
                    [
                        art.trajectory_group(
                            [one_word_rollout(model, q, max_tokens=args.max_tokens) for _ in range(args.group_size)]
                        )
                        for q in questions
                    ],
                    pbar_desc=None,
                    max_exceptions=args.prompts * args.group_size,  # count failures instead of stopping
                )
            )
            if time.monotonic() >= next_kill:
                while sum(run.gateway.in_flight.values()) == 0 and not rollouts.done():
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                in_flight, held, restarts = sum(run.gateway.in_flight.values()), run.gateway.held, run.restarts
                pid = run.server.pid
                seen_pids |= process_group_members(pid)
                os.killpg(pid, signal.SIGKILL)
                kills.append({"at_s": time.monotonic() - started, "step": step, "in_flight": in_flight})
                next_kill += args.kill_every * 60
            groups = await rollouts
            rollout_s = time.monotonic() - t0
            if kills and kills[-1]["step"] == step:
                kills[-1].update(
                    held=run.gateway.held - held, restarted=run.restarts == restarts + 1, rollout_s=rollout_s
                )
            got = sum(len(g.trajectories) for g in groups)
            failed_rollouts += args.prompts * args.group_size - got
            for t in (t for g in groups for t in g.trajectories):  # the task saturates; noise keeps every step training
                t.reward += rng.uniform(0, args.reward_noise)
            result = await backend.train(model, groups, learning_rate=args.learning_rate)
            rewards = [t.reward for g in groups for t in g.trajectories]
            row = {
                "step": result.step,
                "t_s": time.monotonic() - started,
                "reward": statistics.fmean(rewards) if rewards else float("nan"),
                "rollouts": got,
                "rollout_s": rollout_s,
                "train_s": result.metrics["time/train_s"],
                "sync_s": result.metrics["time/sync_s"],
                "server_restarts": result.metrics["server/restarts"],
                "trained_trajectories": result.metrics.get("data/trajectories_used", 0.0),
                "rss_mb": sample(backend, model, seen_pids),
            }
            steps.append(row)
            rss = ", ".join(f"{k} {v:.0f}" for k, v in row["rss_mb"].items())
            print(
                f"[soak] {row['t_s'] / 60:5.1f} min step {row['step']:3d} reward {row['reward']:.2f} "
                f"rollouts {got} restarts {row['server_restarts']:.0f} | RSS MB: {rss}",
                flush=True,
            )
            step += 1
        seen_pids |= {p for p in run.trainer.pids}
        merged_root = run.merged_root
    await asyncio.sleep(1.0)
    leaked_pids = sorted(p for p in seen_pids if alive(p))
    leaked_ports = sorted((listening_ports() & used_ports) - ports_before)
    shutil.rmtree(workdir, ignore_errors=True)  # the run's own checkpoints: made by this script, not leaked
    leaked_temps = sorted(temp_entries() - temps_before - {str(workdir)})
    return {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%F %T"),
        "command": " ".join(sys.argv),
        "minutes": (time.monotonic() - started) / 60,
        "steps": steps,
        "kills": kills,
        "failed_rollouts": failed_rollouts,
        "rollouts": sum(s["rollouts"] for s in steps),
        "steps_that_trained": sum(s["trained_trajectories"] > 0 for s in steps),
        "leaked_pids": leaked_pids,
        "leaked_ports": leaked_ports,
        "leaked_temp_entries": leaked_temps,
        # Named semaphores of multiprocessing: a server killed with SIGKILL takes its resource tracker with it,
        # and their names cannot be told from other programs' (informational, 32 bytes each).
        "semaphores_left": len(temp_entries(("sem.mp-",)) - semaphores_before),
        "merged_root_removed": not merged_root.exists(),
        "rss_growth": growth(steps, args.warmup_steps),
    }


def growth(steps: list[dict], warmup: int) -> dict[str, dict[str, float]]:
    """Per process: RSS after the warm-up steps, at the end, the largest seen and the growth in between. A killed
    server's processes are replaced: theirs is measured over each server's life, and the largest growth kept."""
    out = {}
    lives: dict[float, list[dict]] = {}
    for s in steps:
        lives.setdefault(s["server_restarts"], []).append(s)
    for key in sorted({k for s in steps for k in s["rss_mb"]}):
        spans = list(lives.values()) if key.startswith("server") else [steps]
        rows = []
        for span in spans:
            series = [s["rss_mb"][key] for s in span if key in s["rss_mb"]]
            if len(series) > warmup:
                start = series[warmup]
                rows.append(
                    {"after_warmup_mb": start, "end_mb": series[-1], "max_mb": max(series), "steps": len(series)}
                )
        if rows:
            worst = max(rows, key=lambda r: r["end_mb"] - r["after_warmup_mb"])
            out[key] = {**worst, "growth_mb": worst["end_mb"] - worst["after_warmup_mb"], "lives": len(rows)}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps = result["steps"]
    for key in sorted({k for s in steps for k in s["rss_mb"]}):
        points = [(s["t_s"] / 60, s["rss_mb"][key]) for s in steps if key in s["rss_mb"]]
        ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=key)
    for i, kill in enumerate(result["kills"]):
        ax.axvline(kill["at_s"] / 60, color="red", linestyle="--", label="server killed (SIGKILL)" if i == 0 else None)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"soak: {len(steps)} RL steps, {result['rollouts']} rollouts, {len(result['kills'])} server kills")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--kill-every", type=float, default=10.0, help="minutes between server kills (0: none)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-5)  # ART's optimizer steps: one per trajectory
    p.add_argument("--sync", default="lora")
    p.add_argument("--reward-noise", type=float, default=0.2, help="uniform noise added to rewards: every step trains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--summarize", type=Path, default=None, help="recompute the summary and plot of a saved run")
    args = p.parse_args()
    if args.summarize:
        result = json.loads(args.summarize.read_text())
        result["rss_growth"] = growth(result["steps"], args.warmup_steps)
        args.out = args.out or args.summarize
    else:
        result = asyncio.run(soak(args))
    summary = {k: v for k, v in result.items() if k != "steps"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        plot(result, args.out.with_suffix(".png"))
    ok = not (
        result["failed_rollouts"] or result["leaked_pids"] or result["leaked_ports"] or result["leaked_temp_entries"]
    )
    sys.exit(0 if ok and all(k.get("restarted") for k in result["kills"]) else 1)


if __name__ == "__main__":
    main()
