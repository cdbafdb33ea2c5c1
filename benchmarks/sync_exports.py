"""The trainer's side of a sync on this CPU, against what it replaced, in one run.

SmolLM2-135M-Instruct in fp32, LoRA r8 on all linear layers (as `benchmarks/weight_sync.py`), after one optimizer
step; each figure is the median (and max) of `--repeats` calls:
- `lora`: the adapter packed for `/load_lora_adapter_from_tensors` (`PolicyTrainer.adapter_payload`), against the
  full checkpoint (adapter + optimizer state, fsynced) that the server used to load from before it could serve;
- `disk`: the changed layers merged into the mapped file rewritten in place (`export_merged(changed_only=True)`),
  against the same layers merged into new tensors and written as a new safetensors file each time (the previous
  implementation, kept here as the baseline).

    .venv/bin/python benchmarks/sync_exports.py --out docs/results/sync_exports_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from art_sglang.config import ALL_LINEAR  # noqa: E402
from art_sglang.models import small_model  # noqa: E402
from art_sglang.trainer.core import PolicyTrainer, StepOptions, TrainerSettings  # noqa: E402
from art_sglang.trainer.sequence import Sequence  # noqa: E402


def timed(fn, repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"p50_s": statistics.median(times), "max_s": max(times), "min_s": min(times)}


def fresh_file_export(trainer: PolicyTrainer, root: Path, counter: list[int]) -> None:
    """The previous `disk` export: merged layers as new tensors, a new safetensors file, the older one removed."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    base = trainer.model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            merged[f"{name}.weight"] = weight + module.get_delta_weight(module.active_adapters[0]).to(weight.dtype)
    state = {k: t.detach().to("cpu").contiguous() for k, t in merged.items()}
    counter[0] += 1
    target = root / f"step-{counter[0]:04d}"
    target.mkdir(parents=True)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(root / f"step-{counter[0] - 1:04d}", ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scratch", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    settings = TrainerSettings(
        str(small_model(quiet=True)),
        lora_rank=8,
        lora_alpha=16,
        target_modules=list(ALL_LINEAR),
        device="cpu",
        dtype="float32",
        threads=args.threads,
    )
    trainer = PolicyTrainer(settings)
    prompt, reply = list(range(100, 132)), list(range(200, 232))
    lps = [float("nan")] * len(prompt) + [-1.0] * len(reply)
    seq = Sequence(prompt + reply, lps, [False] * len(prompt) + [True] * len(reply), 1.0, 1.0 / len(reply), 0)
    trainer.train_step([seq], StepOptions(1e-4))
    out: dict = {
        "date": time.strftime("%F %T"),
        "machine": f"{platform.node()}, {torch.get_num_threads()} torch threads",
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        root = Path(tmp)
        out["lora_adapter_payload"] = timed(trainer.adapter_payload, args.repeats)
        out["lora_adapter_payload_mb"] = len(trainer.adapter_payload()["tensors"]) / 1e6
        out["lora_full_checkpoint_before"] = timed(lambda: trainer.save_checkpoint(root / "ckpt", 1), args.repeats)
        counter = [0]
        out["disk_export_in_place"] = timed(
            lambda: trainer.export_merged(root / "layers", changed_only=True), args.repeats
        )
        out["disk_export_fresh_file_before"] = timed(
            lambda: fresh_file_export(trainer, root / "fresh", counter), args.repeats
        )
    for k, v in out.items():
        print(f"{k}: {v}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
