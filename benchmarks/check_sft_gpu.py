"""The trainer's supervised and RL steps on a GPU, in the precision users train in (bf16 compute, fp32 adapters,
compiled layers, fused AdamW): SFT memorizes a fixed answer, an RL step follows it (AdamW's moments start afresh),
and a checkpoint round trip keeps the policy.

    python benchmarks/check_sft_gpu.py --out results.json   # on a GPU machine; exits 1 if a check fails

A random-initialized Qwen2-shaped model (built here from its config: nothing is downloaded) stands in for a real one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from art_sglang.trainer.core import PolicyTrainer, StepOptions, TrainerSettings  # noqa: E402
from art_sglang.trainer.loss import LossConfig  # noqa: E402
from art_sglang.trainer.sequence import Sequence  # noqa: E402


def build(directory: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32000, (200,), generator=g).tolist()
    answer = torch.randint(0, 32000, (24,), generator=g).tolist()
    ids = prompt + answer
    sft = Sequence(ids, [math.nan] * len(ids), [False] * len(prompt) + [True] * len(answer), 1.0, 1.0, 0)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp) / "model")
        trainer = PolicyTrainer(TrainerSettings(str(Path(tmp) / "model")))
        results["dtype"], results["compiled"] = str(trainer.dtype), trainer.settings.compile
        losses, started = [], time.monotonic()
        for _ in range(args.steps):
            m = trainer.sft_step([sft], 1e-3, total_tokens=len(answer))
            losses.append(m["loss_sum"] / len(answer))
        results["sft_seconds_per_step"] = (time.monotonic() - started) / args.steps
        (trained,) = trainer.sequence_logprobs([sft])
        results["sft_loss_first_last"] = [losses[0], losses[-1]]
        results["sft_answer_mean_logprob"] = sum(trained) / len(trained)

        # An RL step right after: AdamW's moments are reset (as in ART), the update is finite.
        rl = Sequence(ids, [math.nan] * len(prompt) + trained, sft.mask, 1.0, 1.0 / len(answer), 0)
        metrics = trainer.train_step([rl], StepOptions(1e-5, LossConfig()))
        results["rl_grad_norm"] = metrics["grad_norm"]
        results["rl_gap_max"] = metrics["gap_max"]  # the step's own logprobs vs those just measured

        saved = trainer.save_checkpoint(Path(tmp) / "ckpt", step=2)
        (before,) = trainer.sequence_logprobs([sft])
        trainer.sft_step([sft], 1e-2, total_tokens=len(answer))  # move away, then back
        trainer.load_checkpoint(saved)
        (after,) = trainer.sequence_logprobs([sft])
        results["checkpoint_roundtrip_max_diff"] = max(abs(a - b) for a, b in zip(before, after, strict=True))

    checks = {
        "sft learns the answer": results["sft_loss_first_last"][1] < 0.1 * results["sft_loss_first_last"][0],
        "rl step after sft is finite": math.isfinite(results["rl_grad_norm"]),
        "the rl step saw the sft policy": results["rl_gap_max"] < 0.1,
        "checkpoint round trip": results["checkpoint_roundtrip_max_diff"] < 1e-3,
    }
    results["checks"] = checks
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
