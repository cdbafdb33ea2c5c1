"""Correctness of the trainer's GPU-only code path: the compiled, chunked logprob pass and its gradient.

On a GPU, `token_logprobs` computes each chunk's logprobs, entropies and softmax in one compiled kernel and takes
the gradient in the forward pass. This compares it with a float64 reference (full-vocabulary logits, autograd)
on fresh random inputs of Qwen2.5-1.5B's output shape, in fp32 and bf16, by ||ours - ref|| / ||ref||.

    python benchmarks/check_trainer_gpu.py          # on a GPU machine; exits 1 if a check fails
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from art_sglang.trainer.core import token_logprobs  # noqa: E402

# ||ours - ref|| / ||ref|| bounds: fp32 matmuls may run as tf32; bf16 operands land between 1e-3 and 1e-2.
BOUNDS = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).norm() / ref.norm()).item()


def check(dtype: torch.dtype, n: int, hidden: int, vocab: int, chunk: int, seed: int) -> dict[str, float]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = (torch.randn(n, hidden, device="cuda", generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).to(dtype)
    t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    upstream = torch.randn(n, device="cuda", generator=g)
    lp, entropy = token_logprobs(h, w, t, chunk)
    (lp * upstream).sum().backward()
    grad = h.grad.clone()
    assert torch.isfinite(lp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()

    h64 = h.detach().double().requires_grad_()
    log_probs = torch.log_softmax(h64 @ w.double().T, dim=-1)
    ref_lp = log_probs.gather(-1, t[:, None])[:, 0]
    ref_entropy = -(log_probs.exp() * log_probs).sum(-1)
    (ref_lp * upstream.double()).sum().backward()
    return {"logprob": rel(lp, ref_lp), "entropy": rel(entropy, ref_entropy), "grad": rel(grad, h64.grad)}


def main() -> None:
    failed = False
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'dtype':<15} {'tokens':>6} {'chunk':>5} {'logprob':>9} {'entropy':>9} {'grad':>9}  bound")
    for dtype in (torch.float32, torch.bfloat16):
        for seed, (n, chunk) in enumerate([(3001, 1024), (517, 2048), (2048, 2048)]):
            r = check(dtype, n, 1536, 151936, chunk, seed)
            ok = all(v < BOUNDS[dtype] for v in r.values())
            failed |= not ok
            print(
                f"{str(dtype):<15} {n:>6} {chunk:>5} {r['logprob']:>9.2e} {r['entropy']:>9.2e} {r['grad']:>9.2e}  "
                f"{BOUNDS[dtype]:.0e} {'ok' if ok else 'FAILED'}",
                flush=True,
            )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
