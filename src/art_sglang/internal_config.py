"""ART's per-model settings (`_internal_config`, an art.dev.InternalModelConfig, and `lora_config`) applied to this
backend's SGLangConfig, TrainerConfig and DeviceConfig.

What has a meaning here is mapped; everything else is refused with a ConfigError naming the key, since a setting
silently ignored would make a run differ from what its author asked for. A few keys are accepted with no effect,
each with the reason next to it. The model's settings override the backend's. ART 0.5.23 keeps the LoRA settings in
`TrainableModel(lora_config=...)` (rank, alpha, dropout, ...); ART 0.5.18 kept them in `_internal_config["peft_args"]`
under PEFT's names (r, lora_alpha, lora_dropout, ...): both are read, and a key there wins over the same key in
`init_args`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

from .config import DeviceConfig, SGLangConfig, TrainerConfig
from .errors import ConfigError

_Config = TypeVar("_Config", SGLangConfig, TrainerConfig)


class AppliedConfig(NamedTuple):
    """New configs for one model (the inputs are never modified)."""

    sglang: SGLangConfig
    trainer: TrainerConfig
    devices: DeviceConfig  # re-run config.place() on it: the GPU ids may have changed
    peft_args: dict[str, Any]  # extra peft.LoraConfig keywords, for TrainerSettings(peft_args=...)


def apply_internal_config(
    internal: Mapping[str, Any] | None,
    sglang: SGLangConfig,
    trainer: TrainerConfig,
    devices: DeviceConfig,
    *,
    lora_config: Mapping[str, Any] | None = None,
) -> AppliedConfig:
    """Apply `model._internal_config` and `model.lora_config` (ART 0.5.23) to the backend's configs."""
    internal = dict(internal or {})
    _check_top_level(internal)
    lora, lora_prefix = _lora_section(internal, lora_config)

    trainer_changes = _init_args(_section(internal, "init_args"))
    lora_changes, peft_args = _lora(lora, lora_prefix)
    trainer_changes.update(lora_changes)  # lora_config / peft_args win over init_args
    trainer_changes.update(_trainer_args(_section(internal, "trainer_args")))
    new_trainer = _replace(trainer, trainer_changes)

    engine = _section(internal, "engine_args")
    sglang_changes, flags = _engine_args(engine)
    sglang_changes.update(_rollout_modes(internal))
    if "chat_template_path" in internal:
        path = internal["chat_template_path"]
        if not isinstance(path, str):
            raise ConfigError("chat_template_path", path, "the path of a Jinja chat template file")
        sglang_changes["chat_template"] = (os.path.expanduser(path), "chat_template_path")
    new_sglang = _replace(sglang, sglang_changes)
    new_sglang = _add_server_flags(new_sglang, flags)
    new_sglang = _fit_lora_rank(new_sglang, new_trainer.lora_rank, engine)

    new_devices = _devices(internal, devices, new_sglang.tensor_parallel_size)
    return AppliedConfig(new_sglang, new_trainer, new_devices, peft_args)


# -- the top level ------------------------------------------------------------------------------------------------
_HANDLED = (
    "init_args",
    "engine_args",
    "trainer_args",
    "peft_args",
    "trainer_gpu_ids",
    "inference_gpu_ids",
    "rollout_weight_update_mode",
    "rollout_weights_mode",
    "chat_template_path",
    # ART's gate for architectures missing from its model-support registry. This backend has no such registry (it
    # serves what SGLang and transformers load), so there is nothing for it to permit.
    "allow_unvalidated_arch",
)
_TOP_REFUSED = {
    "chat_template": "raw template text has no place here (SGLangConfig.chat_template is a file): save it to a file "
    "and set chat_template_path",
    "chat_template_kwargs": "the trainer renders the conversations it trains on without them, so it would train on "
    "other tokens than the server sampled; write their effect into a chat template file (chat_template_path) "
    "instead, so that sampling and training render alike",
    "chat_template_content_format": "a vLLM setting with no SGLang equivalent (SGLang detects the content format "
    "from the template)",
    "chat_template_tool_schema_format": "the gateway and the trainer render tools with the chat template itself",
    "tinker_args": "Tinker's remote trainer; this backend trains locally",
    "tinker_native_args": "Tinker's remote trainer; this backend trains locally",
    "vllm_runtime": "this backend starts and owns its SGLang server; an external vLLM server cannot replace it",
    "megatron_model_initialization": "ART's Megatron backend only; this trainer loads the pretrained checkpoint",
    "lora_config": "it is an argument of art.TrainableModel(lora_config=...), not a key of _internal_config",
}


def _check_top_level(internal: dict[str, Any]) -> None:
    for key, value in internal.items():
        # ART's get_model_config writes tinker_args=None into every config it builds: None asks for nothing.
        if key == "tinker_args" and value is None:
            continue
        if key in _TOP_REFUSED:
            raise ConfigError(key, value, f"not supported by art-sglang: {_TOP_REFUSED[key]}")
        if key not in _HANDLED:
            raise ConfigError(key, value, f"not a key art-sglang knows; it reads {', '.join(sorted(_HANDLED))}")
    if "allow_unvalidated_arch" in internal and not isinstance(internal["allow_unvalidated_arch"], bool):
        raise ConfigError("allow_unvalidated_arch", internal["allow_unvalidated_arch"], "True or False")


def _section(internal: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = internal.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, "a dict")
    return dict(value)


# -- values -------------------------------------------------------------------------------------------------------
def _int(key: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "True or False")
    return value


def _seed(key: str, value: Any) -> int:
    return _int(key, value, 0)  # TrainerConfig does not check its seed


def _fixed(key: str, value: Any, allowed: tuple[Any, ...], why: str) -> None:
    """A setting accepted only at the value(s) this backend has anyway."""
    if not any(type(value) is type(a) and value == a for a in allowed):
        shown = " or ".join(repr(a) for a in allowed)
        raise ConfigError(key, value, f"only {shown} here: {why}")


def _checkpointing(key: str, value: Any) -> bool:
    """Unsloth's use_gradient_checkpointing (True, False, or "unsloth": ART's default, which also offloads the
    saved activations to the CPU) or transformers' gradient_checkpointing, as TrainerConfig.gradient_checkpointing."""
    if isinstance(value, bool) or value == "unsloth":
        return value is True or value == "unsloth"
    raise ConfigError(key, value, "True, False or 'unsloth' (activations recomputed layer by layer in the backward)")


def _unknown(key: str, value: Any, meaning: str, known: list[str], hint: str = "") -> ConfigError:
    """The error for a key with no meaning here; it lists the keys of its section that are mapped."""
    section = key.split(".")[0]
    hint = f"; {hint}" if hint else ""
    return ConfigError(
        key, value, f"no {meaning} equivalent in art-sglang; the {section} it maps: {', '.join(known)}{hint}"
    )


# A change: the new value of a config field, and the ART key it comes from (named when the config refuses it).
Changes = dict[str, tuple[Any, str]]


def _replace(config: _Config, changes: Changes) -> _Config:
    """A copy of `config` with the changes, validated one at a time so that an error names the ART key."""
    new = copy.deepcopy(config)  # no list shared with the input
    for name, (value, source) in changes.items():
        try:
            new = dataclasses.replace(new, **{name: value})
        except ConfigError as e:
            raise ConfigError(source, value, f"{e.allowed} (it sets {type(config).__name__}.{name})") from None
    return new


# -- init_args (Unsloth's FastLanguageModel.from_pretrained) ------------------------------------------------------
_INIT_FIELDS = {
    "max_seq_length": "max_sequence_length",
    "dtype": "dtype",
    "random_state": "seed",
    "use_gradient_checkpointing": "gradient_checkpointing",
}
_INIT_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "load_in_4bit": ((False,), "the trainer loads the base weights unquantized (TrainerConfig.dtype)"),
    "load_in_8bit": ((False,), "the trainer loads the base weights unquantized (TrainerConfig.dtype)"),
    "full_finetuning": ((False,), "art-sglang trains a LoRA adapter"),
}
_INIT_REFUSED = {
    "model_name": "the trainer loads the model's base_model, or its latest checkpoint",
    "gpu_memory_utilization": "Unsloth's fast_inference engine; set engine_args.gpu_memory_utilization for SGLang",
    "max_lora_rank": "Unsloth's fast_inference engine; set engine_args.max_lora_rank for SGLang",
    "enable_prefix_caching": "Unsloth's fast_inference engine; set engine_args.enable_prefix_caching for SGLang",
}


def _init_args(init: dict[str, Any]) -> Changes:
    changes: Changes = {}
    for key, value in init.items():
        name = f"init_args.{key}"
        if key in _INIT_FIELDS:
            if key == "dtype":  # Unsloth: None (auto), a torch dtype or its name
                value = "auto" if value is None else str(value).removeprefix("torch.")
            elif key == "use_gradient_checkpointing":
                value = _checkpointing(name, value)
            changes[_INIT_FIELDS[key]] = (_seed(name, value) if key == "random_state" else value, name)
        elif key in _INIT_FIXED:
            _fixed(name, value, *_INIT_FIXED[key])
        elif key in _INIT_REFUSED:
            raise ConfigError(name, value, f"not supported by art-sglang: {_INIT_REFUSED[key]}")
        else:
            raise _unknown(name, value, "trainer", sorted(_INIT_FIELDS))
    return changes


# -- the LoRA adapter (lora_config, or peft_args of ART 0.5.18) ---------------------------------------------------
_PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_weights"}
_LORA_FIELDS = {
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "target_modules": "target_modules",
    "random_state": "seed",
    "max_seq_length": "max_sequence_length",
    "use_gradient_checkpointing": "gradient_checkpointing",
}
_LORA_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "bias": (("none",), "SGLang serves adapters without bias terms"),
    "use_rslora": ((False,), "SGLang scales every adapter by alpha / r, not rsLoRA's alpha / sqrt(r)"),
    "init_weights": ((True,), "adapters start as PEFT's default (B = 0), so the first policy is the base model"),
    "layers_to_transform": ((None,), "every layer named in target_modules gets an adapter"),
    "layers_pattern": ((None,), "every layer named in target_modules gets an adapter"),
    "modules_to_save": ((None,), "only LoRA weights reach the server"),
}


def _lora_section(internal: Mapping[str, Any], lora_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The LoRA settings under lora_config's names, and the prefix that errors name them with."""
    if lora_config is not None and not isinstance(lora_config, Mapping):
        raise ConfigError("lora_config", lora_config, "a dict (art.dev.LoRAConfig)")
    peft = _section(internal, "peft_args")
    if lora_config and peft:
        raise ConfigError(
            "peft_args", peft, "give the LoRA settings once: TrainableModel(lora_config=...) (ART 0.5.23) replaces it"
        )
    if peft:
        return {_PEFT_NAMES.get(k, k): v for k, v in peft.items()}, "peft_args"
    return dict(lora_config or {}), "lora_config"


def _lora(lora: dict[str, Any], prefix: str) -> tuple[Changes, dict[str, Any]]:
    changes: Changes = {}
    peft_args: dict[str, Any] = {}
    names = {v: k for k, v in _PEFT_NAMES.items()} if prefix == "peft_args" else {}
    for key, value in lora.items():
        name = f"{prefix}.{names.get(key, key)}"  # as the user wrote it
        if key in _LORA_FIELDS:
            if key == "random_state":
                value = _seed(name, value)
            elif key == "use_gradient_checkpointing":
                value = _checkpointing(name, value)
            changes[_LORA_FIELDS[key]] = (list(value) if isinstance(value, tuple) else value, name)
        elif key == "dropout":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ConfigError(name, value, "a probability in [0, 1)")
            peft_args["lora_dropout"] = float(value)
        elif key in _LORA_FIXED:
            _fixed(name, value, *_LORA_FIXED[key])
        else:
            known = sorted(names.get(k, k) for k in [*_LORA_FIELDS, "dropout"])
            raise _unknown(name, value, "LoRA", known)
    return changes, peft_args


# -- trainer_args (transformers' TrainingArguments, through TRL's GRPOConfig) -------------------------------------
_TRAINER_FIELDS = {"max_grad_norm": "max_grad_norm", "gradient_checkpointing": "gradient_checkpointing"}
# What the trainer does anyway (trainer/core.py): accepted at that value only.
_TRAINER_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "adam_beta1": ((0.9,), "AdamW's betas are (0.9, 0.99), ART's defaults"),
    "adam_beta2": ((0.99,), "AdamW's betas are (0.9, 0.99), ART's defaults"),
    "adam_epsilon": ((1e-8,), "AdamW's epsilon is torch's default, 1e-8"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "the trainer uses torch's AdamW with fp32 adapter state"),
    "gradient_accumulation_steps": ((1,), "pass train(..., grad_accumulation_sequences=N) for N sequences a step"),
}
# Ignored by ART's LocalBackend too (art/unsloth/train.py), so accepted with no effect here.
_TRAINER_IGNORED = {
    # compute_loss sets every param group's lr to the train() call's learning_rate before each step
    "learning_rate": "the train() call's learning_rate rules",
    "lr_scheduler_type": "the train() call's learning_rate overwrites a schedule before every step",
    "warmup_steps": "the train() call's learning_rate overwrites a schedule before every step",
    "warmup_ratio": "the train() call's learning_rate overwrites a schedule before every step",
    # run_unsloth_rl_training resets it to 0.1 each call, SFT to its own (0.0): the trainer's WEIGHT_DECAY
    "weight_decay": "ART resets it on every step",
    # ART replaces TRL's generation and input batching with its own packed tensors
    "num_generations": "rollouts come from the client",
    "per_device_train_batch_size": "ART feeds its own packed batches",
}
_TRAINER_REFUSED = {"seed": "the adapter's seed is lora_config's random_state (or TrainerConfig(seed=...))"}


def _trainer_args(args: dict[str, Any]) -> Changes:
    changes: Changes = {}
    for key, value in args.items():
        name = f"trainer_args.{key}"
        if key in _TRAINER_FIELDS:
            value = _checkpointing(name, value) if key == "gradient_checkpointing" else value
            changes[_TRAINER_FIELDS[key]] = (value, name)
        elif key in _TRAINER_FIXED:
            _fixed(name, value, *_TRAINER_FIXED[key])
        elif key in _TRAINER_REFUSED:
            raise ConfigError(name, value, f"not supported by art-sglang: {_TRAINER_REFUSED[key]}")
        elif key not in _TRAINER_IGNORED:
            raise _unknown(name, value, "trainer", sorted(_TRAINER_FIELDS))
    return changes


# -- engine_args (vLLM's engine arguments) ------------------------------------------------------------------------
def _same(key: str, value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _not(key: str, value: Any) -> bool:
    return not _bool(key, value)


def _dtype(key: str, value: Any) -> Any:
    return {"half": "float16", "float": "float32"}.get(value, value) if isinstance(value, str) else value


# vLLM engine argument -> (the SGLangConfig field of the same meaning, the value's conversion).
_ENGINE_FIELDS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "gpu_memory_utilization": ("mem_fraction_static", _same),
    "max_model_len": ("context_length", _same),
    "tensor_parallel_size": ("tensor_parallel_size", _same),
    "enable_prefix_caching": ("disable_radix_cache", _not),
    "max_loras": ("max_loras_per_batch", _same),
    "max_lora_rank": ("max_lora_rank", _same),
    "max_num_seqs": ("max_running_requests", _same),
    "lora_target_modules": ("lora_target_modules", _same),
    "dtype": ("dtype", _dtype),
    "enable_sleep_mode": ("enable_memory_saver", _bool),  # both free the server's GPU memory while training
}


def _generation_config(key: str, value: Any) -> list[str]:
    # "vllm": ignore the model's generation_config.json defaults (ART's default) = SGLang's "openai" defaults
    modes = {"vllm": "openai", "auto": "model"}
    if value not in modes:
        raise ConfigError(key, value, "'vllm' or 'auto' (SGLang's --sampling-defaults openai / model)")
    return ["--sampling-defaults", modes[value]]


# vLLM engine argument -> the sglang.launch_server flags of the same meaning (appended to SGLangConfig.server_args).
_ENGINE_FLAGS: dict[str, Callable[[str, Any], list[str]]] = {
    "seed": lambda k, v: ["--random-seed", str(_int(k, v, 0))],
    "enforce_eager": lambda k, v: ["--disable-cuda-graph"] if _bool(k, v) else [],
    "generation_config": _generation_config,
}
_ENGINE_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "enable_lora": ((True,), "the server always serves the LoRA adapter"),
    "pipeline_parallel_size": ((1,), "the server runs on one GPU"),
}
_ENGINE_REFUSED = {
    "model": "the server serves the model's base_model",
    "served_model_name": "the backend names the served model after the ART model",
    "tokenizer": "the gateway and the trainer use the model's own tokenizer, and so must the server",
    "trust_remote_code": "the trainer loads models with transformers' own classes only",
    "revision": "base_model is resolved once, locally, for server and trainer: point it at that revision's directory",
    "quantization": "the trainer trains the unquantized model, so the server would sample from another policy "
    "(SGLangConfig(server_args=['--quantization', ...]) does it anyway)",
    "kv_cache_dtype": "the server's logprobs would no longer be the trainer's "
    "(SGLangConfig(server_args=['--kv-cache-dtype', ...]) does it anyway)",
    "max_cpu_loras": "the weight sync loads and unloads the adapters itself",
}


def _engine_args(engine: dict[str, Any]) -> tuple[Changes, list[tuple[str, list[str]]]]:
    changes: Changes = {}
    flags: list[tuple[str, list[str]]] = []  # (the ART key, its flags)
    for key, value in engine.items():
        name = f"engine_args.{key}"
        if key in _ENGINE_REFUSED:
            raise ConfigError(name, value, f"not supported by art-sglang: {_ENGINE_REFUSED[key]}")
        if key in _ENGINE_FIXED:
            _fixed(name, value, *_ENGINE_FIXED[key])
        elif key not in _ENGINE_FIELDS and key not in _ENGINE_FLAGS:
            hint = "other SGLang flags go in SGLangConfig(server_args=[...])"
            raise _unknown(name, value, "SGLang", sorted([*_ENGINE_FIELDS, *_ENGINE_FLAGS]), hint)
        elif value is None:
            continue  # vLLM's None is "its default": the backend's setting stays
        elif key in _ENGINE_FIELDS:
            field, convert = _ENGINE_FIELDS[key]
            changes[field] = (convert(name, value), name)
        else:
            flags.append((name, _ENGINE_FLAGS[key](name, value)))
    return changes, flags


def _add_server_flags(sglang: SGLangConfig, flags: list[tuple[str, list[str]]]) -> SGLangConfig:
    args = list(sglang.server_args)
    for name, new in flags:
        if new and any(a == new[0] or a.startswith(new[0] + "=") for a in args):
            raise ConfigError(name, new, f"SGLangConfig.server_args already has {new[0]}: set it in one place")
        args += new
    return dataclasses.replace(sglang, server_args=args) if flags else sglang


def _fit_lora_rank(sglang: SGLangConfig, rank: int, engine: Mapping[str, Any]) -> SGLangConfig:
    """The server must accept the adapter's rank: raised to it, unless engine_args asked for less."""
    asked = engine.get("max_lora_rank")
    if asked is not None and asked < rank:
        raise ConfigError("engine_args.max_lora_rank", asked, f"at least the adapter's rank, {rank}")
    return dataclasses.replace(sglang, max_lora_rank=rank) if sglang.max_lora_rank < rank else sglang


# -- weight updates -----------------------------------------------------------------------------------------------
def _rollout_modes(internal: Mapping[str, Any]) -> Changes:
    changes: Changes = {}
    mode = internal.get("rollout_weight_update_mode", "step_lora")
    # "step_lora" (one adapter per step) is ART 0.5.23's default, what the `lora` sync does; being every model's
    # default, it leaves the backend's weight_sync_method as chosen.
    if mode == "in_flight_lora":
        raise ConfigError(
            "rollout_weight_update_mode",
            mode,
            "not supported by art-sglang: it updates one adapter slot in place and records token-level policy spans, "
            "which this backend does not do; use 'step_lora' (the `lora` weight sync)",
        )
    if mode != "step_lora":
        raise ConfigError("rollout_weight_update_mode", mode, "'step_lora'")
    # ART 0.5.18's key: "lora" serves adapters (the `lora` sync, left as chosen like step_lora), "merged" pushes
    # merged weights into the server, which is the `disk` sync.
    legacy = internal.get("rollout_weights_mode", "lora")
    if legacy == "merged":
        changes["weight_sync_method"] = ("disk", "rollout_weights_mode")
    elif legacy != "lora":
        raise ConfigError("rollout_weights_mode", legacy, "'lora' or 'merged' (the `disk` weight sync)")
    return changes


# -- devices ------------------------------------------------------------------------------------------------------
def _devices(internal: Mapping[str, Any], devices: DeviceConfig, tensor_parallel_size: int) -> DeviceConfig:
    has_trainer, has_inference = "trainer_gpu_ids" in internal, "inference_gpu_ids" in internal
    if not has_trainer and not has_inference:
        return copy.deepcopy(devices)
    if has_trainer != has_inference:
        given = "trainer_gpu_ids" if has_trainer else "inference_gpu_ids"
        raise ConfigError(
            given, internal[given], "set together with the other of trainer_gpu_ids / inference_gpu_ids, as in ART"
        )
    trainer_ids, inference_ids = internal["trainer_gpu_ids"], internal["inference_gpu_ids"]
    if not isinstance(inference_ids, list | tuple) or not inference_ids:
        raise ConfigError("inference_gpu_ids", inference_ids, "a non-empty list of GPU ids, e.g. [0]")
    if len(inference_ids) != tensor_parallel_size:
        raise ConfigError(
            "inference_gpu_ids",
            inference_ids,
            f"tensor_parallel_size ({tensor_parallel_size}) GPU ids: ART runs one server across them (ART requires "
            "tensor_parallel_size == len(inference_gpu_ids)); for several replicas use "
            "DeviceConfig(inference_devices=[...])",
        )
    try:
        new = DeviceConfig(training_devices=trainer_ids, auto_detect=False, inference_devices=list(inference_ids))
    except ConfigError as e:
        key = "trainer_gpu_ids" if e.field == "training_devices" else "inference_gpu_ids"
        raise ConfigError(key, internal[key], e.allowed) from None
    if not devices.auto_detect and (devices.serving_devices, devices.training_devices) != (
        new.serving_devices,
        new.training_devices,
    ):
        raise ConfigError(
            "trainer_gpu_ids",
            trainer_ids,
            f"the backend was given other devices (serving {devices.serving_devices}, training "
            f"{devices.training_devices}): set them in one place",
        )
    return new
