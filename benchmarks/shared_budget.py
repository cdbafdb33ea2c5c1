"""Shared mode's GPU memory budget, and how long the trainer takes from an optimizer step to a servable adapter.

In shared mode (one GPU) the server keeps its weights on the GPU while the trainer trains (it releases only its
KV cache and CUDA graphs), so the server's weights and the trainer's peak must fit together. For models in
Qwen2.5-1.5B's and Qwen2.5-7B's shapes (random weights, bf16, LoRA rank 16 on all linear layers, fp32 adapters
and AdamW state) this measures: the weights' size (= the server's copy), the trainer's peak GPU memory during one
step at a given micro-batch size, offload and reload times, and the time from the end of the optimizer step to
an adapter the server can load: the payload the `lora` sync sends to `/load_lora_adapter_from_tensors`
(`PolicyTrainer.adapter_payload`: one device-to-host copy, pickled) and what carrying it to the HTTP request costs
(the worker's pipe, base64), and for comparison the full checkpoint (adapter + optimizer state), the adapter alone
written as safetensors, and the adapter copied tensor by tensor.

    python benchmarks/shared_budget.py --out results.json        # on a GPU machine
    python benchmarks/shared_budget.py --tiny --device cpu       # a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import base64
import functools
import gc
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_gpu import make_batch, qwen_config, sync  # noqa: E402

from art_sglang.config import ALL_LINEAR  # noqa: E402
from art_sglang.trainer.core import PolicyTrainer, StepOptions, TrainerSettings  # noqa: E402

SHAPES = {
    "qwen2.5-1.5b": None,  # trainer_gpu's default shape
    "qwen2.5-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}


def build(shape: str, tiny: bool, root: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = qwen_config(tiny)
    if not tiny and SHAPES[shape]:
        config = Qwen2Config(**{**config.to_dict(), **SHAPES[shape], "layer_types": None})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen2ForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    path = root / shape
    model.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return path


def gib(n: float) -> float:
    return n / 2**30


def median_time(fn, device: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def through_pipe(data: bytearray) -> None:
    sender, receiver = multiprocessing.Pipe()
    reader = threading.Thread(target=receiver.recv)
    reader.start()
    sender.send(data)
    reader.join()


def measure(shape: str, args: argparse.Namespace, root: Path) -> dict:
    path = build(shape, args.tiny, root)
    device = args.device
    settings = TrainerSettings(
        str(path), lora_rank=16, lora_alpha=32, target_modules=list(ALL_LINEAR), device=device, dtype="bfloat16"
    )
    trainer = PolicyTrainer(settings)
    weights = sum(p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    adapter = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    adapter_mb = sum(p.numel() * 4 for p in adapter.values()) / 1e6
    out: dict = {"shape": shape, "weights_gib": gib(weights), "adapter_mb": adapter_mb}
    vocab = trainer.model.config.vocab_size
    for tokens in args.micro_batch_tokens:
        trainer.settings.micro_batch_tokens = tokens
        batch = make_batch(args.batch, args.seq, vocab, seed=1)
        options = StepOptions(1e-5)
        try:
            trainer.train_step(batch, options)  # warm-up (compiles)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            trainer.train_step(batch, options)
            sync(device)
            step_s = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            out[f"trainer_peak_gib@{tokens}"] = "out of memory"
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
        out[f"step_s@{tokens}"] = step_s
        out[f"trainer_peak_gib@{tokens}"] = gib(peak)
        out[f"server_weights_plus_trainer_peak_gib@{tokens}"] = gib(weights + peak)
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        from safetensors.torch import save_file

        ckpt = Path(tmp) / "ckpt"
        out["full_checkpoint_s"] = median_time(functools.partial(trainer.save_checkpoint, ckpt, 1), device)
        out["load_checkpoint_s"] = median_time(functools.partial(trainer.load_checkpoint, ckpt), device)
        state = lambda: {n: p.detach().to("cpu", torch.float32) for n, p in adapter.items()}  # noqa: E731
        out["adapter_payload_s"] = median_time(trainer.adapter_payload, device)
        payload = trainer.adapter_payload()["tensors"]
        out["adapter_payload_mb"] = len(payload) / 1e6
        # What the payload costs on its way to the server before HTTP: the worker's pipe to the backend, and
        # base64 (SGLang's endpoint takes JSON).
        out["payload_pipe_s"] = median_time(functools.partial(through_pipe, payload), "cpu", repeats=3)
        out["payload_base64_s"] = median_time(functools.partial(base64.b64encode, payload), "cpu", repeats=3)
        out["adapter_to_host_s"] = median_time(state, device)
        out["adapter_safetensors_s"] = median_time(lambda: save_file(state(), str(Path(tmp) / "a.safetensors")), device)
    probe = make_batch(1, 256, vocab, seed=2)
    before = trainer.sequence_logprobs(probe)[0]
    for i in (1, 2):  # the second offload reuses the pinned host copies of the frozen weights
        out[f"offload_{i}_s"] = trainer.offload()["offload_seconds"]
        out[f"reload_{i}_s"] = trainer.reload()["reload_seconds"]
    after = trainer.sequence_logprobs(probe)[0]
    out["logprob_change_after_offload_reload"] = max(abs(a - b) for a, b in zip(before, after, strict=True))
    trainer.train_step(make_batch(args.batch, args.seq // 4, vocab, seed=3), StepOptions(1e-5))  # trains after it
    del trainer
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--scratch", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.batch, args.seq, args.micro_batch_tokens = 2, 64, [64, 128]
    result = {
        "date": time.strftime("%F %T"),
        "machine": platform.node(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpu_memory_gib": gib(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else 0,
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "shapes": [],
    }
    with tempfile.TemporaryDirectory(dir=args.scratch) as root:
        for shape in args.shapes.split(","):
            r = measure(shape, args, Path(root))
            result["shapes"].append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
