"""DeviceConfig and SGLangConfig: fields, validation, environment overrides, and device placement."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from .errors import ConfigError
from .procs import MAX_PORT

SyncMethod = Literal["lora", "disk", "restart"]
SYNC_METHODS: tuple[str, ...] = ("lora", "disk", "restart")
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
Mode = Literal["cpu", "shared", "split"]
# LoRA targets: every linear layer of a Llama/Qwen-style decoder.
ALL_LINEAR: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Environment variables the package reads.
ENV_SERVER_TIMEOUT = "ART_SERVER_TIMEOUT"
ENV_SERVER_PYTHON = "ART_SGLANG_SERVER_PYTHON"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DeviceConfig:
    """Which GPUs serve and which train.

    With `auto_detect=True` (the default) the device fields are ignored and the placement follows the GPU
    count: 0 GPUs -> CPU, 1 -> shared mode on GPU 0, 2+ -> split mode (inference on 0, training on 1..N-1).
    With `auto_detect=False` the given devices are used; `training_devices=[inference_device]` means shared
    mode on that one GPU.
    """

    inference_device: int = 0
    training_devices: list[int] = field(default_factory=lambda: [1])
    auto_detect: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.inference_device) or self.inference_device < 0:
            raise ConfigError("inference_device", self.inference_device, "a GPU index >= 0")
        if not isinstance(self.training_devices, list | tuple) or not self.training_devices:
            raise ConfigError("training_devices", self.training_devices, "a non-empty list of GPU indices")
        self.training_devices = list(self.training_devices)
        for d in self.training_devices:
            if not _is_int(d) or d < 0:
                raise ConfigError("training_devices", self.training_devices, "GPU indices >= 0 only")
        if len(set(self.training_devices)) != len(self.training_devices):
            raise ConfigError("training_devices", self.training_devices, "each GPU index at most once")
        if self.inference_device in self.training_devices and self.training_devices != [self.inference_device]:
            raise ConfigError(
                "training_devices",
                self.training_devices,
                f"inference_device {self.inference_device} may not also be a training device; use separate "
                f"GPUs (split mode) or training_devices=[{self.inference_device}] alone to time-share one GPU "
                "(shared mode)",
            )


@dataclass(frozen=True)
class Placement:
    """Where things run, decided once from DeviceConfig and the GPUs found."""

    mode: Mode
    inference_device: int | None  # None on the CPU
    training_devices: list[int]  # empty on the CPU
    reason: str


def place(devices: DeviceConfig, gpu_count: int) -> Placement:
    """Decide the mode and devices for `gpu_count` visible GPUs."""
    if gpu_count == 0:
        why = "no GPU found"
        if not devices.auto_detect:
            why += " (the configured devices are ignored)"
        return Placement("cpu", None, [], why + ": server and trainer share the CPU, as in split mode")
    if devices.auto_detect:
        if gpu_count == 1:
            return Placement("shared", 0, [0], "1 GPU found: server and trainer time-share GPU 0")
        training = list(range(1, gpu_count))
        return Placement("split", 0, training, f"{gpu_count} GPUs found: server on GPU 0, training on {training}")
    wanted = [devices.inference_device, *devices.training_devices]
    missing = sorted({d for d in wanted if d >= gpu_count})
    if missing:
        raise ConfigError(
            "DeviceConfig",
            {"inference_device": devices.inference_device, "training_devices": devices.training_devices},
            f"GPU(s) {missing} do not exist: {gpu_count} visible (indices 0..{gpu_count - 1})",
        )
    if devices.training_devices == [devices.inference_device]:
        d = devices.inference_device
        return Placement("shared", d, [d], f"configured: server and trainer time-share GPU {d}")
    return Placement(
        "split",
        devices.inference_device,
        devices.training_devices,
        f"configured: server on GPU {devices.inference_device}, training on {devices.training_devices}",
    )


@dataclass
class SGLangConfig:
    """How the SGLang server is run and how new policies reach it.

    The first eight fields are the design's table; the rest are what running the server here needs.
    `ART_SERVER_TIMEOUT` in the environment overrides `server_timeout`.
    """

    mem_fraction_static: float = 0.9
    disable_radix_cache: bool = False
    max_loras_per_batch: int = 4
    context_length: int | None = None
    weight_sync_method: SyncMethod = "lora"
    flush_cache_on_sync: bool = False
    server_timeout: float = 120.0
    tensor_parallel_size: int = 1
    # Beyond the design's table.
    data_parallel_size: int = 1
    port: int | None = None  # None: a free port on 127.0.0.1
    host: str = "127.0.0.1"
    server_python: str | None = None  # None: $ART_SGLANG_SERVER_PYTHON, then .venv-sglang-server/bin/python
    server_args: list[str] = field(default_factory=list)  # appended to sglang.launch_server's flags
    dtype: str = "auto"  # the server's --dtype; float32 makes its logprobs match an fp32 trainer
    max_lora_rank: int = 16
    lora_target_modules: list[str] | None = None  # --lora-target-modules; None: the layers the trainer adapts
    max_total_tokens: int | None = None  # KV pool size; None: 131072 on the CPU, SGLang's choice on a GPU
    cpu_threads: int = 1  # OMP_NUM_THREADS of a CPU server: it shares the cores with the trainer
    enable_memory_saver: bool | None = None  # None: on in shared mode on a GPU
    chat_template: str | None = None  # a Jinja file for the server, the gateway and the trainer; None: the model's
    tool_call_parser: str | None = "auto"  # SGLang's --tool-call-parser; "auto": from the chat template; None: off
    reasoning_parser: str | None = None  # SGLang's --reasoning-parser (e.g. "qwen3"); None: off
    grammar_backend: str | None = None  # structured output; None: llguidance on the CPU, SGLang's default on a GPU
    api_key: str | None = None  # SGLang's --api-key; needed when `host` is not loopback
    replicas: int = 1  # SGLang servers serving the policy, each a free port (on the CPU so far)

    def __post_init__(self) -> None:
        env_timeout = os.environ.get(ENV_SERVER_TIMEOUT)
        if env_timeout:
            try:
                self.server_timeout = float(env_timeout)
            except ValueError:
                raise ConfigError(ENV_SERVER_TIMEOUT, env_timeout, "a number of seconds > 0") from None
        self.validate()

    def validate(self) -> None:
        f = self.mem_fraction_static
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise ConfigError("mem_fraction_static", f, "a fraction in (0, 1]")
        if self.weight_sync_method == "tensor":
            raise ConfigError(
                "weight_sync_method",
                "tensor",
                "not available: the design's in-memory sync is not implemented; 'lora' (the default) moves only the "
                "adapter, 'disk' the merged layers through a RAM disk",
            )
        if self.weight_sync_method not in SYNC_METHODS:
            raise ConfigError("weight_sync_method", self.weight_sync_method, f"one of {', '.join(SYNC_METHODS)}")
        for name in (
            "max_loras_per_batch",
            "tensor_parallel_size",
            "data_parallel_size",
            "max_lora_rank",
            "cpu_threads",
            "replicas",
        ):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(name, v, "an integer >= 1")
        for name in ("context_length", "max_total_tokens"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(name, v, "None or an integer >= 1")
        t = self.server_timeout
        if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
            raise ConfigError("server_timeout", t, f"seconds > 0 (also settable with {ENV_SERVER_TIMEOUT})")
        if self.port is not None and (not _is_int(self.port) or not 0 < self.port <= MAX_PORT):
            raise ConfigError(
                "port", self.port, f"None (a free port) or an integer in 1..{MAX_PORT} (SGLang also binds port + 10000)"
            )
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.host not in LOOPBACK and not self.api_key:
            raise ConfigError(
                "host",
                self.host,
                "a loopback address unless SGLangConfig(api_key=...) is set: on any other address SGLang's admin API "
                "(weight updates, adapter loads from any path) is open to the network, and it has no authentication "
                "of its own",
            )
        if not isinstance(self.server_args, list) or not all(isinstance(a, str) for a in self.server_args):
            raise ConfigError("server_args", self.server_args, "a list of strings, e.g. ['--log-level', 'info']")
        if self.chat_template is not None and not os.path.isfile(os.path.expanduser(self.chat_template)):
            raise ConfigError("chat_template", self.chat_template, "None or the path of a Jinja chat template file")
        for name in ("tool_call_parser", "reasoning_parser", "grammar_backend"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(name, v, "None or an SGLang name, e.g. 'qwen25', 'qwen3', 'llguidance'")
        modules = self.lora_target_modules
        if modules is not None and (not isinstance(modules, list) or not modules):
            raise ConfigError(
                "lora_target_modules", modules, "None (the trainer's) or a non-empty list of module names"
            )
        if self.replicas > 1 and self.weight_sync_method != "lora":
            raise ConfigError(
                "replicas",
                self.replicas,
                f"1 with weight_sync_method={self.weight_sync_method!r}: replicas take new policies with 'lora' "
                "only so far (an adapter loaded on every replica before the route flips)",
            )
        if self.replicas > 1 and self.port is not None:
            raise ConfigError("port", self.port, "None with replicas > 1: each replica takes a free port")
        if self.data_parallel_size > 1 and self.weight_sync_method == "disk":
            raise ConfigError(
                "data_parallel_size",
                self.data_parallel_size,
                "weight updates ('disk' sync) need data_parallel_size=1 (SGLang #4283); "
                "use tensor_parallel_size instead, or weight_sync_method='lora' or 'restart'",
            )


def gpu_count() -> int:
    """GPUs visible to this process, without initializing CUDA here (trainers set their own mask later)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


@dataclass
class TrainerConfig:
    """The LoRA adapter and the trainer. A model's `lora_config` (ART 0.5.23) or `_internal_config` override these
    fields (internal_config.py)."""

    lora_rank: int = 8  # ART's default
    lora_alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    max_grad_norm: float = 0.1  # ART's default
    max_sequence_length: int | None = None  # longer training sequences are skipped or truncated, and counted
    overlong: Literal["skip", "truncate"] = "skip"
    micro_batch_tokens: int = 8192
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    cpu_threads: int = 1  # torch threads of a CPU trainer (it shares the cores with the server)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("lora_rank", "lora_alpha", "micro_batch_tokens", "cpu_threads"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(name, v, "an integer >= 1")
        if not (isinstance(self.max_grad_norm, int | float) and self.max_grad_norm > 0):
            raise ConfigError("max_grad_norm", self.max_grad_norm, "a number > 0")
        if self.overlong not in ("skip", "truncate"):
            raise ConfigError("overlong", self.overlong, "'skip' or 'truncate'")
        if self.max_sequence_length is not None and (
            not _is_int(self.max_sequence_length) or self.max_sequence_length < 2
        ):
            raise ConfigError("max_sequence_length", self.max_sequence_length, "None or an integer >= 2")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        modules = self.target_modules
        if not (isinstance(modules, list | tuple) and modules and all(isinstance(m, str) for m in modules)):
            raise ConfigError("target_modules", modules, f"a non-empty list of module names, e.g. {list(ALL_LINEAR)}")
        if "lm_head" in modules:
            raise ConfigError("target_modules", modules, "no 'lm_head': the output layer stays frozen under LoRA")
