"""Configuration: defaults of the design's tables, every invalid value, environment overrides, placement."""

from __future__ import annotations

import pytest

from art_sglang import ConfigError, DeviceConfig, SGLangConfig, TrainerConfig
from art_sglang.config import place


def test_defaults_match_the_design_tables():
    d = DeviceConfig()
    assert (d.inference_device, d.training_devices, d.auto_detect) == (0, [1], True)
    c = SGLangConfig()
    assert c.mem_fraction_static == 0.9
    assert c.disable_radix_cache is False
    assert c.max_loras_per_batch == 4
    assert c.context_length is None
    assert c.weight_sync_method == "lora"
    assert c.flush_cache_on_sync is False
    assert c.server_timeout == 120.0
    assert c.tensor_parallel_size == 1
    assert (c.port, c.host, c.server_python, c.weight_sync_method) == (None, "127.0.0.1", None, "lora")


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"mem_fraction_static": 0.0}, "mem_fraction_static", "(0, 1]"),
        ({"mem_fraction_static": 1.5}, "mem_fraction_static", "(0, 1]"),
        ({"mem_fraction_static": "0.9"}, "mem_fraction_static", "(0, 1]"),
        ({"weight_sync_method": "nccl"}, "weight_sync_method", "lora, disk, restart"),
        ({"max_loras_per_batch": 0}, "max_loras_per_batch", ">= 1"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size", ">= 1"),
        ({"data_parallel_size": -1}, "data_parallel_size", ">= 1"),
        ({"context_length": 0}, "context_length", ">= 1"),
        ({"max_total_tokens": -5}, "max_total_tokens", ">= 1"),
        ({"server_timeout": 0}, "server_timeout", "> 0"),
        ({"server_timeout": -3.0}, "server_timeout", "> 0"),
        ({"port": 70000}, "port", "1..55535"),
        ({"port": 60000}, "port", "port + 10000"),
        ({"dtype": "fp8"}, "dtype", "float32"),
        ({"server_args": "--foo"}, "server_args", "list of strings"),
        ({"lora_target_modules": []}, "lora_target_modules", "non-empty"),
        ({"max_lora_rank": 0}, "max_lora_rank", ">= 1"),
        ({"cpu_threads": 0}, "cpu_threads", ">= 1"),
        ({"weight_sync_method": "tensor"}, "weight_sync_method", "not implemented; 'lora' (the default)"),
        ({"data_parallel_size": 2, "weight_sync_method": "disk"}, "data_parallel_size", "#4283"),
        ({"chat_template": "/no/such/template.jinja"}, "chat_template", "Jinja chat template file"),
        ({"tool_call_parser": ""}, "tool_call_parser", "an SGLang name"),
        ({"host": "0.0.0.0"}, "host", "no authentication of its own"),
    ],
)
def test_invalid_sglang_config_names_field_value_and_allowed(kwargs, field, hint):
    with pytest.raises(ConfigError) as err:
        SGLangConfig(**kwargs)
    assert err.value.field == field
    message = str(err.value)
    assert message.startswith(f"{field}=")
    assert hint in message


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"inference_device": -1}, "inference_device", ">= 0"),
        ({"training_devices": [-2]}, "training_devices", ">= 0"),
        ({"training_devices": []}, "training_devices", "non-empty"),
        ({"training_devices": [1, 1]}, "training_devices", "at most once"),
        ({"inference_device": 0, "training_devices": [0, 1]}, "training_devices", "shared mode"),
        ({"inference_devices": []}, "inference_devices", "non-empty"),
        ({"inference_devices": [0, 0]}, "inference_devices", "at most once"),
        ({"inference_devices": [0, 1], "training_devices": [1, 2]}, "training_devices", "[1] are both"),
        ({"inference_device": 3, "inference_devices": [0, 1]}, "inference_device", "they replace it"),
    ],
)
def test_invalid_device_config(kwargs, field, hint):
    with pytest.raises(ConfigError) as err:
        DeviceConfig(**kwargs)
    assert err.value.field == field
    assert hint in str(err.value)


def test_valid_combinations_are_accepted():
    SGLangConfig(weight_sync_method="restart", tensor_parallel_size=2)
    SGLangConfig(tool_call_parser=None, reasoning_parser="qwen3", grammar_backend="xgrammar")
    SGLangConfig(host="0.0.0.0", api_key="secret")
    SGLangConfig(data_parallel_size=2, weight_sync_method="lora")
    SGLangConfig(mem_fraction_static=1.0, port=8000, context_length=4096)
    DeviceConfig(inference_device=2, training_devices=[2])  # shared mode on GPU 2


def test_server_timeout_env_override(monkeypatch):
    monkeypatch.setenv("ART_SERVER_TIMEOUT", "180")
    assert SGLangConfig().server_timeout == 180.0
    assert SGLangConfig(server_timeout=30).server_timeout == 180.0
    monkeypatch.setenv("ART_SERVER_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="ART_SERVER_TIMEOUT='soon'"):
        SGLangConfig()
    monkeypatch.setenv("ART_SERVER_TIMEOUT", "-1")
    with pytest.raises(ConfigError, match="server_timeout"):
        SGLangConfig()


@pytest.mark.parametrize(
    ("gpus", "mode", "inference", "training"),
    [(0, "cpu", None, []), (1, "shared", 0, [0]), (2, "split", 0, [1]), (4, "split", 0, [1, 2, 3])],
)
def test_auto_detect_placement(gpus, mode, inference, training):
    p = place(DeviceConfig(), gpus)
    assert (p.mode, p.inference_device, p.training_devices) == (mode, inference, training)
    assert p.reason


def test_explicit_placement():
    p = place(DeviceConfig(inference_device=1, training_devices=[2, 3], auto_detect=False), 4)
    assert (p.mode, p.inference_device, p.training_devices) == ("split", 1, [2, 3])
    p = place(DeviceConfig(inference_device=0, training_devices=[0], auto_detect=False), 1)
    assert p.mode == "shared"
    with pytest.raises(ConfigError, match=r"GPU\(s\) \[2, 3\] do not exist: 2 visible"):
        place(DeviceConfig(inference_device=0, training_devices=[2, 3], auto_detect=False), 2)


def test_replicas_on_gpus_one_server_per_tensor_parallel_group():
    eight = DeviceConfig(inference_devices=[0, 1, 2, 3], training_devices=[4, 5, 6, 7])  # named: placed as named
    assert not eight.auto_detect
    p = place(eight, 8)
    assert (p.mode, p.inference_device, p.training_devices) == ("split", 0, [4, 5, 6, 7])
    assert p.servers == [[0], [1], [2], [3]] and "4 SGLang servers" in p.reason
    assert place(eight, 8, replicas=4).servers == p.servers  # replicas may repeat the count
    assert place(eight, 8, tensor_parallel_size=2).servers == [[0, 1], [2, 3]]
    assert place(eight, 8, data_parallel_size=2).servers == [[0, 1], [2, 3]]  # SGLang's --dp-size: GPUs too
    one = DeviceConfig(5, [6], auto_detect=False)
    assert DeviceConfig(inference_devices=[5], training_devices=[6]) == one  # one GPU: the same config
    # Detected: the first replicas * tensor_parallel_size GPUs serve, the rest train.
    p = place(DeviceConfig(), 8, replicas=2, tensor_parallel_size=2)
    assert (p.servers, p.training_devices) == ([[0, 1], [2, 3]], [4, 5, 6, 7])
    assert place(DeviceConfig(), 4).servers == [[0]]


@pytest.mark.parametrize(
    ("devices", "gpus", "kwargs", "field", "hint"),
    [
        (
            DeviceConfig(inference_devices=[0, 1, 2], training_devices=[3], auto_detect=False),
            4,
            {"tensor_parallel_size": 2},
            "tensor_parallel_size",
            "a divisor of the 3 serving GPUs",
        ),
        (
            DeviceConfig(inference_devices=[0, 1, 2, 3], training_devices=[4], auto_detect=False),
            5,
            {"replicas": 3},
            "replicas",
            "4 (one server per 1 of the serving GPUs",
        ),
        (DeviceConfig(2, [2], auto_detect=False), 4, {"replicas": 2}, "replicas", "1 in shared mode"),
        (DeviceConfig(2, [3], auto_detect=False), 4, {"replicas": 2}, "replicas", "list 2 GPUs"),
        (DeviceConfig(), 2, {"replicas": 2}, "replicas", "training needs at least one more"),
        (DeviceConfig(), 1, {"tensor_parallel_size": 2}, "tensor_parallel_size", "1 visible GPU(s)"),
    ],
)
def test_replica_placements_refused_name_the_setting(devices, gpus, kwargs, field, hint):
    with pytest.raises(ConfigError) as err:
        place(devices, gpus, **kwargs)
    assert err.value.field == field and hint in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"lora_rank": 0}, "lora_rank", ">= 1"),
        ({"lora_alpha": 1.5}, "lora_alpha", ">= 1"),
        ({"micro_batch_tokens": 0}, "micro_batch_tokens", ">= 1"),
        ({"cpu_threads": 0}, "cpu_threads", ">= 1"),
        ({"max_grad_norm": 0}, "max_grad_norm", "> 0"),
        ({"overlong": "drop"}, "overlong", "'skip' or 'truncate'"),
        ({"max_sequence_length": 1}, "max_sequence_length", ">= 2"),
        ({"dtype": "int8"}, "dtype", "float32"),
        ({"target_modules": []}, "target_modules", "non-empty list"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules", "output layer stays frozen"),
    ],
)
def test_invalid_trainer_config(kwargs, field, hint):
    with pytest.raises(ConfigError) as err:
        TrainerConfig(**kwargs)
    assert err.value.field == field
    assert hint in str(err.value)


def test_servers_started_elsewhere():
    cfg = SGLangConfig(servers=["http://127.0.0.1:30000/", "http://10.0.0.5:30000"], api_key="k")
    assert cfg.servers == ["http://127.0.0.1:30000", "http://10.0.0.5:30000"]
    # The trainer takes every GPU: no server runs here.
    p = place(DeviceConfig(), 4, serving_elsewhere=True)
    assert (p.mode, p.inference_device, p.training_devices, p.servers) == ("split", None, [0, 1, 2, 3], [])
    p = place(DeviceConfig(0, [2, 3], auto_detect=False), 4, serving_elsewhere=True)
    assert p.training_devices == [2, 3]
    assert place(DeviceConfig(), 0, serving_elsewhere=True).mode == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"servers": "http://127.0.0.1:30000"}, "servers", "a list of URLs"),
        ({"servers": ["127.0.0.1:30000"]}, "servers", "URLs like 'http://host:30000'"),
        ({"servers": ["http://127.0.0.1:30000/v1"]}, "servers", "URLs like"),
        ({"servers": ["http://127.0.0.1:1", "http://127.0.0.1:1/"]}, "servers", "each server once"),
        ({"servers": ["http://10.0.0.5:30000"]}, "servers", "--api-key"),
        ({"servers": ["http://127.0.0.1:1"], "replicas": 2}, "replicas", "starts no SGLang server"),
        ({"servers": ["http://127.0.0.1:1"], "port": 30000}, "port", "starts no SGLang server"),
        ({"servers": ["http://127.0.0.1:1"], "weight_sync_method": "disk"}, "weight_sync_method", "over HTTP"),
    ],
)
def test_servers_refused_name_the_setting(kwargs, field, hint):
    with pytest.raises(ConfigError) as err:
        SGLangConfig(**kwargs)
    assert err.value.field == field and hint in str(err.value)


@pytest.mark.parametrize(
    ("server", "trainer", "on_gpu", "expected"),
    [
        ("auto", "auto", False, ("float32", "float32")),  # SGLang's own auto would serve SmolLM2 in float16
        ("auto", "auto", True, ("bfloat16", "bfloat16")),
        ("float16", "auto", True, ("float16", "float16")),  # one side named: the other follows it
        ("auto", "bfloat16", False, ("bfloat16", "bfloat16")),
        ("float32", "bfloat16", True, ("float32", "bfloat16")),  # both named: as asked (the backend warns)
    ],
)
def test_one_precision_for_server_and_trainer(server, trainer, on_gpu, expected):
    from art_sglang.config import precision

    assert precision(server, trainer, server_on_gpu=on_gpu, trainer_on_gpu=on_gpu) == expected


def test_an_unrecognised_template_gets_no_tool_call_parser_and_says_so(caplog):
    from art_sglang.chat import resolve_tool_call_parser

    qwen = "{% for tool in tools %}...{% endfor %}<tool_call>\n{{ call | tojson }}\n</tool_call>"
    with caplog.at_level("WARNING", logger="art_sglang"):
        assert resolve_tool_call_parser("auto", qwen, "qwen") == "qwen25"
        assert resolve_tool_call_parser("hermes", "anything", "m") == "hermes"  # named: used as given, silently
        assert not caplog.records
        assert resolve_tool_call_parser("auto", "{{ messages }}<tool>{{ call }}</tool>", "odd-model") is None
    (record,) = caplog.records
    assert "odd-model" in record.message and "SGLangConfig(tool_call_parser=...)" in record.message
