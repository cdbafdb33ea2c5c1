"""Weight-sync latency: from "the trainer finished the step" to "the new policy generated its first token".

For each method, a real SGLangBackend on SmolLM2-135M-Instruct takes small RL steps; each step's sync time (from
the backend's metrics: optimizer stepped -> new policy routed, its checkpoint written meanwhile) plus the time to
first token of a streamed request sent right after (which must report the new weight_version) is one sample. Then
the same under load: 64 requests in flight while a step syncs; their errors (must be 0) and the latency the sync
added to them.

    .venv/bin/python benchmarks/weight_sync.py --syncs 10 --out docs/results/weight_sync.json
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

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import art  # noqa: E402

from art_sglang import SGLangBackend, SGLangConfig  # noqa: E402
from art_sglang.tasks import ONE_WORD_QUESTIONS, one_word_rollout  # noqa: E402

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_step_groups(model: art.TrainableModel) -> list[art.TrajectoryGroup]:
    return await art.gather_trajectory_groups(
        [art.trajectory_group([one_word_rollout(model, ONE_WORD_QUESTIONS[0], max_tokens=6) for _ in range(2)])],
        pbar_desc=None,
    )


async def first_token(model: art.TrainableModel, expect_version: int) -> float:
    t0 = time.perf_counter()
    stream = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(),
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
        stream=True,
    )
    ttft, versions = None, set()
    async for chunk in stream:
        if chunk.choices:  # each streamed choice names the step that sampled it
            versions.add(str((chunk.choices[0].model_extra or {}).get("weight_version")))
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    assert versions == {str(expect_version)}, versions
    return ttft if ttft is not None else time.perf_counter() - t0


async def load_requests(model: art.TrainableModel, n: int) -> tuple[list[float], int]:
    client = model.openai_client()

    async def one() -> float:
        t0 = time.perf_counter()
        await client.chat.completions.create(
            model=model.get_inference_name(),
            max_tokens=32,
            temperature=1.0,
            messages=[{"role": "user", "content": "Tell me a short story."}],
        )
        return time.perf_counter() - t0

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    return [r for r in results if isinstance(r, float)], sum(isinstance(r, BaseException) for r in results)


async def measure(method: str, syncs: int, load: int, workdir: Path) -> dict:
    model = art.TrainableModel(name=f"bench-{method}", run_name=f"bench-{method}", project="bench", base_model=BASE)
    sync = method.removesuffix("-tensors")
    backend = SGLangBackend(
        path=workdir / method,
        sglang_config=SGLangConfig(max_total_tokens=32768, weight_sync_method=sync, server_timeout=300),
    )
    out: dict = {"method": method}
    async with backend:
        await model.register(backend)
        if method == "lora-tensors":  # the way to a server elsewhere: the adapter as tensors in the request
            backend.model_run(model).client.by_tensors = True
        samples, sync_only, bytes_moved = [], [], []
        parts: dict[str, list[float]] = {}
        for _ in range(syncs):
            groups = await one_step_groups(model)
            result = await backend.train(model, groups, learning_rate=1e-5)
            ttft = await first_token(model, result.step)
            sync = result.metrics["time/sync_s"]
            samples.append(sync + ttft)
            sync_only.append(sync)
            ckpt = Path(result.checkpoint_path) / "adapter_model.safetensors"
            moved = result.metrics.get("sync/export_bytes") or result.metrics.get("sync/adapter_bytes")
            bytes_moved.append(moved or ckpt.stat().st_size)
            for part in ("export", "update", "restart", "adapter_export", "adapter_load"):
                if f"sync/{part}_seconds" in result.metrics:
                    parts.setdefault(f"{part}_p50_s", []).append(result.metrics[f"sync/{part}_seconds"])
            print(
                f"  {method}: step {result.step} sync {sync * 1000:.0f} ms + first token {ttft * 1000:.0f} ms",
                flush=True,
            )
        out.update(
            p50_s=statistics.median(samples),
            p99_s=pct(samples, 0.99),
            sync_p50_s=statistics.median(sync_only),
            bytes=statistics.median(bytes_moved),
            samples_s=samples,
            **{k: statistics.median(v) for k, v in parts.items()},
        )
        out["bandwidth_MBps"] = out["bytes"] / out["sync_p50_s"] / 1e6
        if load:
            base_lat, base_err = await load_requests(model, load)
            groups = await one_step_groups(model)
            (lat, err), _ = await asyncio.gather(
                load_requests(model, load), backend.train(model, groups, learning_rate=1e-5)
            )
            out["under_load"] = {
                "requests": load,
                "errors": err + base_err,
                "latency_p50_s_without_sync": statistics.median(base_lat),
                "latency_p50_s_with_sync": statistics.median(lat),
            }
    return out


def plot(results: dict, path: Path) -> None:
    """Each sync's end-to-end latency per method, on a log scale: the spread and the outliers show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(results["methods"].values()):
        ax.scatter([i] * len(r["samples_s"]), r["samples_s"], alpha=0.6)
        ax.hlines(r["p50_s"], i - 0.25, i + 0.25, color="black")
    ax.set_xticks(range(len(results["methods"])), list(results["methods"]))
    ax.set_yscale("log")
    ax.set_ylabel("seconds, step done -> first token of the new policy")
    ax.set_title("weight sync end to end (each dot a sync, bar: p50)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--syncs", type=int, default=10)
    p.add_argument(
        "--methods", default="lora,lora-tensors,disk,restart", help="lora-tensors: lora as for a server elsewhere"
    )
    p.add_argument("--load", type=int, default=64, help="requests in flight for the under-load run (0: skip)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = {
        "date": time.strftime("%F %T"),
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            results["methods"][method] = await measure(
                method, args.syncs, args.load if method != "restart" else 0, Path(tmp)
            )
    m = results["methods"]
    print(f"\n{'method':<8} {'p50 (s)':>8} {'p99 (s)':>8} {'sync p50':>9} {'MB moved':>9}")
    for name, r in m.items():
        split = ", ".join(
            f"{k.removesuffix('_p50_s')} {r[k]:.3f} s" for k in r if k.endswith("_p50_s") and k != "sync_p50_s"
        )
        print(
            f"{name:<8} {r['p50_s']:>8.3f} {r['p99_s']:>8.3f} {r['sync_p50_s']:>9.3f} {r['bytes'] / 1e6:>9.1f}  {split}"
        )
        if "under_load" in r:
            u = r["under_load"]
            print(
                f"         under load: {u['requests']} requests, {u['errors']} errors, p50 latency "
                f"{u['latency_p50_s_without_sync']:.2f} s without a sync, {u['latency_p50_s_with_sync']:.2f} s with"
            )
    if "restart" in m:
        for name in ("lora", "disk"):
            if name in m:
                results[f"restart_over_{name}"] = m["restart"]["p50_s"] / m[name]["p50_s"]
                print(f"restart / {name} (p50): {results[f'restart_over_{name}']:.1f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    asyncio.run(main())
