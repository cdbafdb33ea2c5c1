"""DeviceConfig and SGLangConfig: fields, validation, environment overrides, and device placement."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

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
    count: 0 GPUs -> CPU, 1 -> shared mode on GPU 0, 2+ -> split mode (inference on 0, training on 1..N-1; with
    `SGLangConfig(replicas=R, tensor_parallel_size=T)`, inference on the first R*T GPUs).
    With `auto_detect=False` the given devices are used; `training_devices=[inference_device]` means shared
    mode on that one GPU. `inference_devices=[0, 1, 2, 3]` serves from several GPUs: one SGLang server (a replica
    of the policy) per `tensor_parallel_size * data_parallel_size` of them; it replaces `inference_device` and places
    explicitly (as `auto_detect=False`).
    """

    inference_device: int = 0
    training_devices: list[int] = field(default_factory=lambda: [1])
    auto_detect: bool = True
    inference_devices: list[int] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.inference_device) or self.inference_device < 0:
            raise ConfigError("inference_device", self.inference_device, "a GPU index >= 0")
        self.training_devices = _gpu_list("training_devices", self.training_devices)
        if self.inference_devices is not None:
            self.inference_devices = _gpu_list("inference_devices", self.inference_devices)
            self.auto_detect = False  # the serving GPUs are named: nothing is left to detect
            first = self.inference_devices[0]
            if self.inference_device not in (0, first):
                raise ConfigError(
                    "inference_device",
                    self.inference_device,
                    f"left out with inference_devices={self.inference_devices} (they replace it)",
                )
            self.inference_device = first
            if len(self.inference_devices) == 1:
                self.inference_devices = None  # one GPU: the same config as inference_device=first
        serving = self.inference_devices or [self.inference_device]
        if self.training_devices == serving and len(serving) == 1:
            return  # shared mode on that one GPU
        if both := sorted(set(serving) & set(self.training_devices)):
            field_name = "inference_devices" if self.inference_devices is not None else "inference_device"
            raise ConfigError(
                "training_devices",
                self.training_devices,
                f"no GPU of {field_name} ({both} are both); use separate GPUs (split mode) or "
                f"training_devices=[{self.inference_device}] alone with inference_device={self.inference_device} "
                "to time-share one GPU (shared mode)",
            )

    @property
    def serving_devices(self) -> list[int]:
        return list(self.inference_devices or [self.inference_device])


def _gpu_list(name: str, value: object) -> list[int]:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(name, value, "a non-empty list of GPU indices")
    if not all(_is_int(d) and d >= 0 for d in value):
        raise ConfigError(name, value, "GPU indices >= 0 only")
    if len(set(value)) != len(value):
        raise ConfigError(name, value, "each GPU index at most once")
    return list(value)


@dataclass(frozen=True)
class Placement:
    """Where things run, decided once from DeviceConfig and the GPUs found."""

    mode: Mode
    inference_device: int | None  # the first serving GPU; None on the CPU
    training_devices: list[int]  # empty on the CPU
    reason: str
    servers: list[list[int]] = field(default_factory=list)  # each SGLang server's GPUs; empty on the CPU


def place(
    devices: DeviceConfig,
    gpu_count: int,
    *,
    replicas: int = 1,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    serving_elsewhere: bool = False,
) -> Placement:
    """Decide the mode and devices for `gpu_count` visible GPUs: `replicas` SGLang servers of
    `tensor_parallel_size * data_parallel_size` GPUs each (the count follows `inference_devices` when those are
    given), or none here when the servers run elsewhere (`SGLangConfig.servers`)."""
    if gpu_count == 0:
        why = "no GPU found"
        if not devices.auto_detect:
            why += " (the configured devices are ignored)"
        if serving_elsewhere:
            return Placement("cpu", None, [], why + ": the trainer runs on the CPU, the SGLang servers elsewhere")
        return Placement("cpu", None, [], why + ": server and trainer share the CPU, as in split mode")
    if serving_elsewhere:
        training = list(range(gpu_count)) if devices.auto_detect else devices.training_devices
        if missing := sorted(d for d in training if d >= gpu_count):
            raise ConfigError("training_devices", training, f"GPUs that exist: {missing} do not ({gpu_count} visible)")
        return Placement("split", None, training, f"SGLang servers elsewhere: training on {training}")
    size = tensor_parallel_size * data_parallel_size  # GPUs per server
    if devices.auto_detect:
        need = replicas * size
        if gpu_count == 1 and need == 1:
            return Placement("shared", 0, [0], "1 GPU found: server and trainer time-share GPU 0", [[0]])
        if need >= gpu_count:
            raise ConfigError(
                "replicas" if replicas > 1 else "tensor_parallel_size",
                replicas if replicas > 1 else tensor_parallel_size,
                f"at most what {gpu_count} visible GPU(s) hold: {replicas} server(s) of {size} GPU(s) take {need}, "
                "and training needs at least one more (time-sharing one GPU runs one server on it)",
            )
        serving, training, why = list(range(need)), list(range(need, gpu_count)), f"{gpu_count} GPUs found"
    else:
        serving, training, why = devices.serving_devices, devices.training_devices, "configured"
        missing = sorted({d for d in serving + training if d >= gpu_count})
        if missing:
            raise ConfigError(
                "DeviceConfig",
                {"inference_devices": serving, "training_devices": training},
                f"GPU(s) {missing} do not exist: {gpu_count} visible (indices 0..{gpu_count - 1})",
            )
        if training == serving:  # one GPU, time-shared
            d = serving[0]
            need = replicas * size
            if need > 1:
                raise ConfigError(
                    "replicas" if replicas > 1 else "tensor_parallel_size",
                    replicas if replicas > 1 else tensor_parallel_size,
                    f"1 in shared mode (one server time-shares GPU {d} with the trainer; {need} GPUs asked for); "
                    "list the serving GPUs in DeviceConfig(inference_devices=[...]) apart from training_devices",
                )
            return Placement("shared", d, [d], f"configured: server and trainer time-share GPU {d}", [[d]])
    if len(serving) % size:
        raise ConfigError(
            "tensor_parallel_size",
            tensor_parallel_size,
            f"a divisor of the {len(serving)} serving GPUs {serving}: each SGLang server takes tensor_parallel_size "
            f"x data_parallel_size ({size}) of them",
        )
    servers = [serving[i : i + size] for i in range(0, len(serving), size)]
    if replicas not in (1, len(servers)):
        raise ConfigError(
            "replicas",
            replicas,
            f"{len(servers)} (one server per {size} of the serving GPUs {serving}), or list {replicas * size} GPUs in "
            "DeviceConfig(inference_devices=[...])",
        )
    on = " and ".join(",".join(map(str, g)) for g in servers)
    count = f"{len(servers)} SGLang servers" if len(servers) > 1 else "server"
    return Placement("split", serving[0], training, f"{why}: {count} on GPU {on}, training on {training}", servers)


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
    dtype: str = "auto"  # the server's --dtype; auto: the trainer's (float32 on the CPU, bfloat16 on a GPU)
    max_lora_rank: int = 16
    lora_target_modules: list[str] | None = None  # --lora-target-modules; None: the layers the trainer adapts
    max_total_tokens: int | None = None  # KV pool size; None: 65536 on the CPU, SGLang's choice on a GPU
    cpu_threads: int = 1  # OMP_NUM_THREADS of a CPU server: it shares the cores with the trainer
    enable_memory_saver: bool | None = None  # None: on in shared mode on a GPU
    chat_template: str | None = None  # a Jinja file for the server, the gateway and the trainer; None: the model's
    tool_call_parser: str | None = "auto"  # SGLang's --tool-call-parser; "auto": from the chat template; None: off
    reasoning_parser: str | None = None  # SGLang's --reasoning-parser (e.g. "qwen3"); None: off
    grammar_backend: str | None = None  # structured output; None: llguidance on the CPU, SGLang's default on a GPU
    api_key: str | None = None  # SGLang's --api-key; needed when `host` is not loopback
    replicas: int = 1  # SGLang servers of the policy, each a free port; on GPUs see DeviceConfig.inference_devices
    servers: list[str] = field(default_factory=list)  # URLs of SGLang servers started elsewhere: none is started here
    # Requests in flight per server: SGLang's --max-running-requests (it lowers it to what its KV cache holds, and
    # logs so) and the gateway's bound, this times the servers. Above it a request waits at the gateway; after the
    # hold timeout it gets a 503 that says so. None: SGLang's own choice (2,048 to 4,096 by its KV cache; a fixed
    # 4,096 would size its request table for that many full contexts) and 4,096 at the gateway.
    max_running_requests: int | None = None

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
        if self.max_running_requests is not None and (
            not _is_int(self.max_running_requests) or self.max_running_requests < 1
        ):
            raise ConfigError("max_running_requests", self.max_running_requests, "None or an integer >= 1")
        if "--max-running-requests" in self.server_args:
            raise ConfigError(
                "server_args",
                self.server_args,
                "no --max-running-requests: set SGLangConfig(max_running_requests=...), which the gateway's bound "
                "follows too",
            )
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
        check_servers(self, self.replicas)
        if self.data_parallel_size > 1 and self.weight_sync_method == "disk":
            raise ConfigError(
                "data_parallel_size",
                self.data_parallel_size,
                "weight updates ('disk' sync) need data_parallel_size=1 (SGLang #4283); "
                "use tensor_parallel_size instead, or weight_sync_method='lora' or 'restart'",
            )
        self._check_urls()

    def _check_urls(self) -> None:
        urls = self.servers
        if not isinstance(urls, list | tuple) or not all(isinstance(u, str) for u in urls):
            raise ConfigError("servers", urls, "a list of URLs, e.g. ['http://10.0.0.5:30000']")
        self.servers = [u.rstrip("/") for u in urls]
        if not urls:
            return
        for url in self.servers:
            parsed = urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path:
                raise ConfigError("servers", urls, f"URLs like 'http://host:30000' ({url!r} is not one)")
        if len(set(self.servers)) != len(self.servers):
            raise ConfigError("servers", urls, "each server once")
        if self.replicas != 1 or self.port is not None:
            field_name = "replicas" if self.replicas != 1 else "port"
            raise ConfigError(
                field_name,
                getattr(self, field_name),
                "left out with servers=[...]: the backend starts no SGLang server of its own then",
            )
        if self.weight_sync_method != "lora":
            raise ConfigError(
                "weight_sync_method",
                self.weight_sync_method,
                "'lora' with servers=[...]: a server started elsewhere takes new policies as adapters sent over HTTP "
                "('disk' and 'restart' need its files and its process)",
            )
        remote = [u for u in self.servers if urlsplit(u).hostname not in LOOPBACK]
        if remote and not self.api_key:
            raise ConfigError(
                "servers",
                urls,
                f"loopback URLs unless SGLangConfig(api_key=...) is set ({remote} are not): a server other hosts "
                "reach must run with --api-key, since SGLang's admin API (weight updates, adapter loads) has no "
                "other authentication",
            )


def check_servers(cfg: SGLangConfig, count: int) -> None:
    """What `count` SGLang servers of one policy need (from SGLangConfig.replicas, or one per
    tensor_parallel_size of DeviceConfig.inference_devices)."""
    if count == 1:
        return
    if cfg.port is not None:
        raise ConfigError("port", cfg.port, f"None with {count} SGLang servers (replicas): each takes a free port")


def auto_dtype(on_gpu: bool) -> str:
    """What `dtype="auto"` means here, for the server and the trainer alike: float32 on the CPU, bfloat16 on a GPU.
    SGLang's own `auto` would serve a model whose config says float32 (SmolLM2's does) in float16, which no trainer
    here computes: its logprobs would differ from the trainer's by ~5e-3 on every token."""
    return "bfloat16" if on_gpu else "float32"


def precision(server: str, trainer: str, *, server_on_gpu: bool, trainer_on_gpu: bool) -> tuple[str, str]:
    """The server's and the trainer's dtypes, one decision for both: `auto` on both sides is `auto_dtype` of where
    each runs (the same wherever both run on one kind of device); one side named, the other follows it."""
    if server == "auto" and trainer == "auto":
        return auto_dtype(server_on_gpu), auto_dtype(trainer_on_gpu)
    if server == "auto":
        return trainer, trainer
    if trainer == "auto":
        return server, server
    return server, trainer


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
    # Activations recomputed layer by layer in the backward: long episodes fit (a 7B model's 32k-token sequence in
    # 32 GiB on an H100, where 16k ran out of memory without). None: on a GPU, as ART's default ("unsloth"); off on
    # the CPU, where sequences are short and compute is what is scarce.
    gradient_checkpointing: bool | None = None
    dtype: str = "auto"  # auto: the server's (float32 on the CPU, bfloat16 on a GPU)
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
        if self.gradient_checkpointing not in (None, True, False):
            raise ConfigError("gradient_checkpointing", self.gradient_checkpointing, "None (auto), True or False")
        modules = self.target_modules
        if not (isinstance(modules, list | tuple) and modules and all(isinstance(m, str) for m in modules)):
            raise ConfigError("target_modules", modules, f"a non-empty list of module names, e.g. {list(ALL_LINEAR)}")
        if "lm_head" in modules:
            raise ConfigError("target_modules", modules, "no 'lm_head': the output layer stays frozen under LoRA")
