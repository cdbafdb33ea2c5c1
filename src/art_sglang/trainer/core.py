"""PolicyTrainer: the base model with a PEFT LoRA adapter, AdamW, and one RL optimizer step as plain code.

Runs inside the trainer worker process (trainer/worker.py), never in the user's process. The same code serves
the CPU (fp32, for tests and the demo) and GPUs (bf16). Memory: logits are computed only for trainable tokens,
one chunk at a time, with their gradient taken on the spot, so full-vocabulary logits are never materialized.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ALL_LINEAR, TrainerConfig, auto_dtype
from .layers_file import LayersFile
from .loss import LossConfig, policy_loss
from .pack import TensorPacker
from .sequence import Sequence

TRAINER_STATE = "trainer_state.pt"
SFT_MAX_GRAD_NORM = 1.0  # ART's run_unsloth_sft_training
ADAM_BETAS = (0.9, 0.99)  # ART's trainer_args
WEIGHT_DECAY = {"rl": 0.1, "sft": 0.0}  # ART sets these per kind of training
# Besides weights and config.json, what a server needs to start from an exported directory.
SERVABLE_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "generation_config.json",
    "vocab*",
    "merges.txt",
)


@dataclass
class TrainerSettings:
    """What the worker builds once. `peft_args` (ART's `_internal_config.peft_args`) override the LoRA fields."""

    base_model: str
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    peft_args: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # auto: config.auto_dtype (bfloat16 on a GPU, float32 on the CPU)
    adapter_dtype: str = "float32"  # LoRA weights and optimizer state; "auto": the base model's dtype
    device: str = "auto"  # auto: cuda if visible, else cpu
    max_grad_norm: float = 0.1  # ART's default
    micro_batch_tokens: int = 8192  # padded tokens per forward pass
    logprob_chunk: int = 1024  # target tokens per logits chunk
    gradient_checkpointing: bool | None = None  # None: on a GPU
    compile: bool | None = None  # torch.compile each decoder layer; None: on a GPU (fuses the elementwise work)
    seed: int = 0
    threads: int | None = None  # torch threads on the CPU

    @classmethod
    def from_config(
        cls, base_model: str, config: TrainerConfig, *, peft_args: dict[str, Any], threads: int | None
    ) -> TrainerSettings:
        return cls(
            base_model,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            peft_args=peft_args,
            dtype=config.dtype,
            max_grad_norm=config.max_grad_norm,
            micro_batch_tokens=config.micro_batch_tokens,
            gradient_checkpointing=config.gradient_checkpointing,
            seed=config.seed,
            threads=threads,
        )


@dataclass
class StepOptions:
    """A `train()` call's options, from its keywords. The first four reach each optimizer step; the last two are
    read by TrainerGroup.train, which schedules the call's steps (trainer/schedule.py)."""

    learning_rate: float = 5e-6
    loss: LossConfig = field(default_factory=LossConfig)
    kl_reference: str | None = None  # an adapter directory as the KL reference; None: the base model
    step_sequences: int | None = None  # sequences in this optimizer step over all ranks (None: this rank's)
    # ART's precalculate_logprobs: the policy's logprobs before the call's first step are the "old" ones (the
    # sampler's become the original ones, for truncated importance sampling).
    precalculate_logprobs: bool = False
    grad_accumulation_sequences: int = 1  # sequences per optimizer step


def _resolve(settings: TrainerSettings) -> tuple[torch.device, torch.dtype]:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = auto_dtype(device.startswith("cuda")) if settings.dtype == "auto" else settings.dtype
    return torch.device(device), getattr(torch, dtype)


def _logit_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Target logprobs, entropies and softmax probabilities of one chunk of logits, in fp32 arithmetic."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    probs = torch.exp(x - lse[:, None])
    entropy = lse - (probs * x).sum(-1)
    lp = x.gather(-1, targets[:, None])[:, 0] - lse
    return lp, entropy, probs.to(logits.dtype)


_compiled_stats: Callable | None = None


def _stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # On a GPU one fused kernel replaces a dozen passes over [chunk, vocab]; on the CPU compiling costs more.
    global _compiled_stats
    if not logits.is_cuda:
        return _logit_stats(logits, targets)
    if _compiled_stats is None:
        _compiled_stats = torch.compile(_logit_stats, dynamic=True)
    return _compiled_stats(logits, targets)


class _TokenLogprobs(torch.autograd.Function):
    """Chunked logprobs whose gradient is taken in the forward pass (the output matrix is frozen).

    d logprob / d hidden = W[target] - softmax(logits) @ W, a [chunk, hidden] tensor kept per token, so the
    backward pass neither recomputes the logits nor ever holds more than one chunk of them.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):  # type: ignore[override]
        lps, ents, grads = [], [], []
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            lp, entropy, probs = _stats(h @ weight.T, t)
            if ctx.needs_input_grad[0]:
                grads.append(weight[t].float() - (probs @ weight).float())
            del probs
            lps.append(lp)
            ents.append(entropy)
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(0))
        entropy = torch.cat(ents)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(lps), entropy

    @staticmethod
    def backward(ctx, grad_lp: torch.Tensor, _grad_entropy: torch.Tensor):  # type: ignore[override]
        (dlp_dhidden,) = ctx.saved_tensors
        return (grad_lp[:, None] * dlp_dhidden).to(ctx.hidden_dtype), None, None, None


def token_logprobs(
    hidden: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `targets` and entropies, from hidden states [N, H] and the output matrix [V, H].

    Memory grows with `chunk`, not N: full-vocabulary logits for all tokens are never materialized. The output
    matrix gets no gradient (it is frozen under LoRA; the trainer refuses to train it).
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return _TokenLogprobs.apply(hidden, lm_head, targets, chunk)


def micro_batches(sequences: list[Sequence], budget: int) -> list[list[int]]:
    """Indices grouped so that (count x longest) stays within `budget` tokens; sorted by length to cut padding."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * len(sequences[i]) > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class PolicyTrainer:
    def __init__(self, settings: TrainerSettings, grad_sync: Callable[[list[torch.Tensor]], None] | None = None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.settings = settings
        self.grad_sync = grad_sync
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device, self.dtype = _resolve(settings)
        base = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=self.dtype)
        base.config.use_cache = False
        lora = dict(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=list(settings.target_modules),
            task_type="CAUSAL_LM",
        )
        lora.update(settings.peft_args)
        torch.manual_seed(settings.seed)  # identical adapters on every data-parallel rank
        fp32_adapters = settings.adapter_dtype == "float32"
        self.model = get_peft_model(base, LoraConfig(**lora), autocast_adapter_dtype=fp32_adapters).to(self.device)
        # Mixed precision: fp32 adapter weights and optimizer state (bf16 would round small updates away), bf16
        # compute under autocast, and no fp32 copies of activations on their way into the adapters.
        self.mixed = fp32_adapters and self.dtype != torch.float32 and self.device.type == "cuda"
        if self.mixed:
            from peft.tuners.lora import LoraLayer

            for module in self.model.modules():
                if isinstance(module, LoraLayer):
                    module.cast_input_dtype_enabled = False
        checkpointing = settings.gradient_checkpointing
        if checkpointing or (checkpointing is None and self.device.type == "cuda"):
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
                self.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        if settings.compile or (settings.compile is None and self.device.type == "cuda"):
            from torch import _dynamo

            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            for layer in self._backbone().layers:
                layer.compile()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self._lm_head().requires_grad:
            raise ValueError(
                "training the output layer (lm_head) is not supported: the chunked logprob pass treats it as frozen. "
                "Remove lm_head from target_modules / peft_args['modules_to_save']."
            )
        fused = self.device.type == "cuda" and all(p.dtype == torch.float32 for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=5e-6, betas=ADAM_BETAS, fused=fused or None)
        self.step = 0
        self.offloaded = False
        self._host: dict[str, torch.Tensor] = {}  # pinned host copies for offloading (GPU only)
        self._packer = TensorPacker()  # the adapter's host memory for the server, reused every step
        self._adapter_names: dict[str, str] | None = None  # PEFT's name of each adapter parameter
        # The `disk` sync's merged layers, each file rewritten in place (several replicas use two in turn).
        self._layers_files: dict[Path, LayersFile] = {}
        self._mode: str | None = None  # "rl" or "sft": what the optimizer's moments were gathered on
        self._reference: tuple[str, dict[str, torch.Tensor]] | None = None  # the KL reference adapter, as loaded

    # -- the RL step ------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=self.dtype) if self.mixed else contextlib.nullcontext()

    def _backbone(self) -> torch.nn.Module:
        return self.model.get_base_model().model

    def _lm_head(self) -> torch.Tensor:
        return self.model.get_base_model().get_output_embeddings().weight

    @contextlib.contextmanager
    def _reference_policy(self, adapter_dir: str | None):
        """The KL reference in place of the policy: the base model (adapter off), or the adapter saved in
        `adapter_dir` (ART's kl_penalty_reference_step / kl_ref_adapter_path), swapped into the policy's LoRA
        weights and back. It must have the policy's LoRA shape (rank, alpha, layers)."""
        if adapter_dir is None:
            with self.model.disable_adapter():
                yield
            return
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        own = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        if self._reference is None or self._reference[0] != adapter_dir:
            self._reference = (adapter_dir, self._load_reference(adapter_dir, own))
        set_peft_model_state_dict(self.model, self._reference[1])
        try:
            yield
        finally:
            set_peft_model_state_dict(self.model, own)

    def _load_reference(self, adapter_dir: str, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import json

        from safetensors.torch import load_file

        directory = Path(adapter_dir)
        try:
            config = json.loads((directory / "adapter_config.json").read_text())
            weights = load_file(str(directory / "adapter_model.safetensors"), device=str(self._lm_head().device))
        except (OSError, ValueError) as e:
            raise ValueError(f"the KL reference adapter {directory} cannot be read ({e})") from e
        lora = self.model.peft_config["default"]
        shape = {k: tuple(v.shape) for k, v in weights.items()}
        if (config.get("r"), config.get("lora_alpha")) != (lora.r, lora.lora_alpha) or shape != {
            k: tuple(v.shape) for k, v in own.items()
        }:
            raise ValueError(
                f"the KL reference adapter {directory} (r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
                f"{len(weights)} tensors) does not have the policy's LoRA shape (r={lora.r}, lora_alpha="
                f"{lora.lora_alpha}, {len(own)} tensors): use a checkpoint of this model (kl_penalty_reference_step)"
            )
        return {k: v.to(own[k].dtype) for k, v in weights.items()}

    def _forward(self, batch: list[Sequence], seq_offset: int) -> dict[str, torch.Tensor]:
        """Hidden states of the batch, gathered at the positions that predict trainable tokens.

        Sequences are right-padded and run without an attention mask: under causal attention no real token
        attends to the padding after it, and without a mask SDPA keeps its fused causal kernels.
        """
        width = max(len(s) for s in batch)
        ids: list[int] = []
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        seq_ids: list[int] = []
        old: list[float] = []
        original: list[float] = []  # the sampler's logprobs when `old` were precalculated (all sequences or none)
        adv: list[float] = []
        weight: list[float] = []
        for row, s in enumerate(batch):
            ids += s.token_ids
            ids += [0] * (width - len(s))
            # Position t-1 predicts token t; the first token has no prediction.
            positions = s.trained_positions()
            rows += [row] * len(positions)
            cols += [t - 1 for t in positions]
            targets += [s.token_ids[t] for t in positions]
            old += [s.logprobs[t] for t in positions]
            original += [s.original_logprobs[t] for t in positions] if s.original_logprobs else []
            adv += [s.advantage] * len(positions)
            weight += [s.weight / max(len(positions), 1)] * len(positions)  # ART: a sequence's loss is a token mean
            seq_ids += [seq_offset + row + 1] * len(positions)
        # Built as Python lists and moved in two copies from pinned memory, before the forward pass: small
        # tensor ops on the host are slow with many threads, and a copy from pageable memory waits for the GPU.
        n, cells = len(rows), len(ids)
        longs = torch.tensor(ids + rows + cols + targets + seq_ids, dtype=torch.long)
        floats = torch.tensor(old + adv + weight + original, dtype=torch.float32)
        if self.device.type == "cuda":
            longs, floats = longs.pin_memory(), floats.pin_memory()
        longs = longs.to(self.device, non_blocking=True)
        floats = floats.to(self.device, non_blocking=True)
        f = {"ids": longs[:cells].view(len(batch), width)}
        for i, key in enumerate(("rows", "cols", "targets", "seq_ids")):
            f[key] = longs[cells + i * n : cells + (i + 1) * n]
        for i, key in enumerate(("old", "adv", "weight", "original")):
            f[key] = floats[i * n : (i + 1) * n]
        hidden = self._backbone()(input_ids=f["ids"]).last_hidden_state
        f["hidden"] = hidden[f["rows"], f["cols"]]
        return f

    def train_step(self, sequences: list[Sequence], options: StepOptions) -> dict[str, float]:
        """One optimizer step over `sequences` (this rank's share of the step): the loss is the mean over the step's
        sequences of each one's token-mean loss, as ART's gradient accumulation. Returns summed metrics."""
        started = time.monotonic()
        self.model.train()
        cfg = options.loss
        local_tokens = sum(sum(s.mask[1:]) for s in sequences)
        denominator = float(options.step_sequences or len(sequences) or 1)
        chunk = self.settings.logprob_chunk
        names = ("loss_sum", "entropy_sum", "kl_sum", "kl_batches")
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)  # read once: no per-batch syncs
        offset = 0
        for idx in micro_batches(sequences, self.settings.micro_batch_tokens):
            batch = [sequences[i] for i in idx]
            ref_lp = None
            if cfg.kl_penalty_coef > 0:  # first: a reference adapter is swapped into the weights the graph keeps
                with torch.no_grad(), self._reference_policy(options.kl_reference), self._autocast():
                    r = self._forward(batch, offset)
                    ref_lp, _ = token_logprobs(r["hidden"], self._lm_head(), r["targets"], chunk)
            with self._autocast():
                f = self._forward(batch, offset)
                new_lp, entropy = token_logprobs(f["hidden"], self._lm_head(), f["targets"], chunk)
            offset += len(batch)
            ones = torch.ones_like(new_lp)
            original = f["original"] if f["original"].numel() else None
            terms = policy_loss(
                new_lp[None],
                f["old"][None],
                f["adv"][None],
                f["weight"][None],
                ones[None],
                f["seq_ids"][None],
                cfg,
                None if ref_lp is None else ref_lp[None],
                None if original is None else original[None],
            )
            (terms.policy_loss_sum / denominator).backward()
            with torch.no_grad():
                kl = terms.kl_policy_ref if terms.kl_policy_ref is not None else new_lp.new_zeros(())
                has_kl = float(terms.kl_policy_ref is not None)
                sums += torch.stack(
                    [t.double() for t in [terms.policy_loss_sum, entropy.sum(), kl, kl.new_tensor(has_kl)]]
                )
        grad_norm = self._optimizer_step("rl", options.learning_rate, self.settings.max_grad_norm)
        return {
            **dict(zip(names, sums.tolist(), strict=True)),
            "grad_norm": grad_norm,
            "tokens": float(local_tokens),
            "sequences": float(len(sequences)),
            "train_seconds": time.monotonic() - started,
        }

    def sft_step(self, sequences: list[Sequence], learning_rate: float, total_tokens: int) -> dict[str, float]:
        """One optimizer step of supervised fine-tuning, as ART's: cross-entropy summed over the batch's trained
        tokens (`total_tokens` over all ranks) and divided by their number, gradients clipped at ART's SFT norm."""
        started = time.monotonic()
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for idx in micro_batches(sequences, self.settings.micro_batch_tokens):
            with self._autocast():
                f = self._forward([sequences[i] for i in idx], 0)
                lp, _ = token_logprobs(f["hidden"], self._lm_head(), f["targets"], self.settings.logprob_chunk)
            loss = -lp.float().sum()
            (loss / max(total_tokens, 1)).backward()
            loss_sum += loss.detach().double()
        grad_norm = self._optimizer_step("sft", learning_rate, SFT_MAX_GRAD_NORM)
        return {
            "loss_sum": loss_sum.item(),
            "grad_norm": grad_norm,
            "tokens": float(sum(sum(s.mask[1:]) for s in sequences)),
            "train_seconds": time.monotonic() - started,
        }

    def _optimizer_step(self, mode: str, learning_rate: float, max_grad_norm: float) -> float:
        """Sum gradients over ranks, clip, step AdamW with ART's settings for `mode`; the gradient norm before
        clipping. AdamW's moments start afresh when training switches between RL and SFT, as in ART."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.grad_sync is not None:
            self.grad_sync(grads)  # sums gradients over data-parallel ranks
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        if mode != self._mode:
            if self._mode is not None:
                self.optimizer.state.clear()
            self._mode = mode
        for group in self.optimizer.param_groups:  # set each time: a loaded state dict brings its own
            group.update(lr=learning_rate, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY[mode])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm.item()

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[Sequence]) -> list[list[float]]:
        """The current policy's logprobs of each sequence's trainable tokens (for checks and evaluation)."""
        self.model.eval()
        out: list[list[float]] = [[] for _ in sequences]
        for idx in micro_batches(sequences, self.settings.micro_batch_tokens):
            with self._autocast():
                f = self._forward([sequences[i] for i in idx], 0)
                lp, _ = token_logprobs(f["hidden"], self._lm_head(), f["targets"], self.settings.logprob_chunk)
            rows = f["rows"].tolist()
            for row, value in zip(rows, lp.float().cpu().tolist(), strict=True):
                out[idx[row]].append(value)
        return out

    # -- checkpoints and exports ------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | Path, step: int | None = None) -> Path:
        """Write the adapter (plain PEFT layout) and optimizer state to `directory`, atomically."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self.model.save_pretrained(tmp)
            torch.save(
                {
                    "step": self.step if step is None else step,
                    "optimizer": self.optimizer.state_dict(),
                    "mode": self._mode,
                    "settings": asdict(self.settings),
                },
                tmp / TRAINER_STATE,
            )
            for f in tmp.iterdir():
                _fsync(f, os.O_RDONLY)
            _fsync(tmp, os.O_RDONLY)
            replace_dir(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(
                e.errno,
                f"could not write checkpoint {target} ({e.strerror or e}); nothing of it is left behind and earlier "
                f"checkpoints are intact. Free space in {target.parent} (or point the backend's path elsewhere) "
                "and train again.",
            ) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load_checkpoint(self, directory: str | Path) -> int:
        """Load adapter weights (and optimizer state when present); returns the checkpoint's step."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        where = "cpu" if self.offloaded else str(self.device)  # shared mode: the model lives in CPU memory now
        weights = load_file(str(directory / "adapter_model.safetensors"), device=where)
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {directory} does not fit this model: {result.unexpected_keys[:3]}")
        state_file = directory / TRAINER_STATE
        if state_file.exists():
            state = torch.load(state_file, map_location=where, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self._mode = state.get("mode", "rl")
        else:
            self.step = int(directory.name) if directory.name.isdigit() else 0
        return self.step

    def adapter_payload(self) -> dict[str, Any]:
        """The adapter as the server loads it from memory: its PEFT config, and its tensors (PEFT's names) packed
        for `/load_lora_adapter_from_tensors` (valid until the next call); the time from here (the optimizer has
        stepped) to that payload."""
        started = time.monotonic()
        tensors = self._packer.pack(self._adapter_state())
        return {"config": self._adapter_config(), "tensors": tensors, "seconds": time.monotonic() - started}

    def write_adapter(self, directory: str | Path) -> dict[str, float]:
        """The adapter as it is now, as a PEFT directory (adapter_model.safetensors, adapter_config.json) for the
        server's load by path: one copy to host memory reused every step, one write (a RAM disk's, in the sync).
        No fsync: this is the server's copy, not the checkpoint."""
        import json

        started = time.monotonic()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        size = self._packer.write_safetensors(self._adapter_state(), directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps(self._adapter_config()))
        return {"seconds": time.monotonic() - started, "bytes": float(size)}

    def _adapter_config(self) -> dict[str, Any]:
        import json

        config = self.model.peft_config["default"].to_dict()
        return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's live tensors under PEFT's names (those of adapter_model.safetensors)."""
        if self._adapter_names is None:  # worked out once: PEFT's function took 55-75 ms a call on SmolLM2
            from peft import get_peft_model_state_dict

            by_storage = {p.data_ptr(): n for n, p in self.model.named_parameters() if p.requires_grad}
            state = get_peft_model_state_dict(self.model)
            self._adapter_names = {name: by_storage[t.data_ptr()] for name, t in state.items()}
        params = dict(self.model.named_parameters())  # the current objects: offload and reload replace them
        return {name: params[param].detach() for name, param in self._adapter_names.items()}

    @torch.no_grad()
    def export_merged(
        self, directory: str | Path, changed_only: bool = False, dtype: str | None = None
    ) -> dict[str, float]:
        """Base weights with the adapter merged in, as safetensors + config.json, for update_weights_from_disk.

        `changed_only`: just the layers the adapter touches (a server updating in place keeps the rest; a server
        starting from the directory needs everything), rewritten in place (`LayersFile`). `dtype`: write in the
        server's dtype (None: the checkpoint's). Base weights are never modified, so no drift accumulates.
        """
        from safetensors import safe_open
        from safetensors.torch import save_file

        started = time.monotonic()
        out_dtype = getattr(torch, dtype) if dtype else None
        if changed_only:
            return self._export_layers(Path(directory), out_dtype)
        # Every tensor under the checkpoint's own name and layout (transformers may hold some differently in memory:
        # a mixture of experts' experts as one tensor), the adapted layers merged.
        from ..models import weight_files

        layers = self._checked_layers()
        state = {}
        for path in weight_files(Path(self.settings.base_model)):
            with safe_open(str(path), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor = stored = f.get_tensor(name)
                    if name in layers:
                        weight, delta = _weight_and_delta(layers[name])
                        tensor = weight + delta
                    state[name] = tensor.to("cpu", out_dtype or stored.dtype).contiguous()
        target = Path(directory)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # The checkpoint's config, tokenizer and generation files: a server can start from this directory alone.
        for pattern in ("config.json", *SERVABLE_FILES):
            for f in Path(self.settings.base_model).glob(pattern):
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        size = sum(t.numel() * t.element_size() for t in state.values())
        return {"export_seconds": time.monotonic() - started, "export_bytes": float(size)}

    def _checked_layers(self) -> dict[str, torch.nn.Module]:
        """The LoRA layers, each under a name the base checkpoint has (else a server would never load it)."""
        from ..models import weight_names

        layers = self._adapted_layers()
        unknown = sorted(set(layers) - set(weight_names(Path(self.settings.base_model))))
        if unknown:
            raise RuntimeError(
                f"the adapted layers {unknown[:3]} are not in the base checkpoint under these names, so merged weights "
                "would not reach the server; use weight_sync_method='lora', or target other modules"
            )
        return layers

    def _adapted_layers(self) -> dict[str, torch.nn.Module]:
        """The LoRA layers, by the name of the base weight each one changes."""
        from peft.tuners.lora import LoraLayer

        base = self.model.get_base_model()
        return {f"{n}.weight": m for n, m in base.named_modules() if isinstance(m, LoraLayer)}

    def _export_layers(self, target: Path, out_dtype: torch.dtype | None) -> dict[str, float]:
        """The layers the adapter touches, merged, written in place into `target`'s LayersFile."""
        started = time.monotonic()
        layers = self._adapted_layers() if self._layers_files else self._checked_layers()
        specs = {}
        for name, module in layers.items():
            weight = module.get_base_layer().weight
            specs[name] = (out_dtype or weight.dtype, tuple(weight.shape))
        path = target / "model.safetensors"
        file = self._layers_files.get(path)
        if file is None or not file.fits(path, specs):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(self.settings.base_model) / "config.json", target / "config.json")
            file = self._layers_files[path] = LayersFile(path, specs)
        for name, module in layers.items():
            weight, delta = _weight_and_delta(module)
            view = file.views[name]
            if view.dtype == weight.dtype and weight.device.type == "cpu":
                torch.add(weight, delta, out=view)
            else:
                view.copy_(weight + delta)
        return {"export_seconds": time.monotonic() - started, "export_bytes": float(file.nbytes)}

    # -- memory -----------------------------------------------------------------------------------------
    def offload(self) -> dict[str, float]:
        """Move weights and optimizer state to CPU memory (shared mode: the server needs the GPU)."""
        started = time.monotonic()
        self._move("cpu")
        self.offloaded = True
        return {"offload_seconds": time.monotonic() - started}

    def reload(self) -> dict[str, float]:
        started = time.monotonic()
        self._move(self.device)
        self.offloaded = False
        return {"reload_seconds": time.monotonic() - started}

    def _move(self, device: str | torch.device) -> None:
        """Move every parameter, buffer and optimizer tensor. On a GPU, host copies live in pinned memory (page-
        locked: copies run at the bus's speed, not a tenth of it), and a frozen tensor's host copy is made once and
        kept: the base weights never change, so offloading them again copies nothing."""
        device = torch.device(device)
        if self.device.type != "cuda":
            self.model.to(device)
        else:
            tensors = [*self.model.named_parameters(), *self.model.named_buffers()]
            for name, t in tensors:
                t.data = self._placed(name, t.data, device, frozen=not t.requires_grad)
            for i, state in enumerate(self.optimizer.state.values()):
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        state[k] = self._placed(f"optimizer.{i}.{k}", v, device, frozen=False)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _placed(self, name: str, t: torch.Tensor, device: torch.device, frozen: bool) -> torch.Tensor:
        if device.type == "cuda":
            return t.to(device, non_blocking=True)
        host = self._host.get(name)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = self._host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        elif frozen:
            return host  # the copy made at the first offload is still exact
        host.copy_(t, non_blocking=True)
        return host


def _weight_and_delta(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA layer's base weight and the adapter's change to it, in the weight's dtype."""
    weight = module.get_base_layer().weight
    return weight, module.get_delta_weight(module.active_adapters[0]).to(weight.dtype)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`. An existing `target` is first renamed aside (`.<name>.old-*`) and removed
    only once `new` is in place: at every moment one complete copy exists (start-up puts an orphaned old copy back,
    see restore_replaced)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(new, target)
    _fsync(target.parent, os.O_RDONLY)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_replaced(directory: Path) -> None:
    """After a crash in replace_dir: put back an old copy whose replacement never arrived, drop the rest, and drop
    partial writes (`.<name>.tmp-*`)."""
    for old in directory.glob(".*.old-*"):
        for copy in old.iterdir():
            if not (directory / copy.name).exists():
                os.rename(copy, directory / copy.name)
        shutil.rmtree(old, ignore_errors=True)
    for partial in directory.glob(".*.tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)
