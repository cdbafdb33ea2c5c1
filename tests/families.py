"""Tiny random-initialized models of the families ART users train, built at test time (nothing is downloaded).

Each is its family's `transformers` config class at a few layers and a small width, saved as a plain safetensors
directory with a tokenizer and a chat template in that family's format. The tokenizer is SmolLM2's byte-level BPE
with the family's special tokens added (the families' own vocabularies are not on this machine); what differs
between families, and what a sync can get wrong, is in the weights: module names, fused projections, biases,
q/k norms, tied embeddings, experts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "templates"
WIDTH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048}  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # in transformers
    template: str  # file in tests/templates
    special: tuple[str, ...]  # the family's chat tokens, added to the tokenizer
    bos: str | None
    eos: str  # the end-of-turn token: the model's EOS
    config: dict[str, Any] = field(default_factory=dict)
    tool_call_parser: str | None = None  # what tool_call_parser_for must choose from the template
    what: str = ""  # what this family puts to the test


FAMILIES = (
    Family("llama", "LlamaConfig", "llama3.jinja", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|python_tag|>"), "<|begin_of_text|>", "<|eot_id|>",
           tool_call_parser="llama3", what="the reference shape (as SmolLM2); separate q/k/v, gate/up"),
    Family("qwen2", "Qwen2Config", "chatml_tools.jinja", ("<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
           {"tie_word_embeddings": True}, "qwen25", "q/k/v biases, tied embeddings"),
    Family("qwen3", "Qwen3Config", "chatml_tools_reasoning.jinja", ("<|im_start|>", "<|im_end|>"), None,
           "<|im_end|>", {"tie_word_embeddings": True}, "qwen25", "q/k norms, tied embeddings, a reasoning template"),
    Family("mistral", "MistralConfig", "mistral.jinja", ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
           "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "<s>", "</s>",
           {"sliding_window": None}, "mistral", "Mistral's module names and [INST] template"),
    Family("gemma", "Gemma3TextConfig", "gemma.jinja", ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
           "<end_of_turn>", {"tie_word_embeddings": True, "sliding_window": 512, "query_pre_attn_scalar": 16},
           None, "Gemma 3: (1 + w) norms, q/k norms, scaled embeddings, sliding layers, tied embeddings"),
    Family("phi3", "Phi3Config", "phi3.jinja", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), None,
           "<|end|>", {"pad_token_id": 0}, None, "qkv_proj and gate_up_proj fused in the checkpoint"),
    Family("qwen3_moe", "Qwen3MoeConfig", "chatml_tools_reasoning.jinja", ("<|im_start|>", "<|im_end|>"), None,
           "<|im_end|>", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
           "decoder_sparse_step": 1, "tie_word_embeddings": False}, "qwen25",
           "a mixture of experts (untied, as Qwen3-MoE ships: SGLang's Qwen3-MoE ignores tie_word_embeddings)"),
)  # fmt: skip
BY_NAME = {f.name: f for f in FAMILIES}


def build(family: Family, smollm2: Path, target: Path, seed: int = 0) -> Path:
    """The family's tiny model in `target` (reused when complete); SmolLM2's directory gives the tokenizer."""
    if (target / "config.json").is_file():
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    tokenizer.add_special_tokens({"additional_special_tokens": list(family.special)})
    tokenizer.bos_token = family.bos
    tokenizer.eos_token = family.eos
    tokenizer.chat_template = (TEMPLATES / family.template).read_text()
    ids = tokenizer.convert_tokens_to_ids
    config = getattr(transformers, family.config_class)(
        **WIDTH,
        vocab_size=len(tokenizer),
        bos_token_id=ids(family.bos) if family.bos else None,
        eos_token_id=ids(family.eos),
        initializer_range=0.1,  # wider than pretraining's: a peaked distribution, so a wrong policy shows
        **family.config,
    )
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = ids(family.eos)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def describe(model_dir: Path) -> dict[str, Any]:
    """What the checkpoint holds that a sync must get right (for the matrix's record)."""
    config = json.loads((model_dir / "config.json").read_text())
    return {
        "architecture": config["architectures"][0],
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
    }


def tiny_smollm2(smollm2: Path, target: Path, seed: int = 0) -> Path:
    """SmolLM2-135M-Instruct's architecture, tokenizer and chat template at WIDTH, random weights (reused when
    complete): for tests of plumbing (routing, syncs, faults) where a real model's text adds nothing but time."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(smollm2))
    for key, value in {**WIDTH, "initializer_range": 0.1}.items():
        setattr(config, key, value)
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in smollm2.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy(f, tmp / f.name)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
