"""The SGLang API this project uses, checked against the source of the pinned GPU server release
(requirements/sglang-server-gpu.txt), read as text: every endpoint we call is a route there, every request field we
send is a field of the request type that route parses, every response field we read is produced there, and every
launch flag we pass is one of its ServerArgs with the shape we give it (a value or none). Nothing is imported or
run, so this also holds for a release that does not install on this machine (it is downloaded, --no-deps, once).

The lists below mirror server/client.py (admin API), gateway/ (chat and completions) and server/process.py (flags,
taken from the command lines it builds). A new call there belongs here too."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import pytest
from conftest import server_config

from art_sglang import SGLangServer
from art_sglang.server.venv import find_server_python

ROOT = Path(__file__).parents[1]
PIN = re.search(r"^sglang\[srt\]==(\S+)$", (ROOT / "requirements" / "sglang-server-gpu.txt").read_text(), re.M)[1]

# endpoint -> (the request type SGLang parses its body into, the fields we send); None: no body we shape.
ENDPOINTS: dict[str, tuple[str, list[str]] | None] = {
    "/health": None,
    "/model_info": None,
    "/server_info": None,
    "/v1/models": None,
    "/flush_cache": None,
    "/generate": (
        "GenerateReqInput",
        ["text", "input_ids", "sampling_params", "return_logprob", "lora_path", "rid", "logprob_start_len"]
        + ["top_logprobs_num"],
    ),
    "/pause_generation": ("PauseGenerationReqInput", ["mode"]),
    "/continue_generation": ("ContinueGenerationReqInput", []),
    "/update_weights_from_disk": (
        "UpdateWeightFromDiskReqInput",
        ["model_path", "weight_version", "flush_cache", "abort_all_requests"],
    ),
    "/update_weight_version": ("UpdateWeightVersionReqInput", ["new_version", "abort_all_requests"]),
    "/load_lora_adapter": ("LoadLoRAAdapterReqInput", ["lora_name", "lora_path", "pinned"]),
    "/load_lora_adapter_from_tensors": (
        "LoadLoRAAdapterFromTensorsReqInput",
        ["lora_name", "config_dict", "serialized_tensors"],
    ),
    "/unload_lora_adapter": ("UnloadLoRAAdapterReqInput", ["lora_name"]),
    "/release_memory_occupation": ("ReleaseMemoryOccupationReqInput", ["tags"]),
    "/resume_memory_occupation": ("ResumeMemoryOccupationReqInput", ["tags"]),
    "/v1/chat/completions": (
        "ChatCompletionRequest",
        ["messages", "model", "tools", "tool_choice", "logprobs", "max_tokens", "n", "stream", "stream_options"]
        + ["temperature", "top_p", "top_k", "stop", "regex", "response_format", "input_ids", "lora_path"]
        + ["return_meta_info", "return_prompt_token_ids", "continue_final_message", "chat_template_kwargs"]
        + ["frequency_penalty", "presence_penalty", "repetition_penalty", "min_tokens"],
    ),
    "/v1/completions": ("CompletionRequest", ["prompt", "model", "logprobs", "max_tokens", "lora_path", "stream"]),
}
# What we read back, and where SGLang writes it.
RESPONSE_FIELDS = {
    "srt/managers/tokenizer_manager.py": [
        "output_token_logprobs",
        "input_token_logprobs",
        "cached_tokens",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
        "weight_version",
    ],
    "srt/entrypoints/openai/protocol.py": ["prompt_token_ids", "meta_info", "matched_stop"],
    "srt/entrypoints/openai/serving_chat.py": ["weight_version", "cached_tokens"],  # metadata, usage
    "srt/entrypoints/http_server.py": ["weight_version"],  # /model_info
    "srt/server_args.py": ["enable_lora", "device", "enable_memory_saver", "served_model_name", "max_lora_rank"],
}


@cache
def sglang_source() -> Path:
    """The pinned release's `sglang` package directory: the server venv's when it is that release, else the wheel,
    downloaded without dependencies into the cache and unpacked (its source is only read)."""
    with_venv = None
    try:
        python = find_server_python()
        if python.sglang_version == PIN:
            out = subprocess.run(
                [str(python.path), "-c", "import sglang, os; print(os.path.dirname(sglang.__file__))"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            with_venv = Path(out.stdout.strip())
    except Exception:
        pass
    if with_venv is not None and with_venv.is_dir():
        return with_venv
    cache_dir = Path(os.environ.get("ART_SGLANG_CACHE", Path.home() / ".cache" / "art-sglang")) / "sglang-source" / PIN
    if not (cache_dir / "sglang").is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", f"sglang=={PIN}"]
            + ["-d", str(cache_dir)],
            check=True,
            timeout=600,
        )
        (wheel,) = cache_dir.glob("sglang-*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(cache_dir, [n for n in z.namelist() if n.startswith("sglang/")])
    return cache_dir / "sglang"


def class_fields(path: Path, name: str) -> set[str]:
    """The annotated fields of class `name` in `path`, with those of its bases defined in the same file."""
    classes = {n.name: n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
    assert name in classes, f"SGLang {PIN} has no class {name} in {path.name}"
    fields, todo = set(), [classes[name]]
    while todo:
        node = todo.pop()
        fields |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
        todo += [classes[b.id] for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
    return fields


def test_every_endpoint_we_call_exists_with_the_fields_we_send():
    src = sglang_source()
    routes = set(
        re.findall(
            r'@app\.(?:get|post|put|api_route)\(\s*"([^"]+)"', (src / "srt/entrypoints/http_server.py").read_text()
        )
    )
    types = {
        "io": src / "srt/managers/io_struct.py",
        "openai": src / "srt/entrypoints/openai/protocol.py",
    }
    missing = []
    for endpoint, shape in ENDPOINTS.items():
        if endpoint not in routes:
            missing.append(f"route {endpoint}")
            continue
        if shape is None:
            continue
        cls, sent = shape
        path = types["openai" if cls.endswith("Request") else "io"]
        fields = class_fields(path, cls)
        missing += [f"{endpoint}: {cls}.{f}" for f in sent if f not in fields]
    assert not missing, f"SGLang {PIN} lacks what we send: {missing}"


def test_every_response_field_we_read_is_written_there():
    src = sglang_source()
    missing = [
        f"{file}: {name}"
        for file, names in RESPONSE_FIELDS.items()
        for name in names
        if not re.search(rf"\b{name}\b", (src / file).read_text())
    ]
    assert not missing, f"SGLang {PIN} does not produce: {missing}"


@pytest.fixture(scope="module")
def server_flags() -> dict[str, bool]:
    """`--flag` -> takes a value, for every ServerArgs field of the pinned release (and its explicit arguments)."""
    path = sglang_source() / "srt/server_args.py"
    tree = ast.parse(path.read_text())
    (server_args,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ServerArgs"]
    flags = {}
    for s in server_args.body:
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name):
            boolean = "bool" in ast.unparse(s.annotation).split("[", 2)[-1].split(",")[0]
            flags["--" + s.target.id.replace("_", "-")] = not boolean
    for flag in re.findall(r'"(--[a-z0-9-]+)"', path.read_text()):
        flags.setdefault(flag, True)
    return flags


@pytest.mark.parametrize(
    ("device", "overrides", "memory_saver"),
    [
        (0, {}, True),  # shared mode on a GPU
        (
            [0, 1],
            {"tensor_parallel_size": 2, "context_length": 4096, "max_total_tokens": 8192, "max_running_requests": 512},
            False,
        ),  # TP 2
        (None, {"disable_radix_cache": True, "reasoning_parser": "qwen3", "chat_template": __file__}, False),  # CPU
    ],
)
def test_every_launch_flag_we_pass_is_a_server_arg(server_flags, model_path, tmp_path, device, overrides, memory_saver):
    server = SGLangServer(
        model_path,
        server_config(api_key="k", **overrides),
        log_path=tmp_path / "l",
        device=device,
        memory_saver=memory_saver,
        served_model_name="m",
        weight_version="0",
        tool_call_parser="qwen25",
    )
    server.port = 30000
    args = server.command()[3:]  # after the interpreter and its launcher
    args += ["--api-key", "k"]  # which the launcher appends from the environment
    wrong = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        if arg not in server_flags:
            wrong.append(f"{arg}: not a flag")
            continue
        given = i + 1 < len(args) and not args[i + 1].startswith("--")
        if server_flags[arg] != given and arg != "--lora-target-modules":  # a list: nargs, checked as present
            wrong.append(f"{arg}: {'takes' if server_flags[arg] else 'takes no'} value")
    assert not wrong, f"SGLang {PIN}'s launch_server would refuse: {wrong}"
