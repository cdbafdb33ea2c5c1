"""apply_internal_config: ART's `_internal_config` and `lora_config`, as users write them, mapped onto our configs."""

from __future__ import annotations

import art
import pytest
import torch

from art_sglang.config import DeviceConfig, SGLangConfig, TrainerConfig, place
from art_sglang.errors import ConfigError
from art_sglang.internal_config import apply_internal_config

IMC = art.dev.InternalModelConfig
LoRAConfig = getattr(art.dev, "LoRAConfig", dict)  # ART 0.5.23's TrainableModel(lora_config=...); a dict before


def apply(internal=None, *, sglang=None, trainer=None, devices=None, lora_config=None):
    return apply_internal_config(
        internal,
        sglang or SGLangConfig(),
        trainer or TrainerConfig(),
        devices or DeviceConfig(),
        lora_config=lora_config,
    )


def refused(internal=None, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        apply(internal, **kwargs)
    return e.value


# -- nothing asked --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("internal", [None, IMC()])
def test_nothing_asked_gives_equal_new_configs(internal):
    sglang, trainer, devices = SGLangConfig(server_args=["--log-level", "info"]), TrainerConfig(), DeviceConfig()
    out = apply_internal_config(internal, sglang, trainer, devices)
    assert (out.sglang, out.trainer, out.devices, out.peft_args) == (sglang, trainer, devices, {})
    assert out.sglang is not sglang and out.trainer is not trainer and out.devices is not devices
    assert out.sglang.server_args is not sglang.server_args  # no list shared with the input


# -- the LoRA adapter ---------------------------------------------------------------------------------------------
def test_lora_config_sets_the_adapter():
    lora = LoRAConfig(
        rank=32, alpha=64, dropout=0.05, target_modules=["q_proj", "v_proj"], random_state=3407, max_seq_length=4096
    )
    out = apply(lora_config=lora)
    t = out.trainer
    assert (t.lora_rank, t.lora_alpha, t.target_modules, t.seed, t.max_sequence_length) == (
        32,
        64,
        ["q_proj", "v_proj"],
        3407,
        4096,
    )
    assert out.peft_args == {"lora_dropout": 0.05}
    assert out.sglang.max_lora_rank == 32  # the server must accept the adapter's rank


def test_peft_args_of_art_0_5_18_use_peft_names():
    out = apply(IMC(peft_args={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ("q_proj",)}))
    assert (out.trainer.lora_rank, out.trainer.lora_alpha, out.trainer.target_modules) == (4, 8, ["q_proj"])
    assert out.peft_args == {"lora_dropout": 0.1}
    assert out.sglang.max_lora_rank == 16  # never lowered


def test_lora_settings_win_over_init_args():
    internal = IMC(init_args={"max_seq_length": 2048, "random_state": 1})
    out = apply(internal, lora_config={"max_seq_length": 1024, "random_state": 2})
    assert (out.trainer.max_sequence_length, out.trainer.seed) == (1024, 2)
    out = apply(IMC(init_args={"max_seq_length": 2048, "random_state": 1}, peft_args={"random_state": 5}))
    assert (out.trainer.max_sequence_length, out.trainer.seed) == (2048, 5)


def test_lora_given_twice_is_refused():
    e = refused(IMC(peft_args={"r": 4}), lora_config={"rank": 8})
    assert e.field == "peft_args" and "lora_config" in str(e)


@pytest.mark.parametrize(
    ("lora_config", "peft_args", "key"),
    [
        ({"use_rslora": True}, None, "lora_config.use_rslora"),
        ({"bias": "all"}, None, "lora_config.bias"),
        ({"modules_to_save": ["lm_head"]}, None, "lora_config.modules_to_save"),
        ({"init_weights": "pissa"}, None, "lora_config.init_weights"),
        ({"use_gradient_checkpointing": "offload"}, None, "lora_config.use_gradient_checkpointing"),
        ({"loftq_config": {}}, None, "lora_config.loftq_config"),
        ({"dropout": 1.5}, None, "lora_config.dropout"),
        ({"rank": 0}, None, "lora_config.rank"),
        ({"target_modules": "all-linear"}, None, "lora_config.target_modules"),
        ({"random_state": "x"}, None, "lora_config.random_state"),
        (None, {"r": -1}, "peft_args.r"),
        (None, {"init_lora_weights": "gaussian"}, "peft_args.init_lora_weights"),
        (None, {"task_type": "CAUSAL_LM"}, "peft_args.task_type"),
    ],
)
def test_lora_refusals_name_the_key(lora_config, peft_args, key):
    internal = IMC(peft_args=peft_args) if peft_args else None
    e = refused(internal, lora_config=lora_config)
    assert e.field == key and str(e).startswith(f"{key}=")


def test_lora_defaults_written_out_are_accepted():
    lora = {"bias": "none", "use_rslora": False, "init_weights": True, "modules_to_save": None}
    assert apply(lora_config=lora).trainer == TrainerConfig()


# -- init_args ----------------------------------------------------------------------------------------------------
def test_init_args_map_to_the_trainer():
    out = apply(IMC(init_args={"max_seq_length": 8192, "dtype": torch.float16, "load_in_4bit": False}))
    assert (out.trainer.max_sequence_length, out.trainer.dtype) == (8192, "float16")
    assert apply(IMC(init_args={"dtype": None}), trainer=TrainerConfig(dtype="float32")).trainer.dtype == "auto"


@pytest.mark.parametrize(
    ("init_args", "words"),
    [
        ({"load_in_4bit": True}, "unquantized"),
        ({"full_finetuning": True}, "LoRA"),
        ({"model_name": "x"}, "base_model"),
        ({"gpu_memory_utilization": 0.5}, "engine_args.gpu_memory_utilization"),
        ({"fix_tokenizer": True}, "max_seq_length"),  # unknown: lists what is read
        ({"max_seq_length": 1}, "max_sequence_length"),
    ],
)
def test_init_args_refusals_name_the_key(init_args, words):
    e = refused(IMC(init_args=init_args))
    key = f"init_args.{next(iter(init_args))}"
    assert e.field == key and words in str(e)


# -- engine_args --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("engine_args", "field", "value"),
    [
        ({"gpu_memory_utilization": 0.6}, "mem_fraction_static", 0.6),
        ({"max_model_len": 4096}, "context_length", 4096),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size", 2),
        ({"enable_prefix_caching": False}, "disable_radix_cache", True),
        ({"enable_prefix_caching": True}, "disable_radix_cache", False),
        ({"max_loras": 2}, "max_loras_per_batch", 2),
        ({"max_lora_rank": 64}, "max_lora_rank", 64),
        ({"lora_target_modules": ["q_proj"]}, "lora_target_modules", ["q_proj"]),
        ({"dtype": "bfloat16"}, "dtype", "bfloat16"),
        ({"dtype": "half"}, "dtype", "float16"),
        ({"dtype": "float"}, "dtype", "float32"),
        ({"enable_sleep_mode": False}, "enable_memory_saver", False),
        ({"enable_sleep_mode": True}, "enable_memory_saver", True),
    ],
)
def test_engine_args_map_to_sglang_config(engine_args, field, value):
    out = apply(IMC(engine_args=engine_args))
    assert getattr(out.sglang, field) == value
    assert out.sglang.server_args == []


def test_engine_args_none_keeps_the_backend_setting():
    out = apply(
        IMC(engine_args={"enable_prefix_caching": None, "max_model_len": None}),
        sglang=SGLangConfig(disable_radix_cache=True, context_length=1024),
    )
    assert (out.sglang.disable_radix_cache, out.sglang.context_length) == (True, 1024)


def test_engine_args_become_server_flags():
    sglang = SGLangConfig(server_args=["--log-level", "info"])
    engine = {"seed": 7, "max_num_seqs": 32, "enforce_eager": True, "generation_config": "vllm"}
    out = apply(IMC(engine_args=engine), sglang=sglang)
    assert out.sglang.max_running_requests == 32  # the server's flag and the gateway's bound
    assert out.sglang.server_args == [
        "--log-level",
        "info",
        "--random-seed",
        "7",
        "--disable-cuda-graph",
        "--sampling-defaults",
        "openai",
    ]
    assert sglang.server_args == ["--log-level", "info"]  # the input is untouched
    assert apply(IMC(engine_args={"enforce_eager": False})).sglang.server_args == []
    assert apply(IMC(engine_args={"generation_config": "auto"})).sglang.server_args == ["--sampling-defaults", "model"]


@pytest.mark.parametrize("server_args", [["--random-seed", "1"], ["--random-seed=1"]])
def test_engine_flag_set_twice_is_refused(server_args):
    e = refused(IMC(engine_args={"seed": 7}), sglang=SGLangConfig(server_args=server_args))
    assert e.field == "engine_args.seed" and "one place" in str(e)


def test_engine_args_that_change_nothing_are_accepted():
    out = apply(IMC(engine_args={"enable_lora": True, "pipeline_parallel_size": 1}))
    assert out.sglang == SGLangConfig()


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("max_logprobs", 20, "no SGLang equivalent"),
        ("max_num_batched_tokens", 8192, "no SGLang equivalent"),
        ("swap_space", 4, "no SGLang equivalent"),
        ("allowed_local_media_path", "/tmp", "no SGLang equivalent"),
        ("quantization", "awq", "unquantized"),
        ("kv_cache_dtype", "fp8", "logprobs"),
        ("served_model_name", "x", "ART model"),
        ("model", "x", "base_model"),
        ("tokenizer", "x", "tokenizer"),
        ("trust_remote_code", True, "transformers"),
        ("max_cpu_loras", 4, "weight sync"),
        ("enable_lora", False, "always"),
        ("pipeline_parallel_size", 2, "one GPU"),
        ("generation_config", "/models/x", "sampling-defaults"),
        ("gpu_memory_utilization", 1.5, "mem_fraction_static"),
        ("dtype", "int8", "SGLangConfig.dtype"),
        ("enable_prefix_caching", "yes", "True or False"),
        ("max_num_seqs", 0, "integer >= 1"),
    ],
)
def test_engine_refusals_name_the_key(key, value, words):
    e = refused(IMC(engine_args={key: value}))
    assert e.field == f"engine_args.{key}" and str(e).startswith(f"engine_args.{key}=") and words in str(e)


def test_unmapped_engine_arg_lists_the_mapped_ones():
    message = str(refused(IMC(engine_args={"max_logprobs": 20})))
    for mapped in ("gpu_memory_utilization", "max_model_len", "max_num_seqs", "enforce_eager", "server_args"):
        assert mapped in message


def test_server_lora_rank_below_the_adapters_is_refused():
    e = refused(IMC(engine_args={"max_lora_rank": 8}), lora_config={"rank": 16})
    assert e.field == "engine_args.max_lora_rank" and "16" in str(e)


# -- devices ------------------------------------------------------------------------------------------------------
def test_gpu_ids_become_the_placement():
    out = apply(IMC(trainer_gpu_ids=[1, 2], inference_gpu_ids=[0]))
    assert out.devices == DeviceConfig(0, [1, 2], auto_detect=False)
    assert place(out.devices, 3).mode == "split"
    shared = apply(IMC(trainer_gpu_ids=[1], inference_gpu_ids=[1])).devices
    assert place(shared, 2).mode == "shared" and place(shared, 2).inference_device == 1
    # ART's rule: one server across inference_gpu_ids, tensor_parallel_size of them.
    tp = apply(IMC(trainer_gpu_ids=[2, 3], inference_gpu_ids=[0, 1], engine_args={"tensor_parallel_size": 2}))
    assert tp.devices.serving_devices == [0, 1] and tp.sglang.tensor_parallel_size == 2
    p = place(tp.devices, 4, tensor_parallel_size=2)
    assert (p.mode, p.servers, p.training_devices) == ("split", [[0, 1]], [2, 3])


def test_gpu_ids_matching_the_backends_devices_are_accepted():
    devices = DeviceConfig(0, [1], auto_detect=False)
    assert apply(IMC(trainer_gpu_ids=[1], inference_gpu_ids=[0]), devices=devices).devices == devices


@pytest.mark.parametrize(
    ("internal", "key", "words"),
    [
        (IMC(trainer_gpu_ids=[1]), "trainer_gpu_ids", "inference_gpu_ids"),
        (IMC(inference_gpu_ids=[0]), "inference_gpu_ids", "trainer_gpu_ids"),
        (IMC(trainer_gpu_ids=[2], inference_gpu_ids=[0, 1]), "inference_gpu_ids", "one server across them"),
        (IMC(trainer_gpu_ids=[1], inference_gpu_ids=[]), "inference_gpu_ids", "non-empty"),
        (IMC(trainer_gpu_ids=[0, 1], inference_gpu_ids=[0]), "trainer_gpu_ids", "are both"),
        (IMC(trainer_gpu_ids=[], inference_gpu_ids=[0]), "trainer_gpu_ids", "non-empty"),
        (IMC(trainer_gpu_ids=[1], inference_gpu_ids=[-1]), "inference_gpu_ids", ">= 0"),
        (
            IMC(trainer_gpu_ids=[1], inference_gpu_ids=[0], engine_args={"tensor_parallel_size": 2}),
            "inference_gpu_ids",
            "tensor_parallel_size",
        ),
    ],
)
def test_gpu_id_refusals_name_the_key(internal, key, words):
    e = refused(internal)
    assert e.field == key and words in str(e)


def test_gpu_ids_conflicting_with_the_backends_devices_are_refused():
    e = refused(IMC(trainer_gpu_ids=[2], inference_gpu_ids=[0]), devices=DeviceConfig(0, [1], auto_detect=False))
    assert e.field == "trainer_gpu_ids" and "one place" in str(e)


# -- trainer_args -------------------------------------------------------------------------------------------------
def test_trainer_args_map_or_change_nothing():
    args = art.dev.TrainerArgs(
        max_grad_norm=1.0,
        learning_rate=1e-4,  # ART too: each train() call's learning_rate rules
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        num_generations=8,
        adam_beta1=0.9,
        adam_beta2=0.99,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        optim="adamw_torch",
    )
    out = apply(IMC(trainer_args=args))
    assert out.trainer == TrainerConfig(max_grad_norm=1.0, gradient_checkpointing=False)


@pytest.mark.parametrize(
    ("internal", "lora_config"),
    [
        (IMC(init_args={"use_gradient_checkpointing": "unsloth"}), None),  # ART's default
        (None, {"use_gradient_checkpointing": True}),
        (IMC(trainer_args={"gradient_checkpointing": True}), None),
    ],
)
def test_art_gradient_checkpointing_turns_it_on(internal, lora_config):
    assert TrainerConfig().gradient_checkpointing is None  # not asked: on a GPU, off on the CPU
    assert apply(internal, lora_config=lora_config).trainer.gradient_checkpointing is True


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("adam_beta1", 0.8, "0.9"),
        ("optim", "paged_adamw_8bit", "AdamW"),
        ("gradient_accumulation_steps", 4, "grad_accumulation_sequences"),
        ("gradient_checkpointing", "yes", "'unsloth'"),
        ("seed", 1, "random_state"),
        ("max_grad_norm", 0, "max_grad_norm"),
        ("max_steps", 10, "no trainer equivalent"),
        ("report_to", "wandb", "max_grad_norm"),  # unknown: lists what is read
    ],
)
def test_trainer_args_refusals_name_the_key(key, value, words):
    e = refused(IMC(trainer_args={key: value}))
    assert e.field == f"trainer_args.{key}" and words in str(e)


# -- weight updates -----------------------------------------------------------------------------------------------
def test_step_lora_is_accepted_and_keeps_the_sync_method():
    assert apply(IMC(rollout_weight_update_mode="step_lora")).sglang.weight_sync_method == "lora"
    out = apply(IMC(rollout_weight_update_mode="step_lora"), sglang=SGLangConfig(weight_sync_method="disk"))
    assert out.sglang.weight_sync_method == "disk"


def test_merged_rollout_weights_of_art_0_5_18_are_the_disk_sync():
    assert apply(IMC(rollout_weights_mode="merged")).sglang.weight_sync_method == "disk"
    assert apply(IMC(rollout_weights_mode="lora")).sglang.weight_sync_method == "lora"


@pytest.mark.parametrize(
    ("internal", "key", "words"),
    [
        (IMC(rollout_weight_update_mode="in_flight_lora"), "rollout_weight_update_mode", "step_lora"),
        (IMC(rollout_weight_update_mode="x"), "rollout_weight_update_mode", "step_lora"),
        (IMC(rollout_weights_mode="x"), "rollout_weights_mode", "merged"),
    ],
)
def test_weight_update_refusals_name_the_key(internal, key, words):
    e = refused(internal)
    assert e.field == key and words in str(e)


# -- chat template ------------------------------------------------------------------------------------------------
def test_chat_template_path_sets_the_template(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    assert apply(IMC(chat_template_path=str(template))).sglang.chat_template == str(template)


@pytest.mark.parametrize(
    ("internal", "key", "words"),
    [
        (IMC(chat_template_path="/no/such/template.jinja"), "chat_template_path", "SGLangConfig.chat_template"),
        (IMC(chat_template="{{ messages }}"), "chat_template", "chat_template_path"),
        (IMC(chat_template_kwargs={"enable_thinking": False}), "chat_template_kwargs", "trainer"),
        (IMC(chat_template_content_format="string"), "chat_template_content_format", "vLLM"),
        (IMC(chat_template_tool_schema_format="vllm_openai"), "chat_template_tool_schema_format", "chat template"),
    ],
)
def test_chat_template_refusals_name_the_key(internal, key, words):
    e = refused(internal)
    assert e.field == key and words in str(e)


# -- the rest -----------------------------------------------------------------------------------------------------
def test_keys_that_ask_nothing_here_are_accepted():
    out = apply(IMC(allow_unvalidated_arch=True, tinker_args=None))
    assert (out.sglang, out.trainer) == (SGLangConfig(), TrainerConfig())


@pytest.mark.parametrize(
    ("internal", "key", "words"),
    [
        (IMC(tinker_args={"renderer_name": "qwen3"}), "tinker_args", "Tinker"),
        (IMC(tinker_native_args={"renderer_name": "qwen3"}), "tinker_native_args", "Tinker"),
        (IMC(vllm_runtime={"mode": "external", "server_url": "http://x"}), "vllm_runtime", "SGLang server"),
        (IMC(megatron_model_initialization="random"), "megatron_model_initialization", "Megatron"),
        ({"lora_config": {"rank": 8}}, "lora_config", "TrainableModel"),
        ({"rollout_weights": "lora"}, "rollout_weights", "engine_args"),  # unknown: lists what is read
        ({"engine_args": ["x"]}, "engine_args", "a dict"),
        (IMC(allow_unvalidated_arch="yes"), "allow_unvalidated_arch", "True or False"),
    ],
)
def test_top_level_refusals_name_the_key(internal, key, words):
    e = refused(internal)
    assert e.field == key and str(e).startswith(f"{key}=") and words in str(e)
