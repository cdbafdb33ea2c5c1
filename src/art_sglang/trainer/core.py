"""PolicyTrainer: the base model with a PEFT LoRA adapter, AdamW, and one RL step as plain code.

Runs inside the trainer worker process (trainer/worker.py), never in the user's process. The same code serves
the CPU (fp32, for tests and the demo) and GPUs (bf16). Memory: logits are computed only for trainable tokens,
in chunks that are recomputed in the backward pass, so full-vocabulary logits are never materialized.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..config import ALL_LINEAR
from .loss import LossConfig, policy_loss
from .sequence import Sequence

TRAINER_STATE = "trainer_state.pt"


@dataclass
class TrainerSettings:
    """What the worker builds once. `peft_args` (ART's `_internal_config.peft_args`) override the LoRA fields."""

    base_model: str
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    peft_args: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    adapter_dtype: str = "float32"  # LoRA weights and optimizer state; "auto": the base model's dtype
    device: str = "auto"  # auto: cuda if visible, else cpu
    max_grad_norm: float = 0.1  # ART's default
    micro_batch_tokens: int = 8192  # padded tokens per forward pass
    logprob_chunk: int = 1024  # target tokens per logits chunk
    gradient_checkpointing: bool = False
    compile: bool | None = None  # torch.compile each decoder layer; None: on a GPU (fuses the elementwise work)
    seed: int = 0
    threads: int | None = None  # torch threads on the CPU


@dataclass
class StepOptions:
    """Per-step options, from `backend.train(...)` keywords."""

    learning_rate: float = 5e-6
    loss: LossConfig = field(default_factory=LossConfig)
    total_tokens: int | None = None  # trainable tokens over all ranks (the loss is a mean over them)


def _resolve(settings: TrainerSettings) -> tuple[torch.device, torch.dtype]:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def token_logprobs(
    hidden: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `targets` and entropies, from hidden states [N, H] and the output matrix [V, H].

    Each chunk's logits are recomputed in backward instead of kept, so memory grows with `chunk`, not N.
    """

    def one(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = (h @ lm_head.T).float()
        lse = torch.logsumexp(logits, dim=-1)
        lp = logits.gather(-1, t[:, None])[:, 0] - lse
        with torch.no_grad():
            entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
        return lp, entropy

    lps, ents = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        lp, ent = checkpoint(one, h, t, use_reentrant=False) if torch.is_grad_enabled() else one(h, t)
        lps.append(lp)
        ents.append(ent)
    if not lps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(lps), torch.cat(ents)


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
        if settings.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        if settings.compile or (settings.compile is None and self.device.type == "cuda"):
            from torch import _dynamo

            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            for layer in self._backbone().layers:
                layer.compile()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda" and all(p.dtype == torch.float32 for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=5e-6, weight_decay=0.0, fused=fused or None)
        self.step = 0
        self.offloaded = False

    # -- the RL step ------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=self.dtype) if self.mixed else contextlib.nullcontext()

    def _backbone(self) -> torch.nn.Module:
        return self.model.get_base_model().model

    def _lm_head(self) -> torch.Tensor:
        return self.model.get_base_model().get_output_embeddings().weight

    def _forward(self, batch: list[Sequence], seq_offset: int) -> dict[str, torch.Tensor]:
        """Hidden states of the padded batch, gathered at the positions that predict trainable tokens."""
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attn = torch.zeros(len(batch), width, dtype=torch.long)
        target_mask = torch.zeros(len(batch), width, dtype=torch.bool)
        old = torch.full((len(batch), width), math.nan)
        adv = torch.zeros(len(batch), width)
        weight = torch.zeros(len(batch), width)
        seq_ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, s in enumerate(batch):
            n = len(s)
            ids[row, :n] = torch.tensor(s.token_ids)
            attn[row, :n] = 1
            target_mask[row, :n] = torch.tensor(s.mask)
            old[row, :n] = torch.tensor(s.logprobs)
            adv[row, :n] = s.advantage
            weight[row, :n] = s.weight
            seq_ids[row, :n] = seq_offset + row + 1
        target_mask[:, 0] = False  # the first token has no prediction
        # Position t-1 predicts token t.
        pred = target_mask[:, 1:]
        # Index tensors made on the CPU: boolean indexing on the GPU would stall it for a sync.
        rows, cols = pred.nonzero(as_tuple=True)

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        ids_d = dev(ids)
        # Without padding, no mask: SDPA then takes its causal flash path instead of a materialized mask.
        attn_d = None if all(len(s) == width for s in batch) else dev(attn)
        hidden = self._backbone()(input_ids=ids_d, attention_mask=attn_d).last_hidden_state
        rows_d, cols_d = dev(rows), dev(cols)
        return {
            "ids": ids_d,
            "attn": attn_d,
            "rows": rows_d,
            "cols": cols_d,
            "hidden": hidden[rows_d, cols_d],
            "targets": dev(ids[:, 1:][pred]),
            "old": dev(old[:, 1:][pred]),
            "adv": dev(adv[:, 1:][pred]),
            "weight": dev(weight[:, 1:][pred]),
            "seq_ids": dev(seq_ids[:, 1:][pred]),
        }

    def train_step(self, sequences: list[Sequence], options: StepOptions) -> dict[str, float]:
        """One optimizer step over all `sequences` (this rank's share); returns summed metrics for this rank."""
        started = time.monotonic()
        self.model.train()
        cfg = options.loss
        local_tokens = sum(sum(s.mask[1:]) for s in sequences)
        denominator = float(options.total_tokens if options.total_tokens is not None else local_tokens) + 1e-6
        chunk = self.settings.logprob_chunk
        names = ("loss_sum", "entropy_sum", "gap_sum", "gap_tokens", "kl_sum", "kl_batches")
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)  # read once: no per-batch syncs
        offset = 0
        for idx in micro_batches(sequences, self.settings.micro_batch_tokens):
            batch = [sequences[i] for i in idx]
            with self._autocast():
                f = self._forward(batch, offset)
                new_lp, entropy = token_logprobs(f["hidden"], self._lm_head(), f["targets"], chunk)
                ref_lp = None
                if cfg.kl_penalty_coef > 0:
                    with torch.no_grad(), self.model.disable_adapter():
                        h = self._backbone()(input_ids=f["ids"], attention_mask=f["attn"]).last_hidden_state
                        ref_lp, _ = token_logprobs(h[f["rows"], f["cols"]], self._lm_head(), f["targets"], chunk)
            offset += len(batch)
            ones = torch.ones_like(new_lp)
            terms = policy_loss(
                new_lp[None],
                f["old"][None],
                f["adv"][None],
                f["weight"][None],
                ones[None],
                f["seq_ids"][None],
                cfg,
                None if ref_lp is None else ref_lp[None],
            )
            (terms.policy_loss_sum / denominator).backward()
            with torch.no_grad():
                sampled = ~torch.isnan(f["old"])
                gap = torch.where(sampled, (new_lp - f["old"]).abs(), 0.0).sum()
                kl = terms.kl_policy_ref if terms.kl_policy_ref is not None else new_lp.new_zeros(())
                has_kl = float(terms.kl_policy_ref is not None)
                sums += torch.stack(
                    [terms.policy_loss_sum, entropy.sum(), gap, sampled.sum(), kl, kl.new_tensor(has_kl)]
                ).double()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.grad_sync is not None:
            self.grad_sync(grads)  # sums gradients over data-parallel ranks
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = options.learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            **dict(zip(names, sums.tolist(), strict=True)),
            "grad_norm": grad_norm.item(),
            "tokens": float(local_tokens),
            "sequences": float(len(sequences)),
            "train_seconds": time.monotonic() - started,
        }

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[Sequence]) -> list[list[float]]:
        """The current policy's logprobs of each sequence's trainable tokens (for checks and evaluation)."""
        self.model.eval()
        out = []
        for s in sequences:
            with self._autocast():
                f = self._forward([s], 0)
                lp, _ = token_logprobs(f["hidden"], self._lm_head(), f["targets"], self.settings.logprob_chunk)
            out.append(lp.float().cpu().tolist())
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
                    "settings": asdict(self.settings),
                },
                tmp / TRAINER_STATE,
            )
            _fsync_dir(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load_checkpoint(self, directory: str | Path) -> int:
        """Load adapter weights (and optimizer state when present); returns the checkpoint's step."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = load_file(str(directory / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {directory} does not fit this model: {result.unexpected_keys[:3]}")
        state_file = directory / TRAINER_STATE
        if state_file.exists():
            state = torch.load(state_file, map_location=self.device, weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
        else:
            self.step = int(directory.name) if directory.name.isdigit() else 0
        return self.step

    @torch.no_grad()
    def export_merged(self, directory: str | Path) -> dict[str, float]:
        """Base weights with the adapter merged in, as safetensors + config.json, for update_weights_from_disk.

        The merge is computed into new tensors (base weights are never modified, so no drift accumulates).
        """
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import save_file

        started = time.monotonic()
        base = self.model.get_base_model()
        merged: dict[str, torch.Tensor] = {}
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                delta = module.get_delta_weight(module.active_adapters[0])
                merged[f"{name}.weight"] = (weight + delta.to(weight.dtype)).contiguous()
        state = {}
        for key, tensor in base.state_dict().items():
            if "lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            state[key] = merged.get(key, tensor).detach().to("cpu").contiguous()
        if getattr(base.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        target = Path(directory)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        base.config.to_json_file(str(tmp / "config.json"))
        # Tokenizer and generation files too: a server can start from this directory alone.
        for pattern in (
            "tokenizer*",
            "special_tokens_map.json",
            "chat_template*",
            "generation_config.json",
            "vocab*",
            "merges.txt",
        ):
            for f in Path(self.settings.base_model).glob(pattern):
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        size = sum(t.numel() * t.element_size() for t in state.values())
        return {"export_seconds": time.monotonic() - started, "export_bytes": float(size)}

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
        self.model.to(device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
