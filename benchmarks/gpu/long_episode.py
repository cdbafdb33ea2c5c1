"""Long episodes on one GPU (issue 29 item 3, issue 33): our PolicyTrainer on one sequence of 8k, 16k and 32k tokens,
gradient checkpointing off and on; and the trainer's side of a `lora` sync for a 7B-shaped adapter (issue 29 item 6).

Model: random weights in Qwen2.5-7B's shape (`--shape qwen2.5-14b`: 14B's; benchmarks/shared_budget.py's), bf16,
LoRA r16 (alpha 32) on all linear layers, fp32 adapters and AdamW state, the trainer's defaults otherwise (compiled
layers on a GPU).
`TrainerSettings.gradient_checkpointing` is set here directly (`TrainerConfig.gradient_checkpointing` sets it).
Each setting runs in its own process (a clean allocator and peak counter); per length: one warm-up step
(compiles), then one measured step: its time (tokens/s = the sequence's tokens / step seconds) and peak allocated
memory; an out-of-memory error is recorded as "OOM". With checkpointing the lengths run longest first, without it
shortest first, so that what each setting is for is measured first if time runs out. The model is built and written
to /dev/shm by a process of its own, so that no other CUDA context shares the GPU with the measured ones.
The first process also times `PolicyTrainer.adapter_payload()` (optimizer step -> the adapter packed for
`/load_lora_adapter_from_tensors`), and what carrying it costs before HTTP (the worker's pipe, base64), as
benchmarks/shared_budget.py does, writing the adapter to a tmpfs file as safetensors, and
`PolicyTrainer.write_adapter` (the `lora` sync's RAM-disk file since 2026-12-07).

    python3 benchmarks/gpu/long_episode.py --out $OUT/long_episode.json          # on the GPU machine
    .venv/bin/python benchmarks/gpu/long_episode.py --cpu --out /tmp/le.json    # a smoke test of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def log(msg: str) -> None:
    print(f"[long_episode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child(args: argparse.Namespace) -> None:
    """One trainer, one gradient-checkpointing setting, every length; results appended to args.child_out."""
    import torch
    from trainer_gpu import make_batch, sync

    from art_sglang.config import ALL_LINEAR
    from art_sglang.trainer.core import PolicyTrainer, StepOptions, TrainerSettings

    device = "cpu" if args.cpu else "cuda"
    # Longest first with checkpointing (the length it is for), shortest first without (the one that fits).
    lengths = sorted((int(x) for x in args.lengths.split(",")), reverse=args.gc)
    result: dict = {"gradient_checkpointing": args.gc, "lengths": {}}
    out = Path(args.child_out)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    t0 = time.perf_counter()
    settings = TrainerSettings(
        args.model,
        lora_rank=16,
        lora_alpha=32,
        target_modules=list(ALL_LINEAR),
        device=device,
        dtype="float32" if args.cpu else "bfloat16",
        gradient_checkpointing=args.gc,
        micro_batch_tokens=max(lengths),
    )
    trainer = PolicyTrainer(settings)
    result["load_s"] = time.perf_counter() - t0
    vocab = trainer.model.config.vocab_size
    save()
    options = StepOptions(1e-5)
    for n in lengths:
        if time.monotonic() > args.deadline:
            result["lengths"][str(n)] = "not run: out of time"
            save()
            continue
        batch = make_batch(1, n, vocab, seed=n)
        row: dict = {"tokens": n, "trained_tokens": sum(batch[0].mask)}
        result["lengths"][str(n)] = row
        try:
            sync(device)
            t1 = time.perf_counter()
            trainer.train_step(batch, options)  # warm-up: compiles on a GPU
            sync(device)
            row["warmup_s"] = time.perf_counter() - t1
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t1 = time.perf_counter()
            trainer.train_step(batch, options)
            sync(device)
            row["step_s"] = time.perf_counter() - t1
            row["tokens_per_s"] = n / row["step_s"]
            if device == "cuda":
                row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        except Exception as e:  # noqa: BLE001 (an OOM inside compiled code may come wrapped)
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
            row["result"] = "OOM" if oom else "error"
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            if device == "cuda":
                row["peak_allocated_gib_at_oom"] = torch.cuda.max_memory_allocated() / 2**30
            trainer.optimizer.zero_grad(set_to_none=True)
            del e
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        log(f"gc={args.gc} {n} tokens: {row}")
        save()
        if args.payload and "step_s" in row and "adapter_payload" not in result:
            payload(trainer, device, result, args)
            save()
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    save()


def payload(trainer, device: str, result: dict, args: argparse.Namespace) -> None:
    """The trainer's side of the `lora` sync for this adapter, each figure the median of 5 (3 for the carriers)."""
    import base64
    import functools

    import torch
    from safetensors.torch import save_file
    from shared_budget import median_time, through_pipe

    try:
        p: dict = {}
        p["adapter_payload_s"] = median_time(trainer.adapter_payload, device)
        data = trainer.adapter_payload()["tensors"]
        p["adapter_payload_mb"] = len(data) / 1e6
        p["payload_pipe_s"] = median_time(functools.partial(through_pipe, data), "cpu", repeats=3)
        p["payload_base64_s"] = median_time(functools.partial(base64.b64encode, data), "cpu", repeats=3)
        state = trainer._adapter_state()  # noqa: SLF001 (PEFT's names, the live tensors)
        scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = str(Path(tmp) / "adapter_model.safetensors")
            p["adapter_safetensors_tmpfs_s"] = median_time(
                lambda: save_file({k: v.to("cpu", torch.float32) for k, v in state.items()}, path), device
            )
            # What the `lora` sync does since 2026-12-07: PolicyTrainer.write_adapter into a new directory each step.
            steps = iter(range(1000))
            p["write_adapter_tmpfs_s"] = median_time(
                lambda: trainer.write_adapter(Path(tmp) / f"step-{next(steps)}"), device
            )
            if device == "cuda":  # shared mode writes it after the trainer's offload: from pinned host memory
                from art_sglang.trainer.pack import _by_dtype

                trainer.offload()
                p["write_adapter_offloaded_s"] = median_time(
                    lambda: trainer.write_adapter(Path(tmp) / f"step-{next(steps)}"), "cpu"
                )
                host = trainer._adapter_state()
                groups = _by_dtype(host)  # the copy into the staging buffer alone, without the file's write
                p["stage_offloaded_s"] = median_time(
                    lambda: [trainer._packer._stage(names, host) for names in groups.values()], "cpu"
                )
                threads = p["torch_threads"] = torch.get_num_threads()
                torch.set_num_threads(1)  # a trainer worker's (TrainerConfig.cpu_threads)
                p["write_adapter_offloaded_1_thread_s"] = median_time(
                    lambda: trainer.write_adapter(Path(tmp) / f"step-{next(steps)}"), "cpu"
                )
                torch.set_num_threads(threads)
                trainer.reload()
        result["adapter_payload"] = p
        log(f"adapter payload: {p}")
    except Exception as e:  # noqa: BLE001 (recorded; the lengths go on)
        result["adapter_payload"] = {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--lengths", default=None)
    p.add_argument(
        "--shape", default="qwen2.5-7b", help="benchmarks/shared_budget.py's SHAPES: qwen2.5-7b, qwen2.5-14b"
    )
    p.add_argument("--no-payload", action="store_true", help="skip timing the adapter's way to the server")
    p.add_argument("--settings", default="on,off", help="gradient checkpointing settings, in order")
    p.add_argument("--budget", type=float, default=420, help="seconds for everything")
    p.add_argument("--scratch", default=None, help="where the model is written (default /dev/shm if it has room)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--build-into", help=argparse.SUPPRESS)
    p.add_argument("--payload", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.lengths = args.lengths or ("64,128,256" if args.cpu else "8192,16384,32768")
    if args.child:
        child(args)
        return
    if args.build_into:
        from shared_budget import build

        print(build(args.shape, args.cpu, Path(args.build_into)))
        return
    started = time.monotonic()
    deadline = started + args.budget
    if args.scratch is None:  # the 7B model takes 15 GB, the 14B 30 GB
        import shutil

        shm = Path("/dev/shm")
        args.scratch = (
            "/dev/shm"
            if shm.is_dir() and shutil.disk_usage(shm).free > (40e9 if "14b" in args.shape else 20e9)
            else None
        )
    out = Path(args.out or Path(os.environ.get("OUT", "/tmp/gpu/out")) / "long_episode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    results: dict = {
        "date": time.strftime("%F %T"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "shape": "tiny (--cpu)" if args.cpu else args.shape,
        "lora": "r16 alpha 32, all linear layers; fp32 adapters and AdamW state; bf16 compute",
        "runs": {},
    }

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory(dir=args.scratch) as root:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--build-into", root, "--shape", args.shape] + (["--cpu"] if args.cpu else [])
        model = Path(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
        results["build_s"] = time.perf_counter() - t0
        log(f"model written to {model} in {results['build_s']:.0f} s")
        save()
        for setting in args.settings.split(","):
            gc_on = setting == "on"
            child_out = Path(root) / f"gc-{setting}.json"
            left = deadline - time.monotonic()
            if left < 30:
                results["runs"][f"gc_{setting}"] = "not run: out of time"
                continue
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--model",
                str(model),
                "--child-out",
                str(child_out),
                "--lengths",
                args.lengths,
                "--deadline",
                str(time.monotonic() + left - 20),
            ]
            cmd += ["--gc"] if gc_on else []
            if not results["runs"] and not args.no_payload:  # the first process times the adapter's payload
                cmd += ["--payload"]
            cmd += ["--cpu"] if args.cpu else []
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=max(30, left - 10))
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            run = json.loads(child_out.read_text()) if child_out.exists() else {}
            run["exit"] = code
            run["seconds"] = time.perf_counter() - t0
            results["runs"][f"gc_{setting}"] = run
            save()
    results["seconds"] = time.monotonic() - started
    save()
    print(f"\n{'checkpointing':<14} {'tokens':>7} {'peak GiB':>9} {'tokens/s':>9} {'step s':>7} {'warm-up s':>9}")
    for name, run in results["runs"].items():
        if not isinstance(run, dict):
            print(f"{name:<14} {run}")
            continue
        for n, row in run.get("lengths", {}).items():
            if not isinstance(row, dict):
                print(f"{name:<14} {n:>7} {row}")
            elif row.get("result") == "error":
                print(f"{name:<14} {n:>7} error: {row.get('error')}")
            elif row.get("result") == "OOM":
                peak = row.get("peak_allocated_gib_at_oom", float("nan"))
                print(f"{name:<14} {n:>7} {'OOM':>9}   (peak {peak:.1f} GiB at the error)")
            else:
                print(
                    f"{name:<14} {n:>7} {row.get('peak_allocated_gib', float('nan')):>9.1f} "
                    f"{row.get('tokens_per_s', float('nan')):>9.0f} {row.get('step_s', float('nan')):>7.2f} "
                    f"{row.get('warmup_s', float('nan')):>9.1f}"
                )
        if "adapter_payload" in run:
            print(f"{name:<14} 7B adapter to the server: {run['adapter_payload']}")
        if run.get("exit") not in (0, None):
            print(f"{name:<14} process exit: {run.get('exit')}")


if __name__ == "__main__":
    main()
