"""Shared mode (one GPU) as far as this CPU machine can check it: SGLang cannot run on the lent GPUs, so the GPU
server's command line is parsed by the installed SGLang's own argument parser, the memory tags are checked against
its source, and the time-share's call order is checked with stand-ins for a GPU server and trainer (named
`Recorded*` below: a real server cannot release GPU memory on a CPU)."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest
from conftest import server_config

from art_sglang import SGLangServer
from art_sglang.server.process import API_KEY_ENV
from art_sglang.sync.timeshare import RELEASED, GpuTimeShare


def parsed_by_sglang(server: SGLangServer) -> dict:
    """The server's command line as SGLang's own parser reads it (no server is started)."""
    server.port = 30000  # chosen at start
    args = server.command()[3:]  # python -m sglang.launch_server ...
    probe = (
        "import argparse, json, sys; from sglang.srt.server_args import ServerArgs; "
        "p = argparse.ArgumentParser(); ServerArgs.add_cli_args(p); a = p.parse_args(sys.argv[1:]); "
        "print(json.dumps({k: v for k, v in vars(a).items() if isinstance(v, (str, int, float, bool, type(None)))}))"
    )
    out = subprocess.run([str(server._python.path), "-c", probe, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_gpu_shared_mode_command_line_is_sglangs(model_path, tmp_path):
    server = SGLangServer(
        model_path, server_config(), log_path=tmp_path / "l", device=0, memory_saver=True, tool_call_parser="qwen25"
    )
    args = parsed_by_sglang(server)
    assert args["enable_memory_saver"] is True
    assert args["enable_weights_cpu_backup"] is False  # the weights stay on the GPU: nothing to back up
    assert args["tool_call_parser"] == "qwen25" and args["grammar_backend"] is None  # SGLang's default on a GPU
    assert server.environment()["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"


def test_the_cpu_command_line_is_sglangs(model_path, tmp_path):
    server = SGLangServer(model_path, server_config(api_key="k"), log_path=tmp_path / "l", device=None)
    args = parsed_by_sglang(server)
    assert args["device"] == "cpu" and args["grammar_backend"] == "llguidance"
    # The key is never on the command line (`ps` shows it to every user): the launcher takes it from the environment.
    assert args["api_key"] is None and "k" not in server.command()
    assert server.environment()[API_KEY_ENV] == "k" and API_KEY_ENV in server.command()[2]


def test_released_tags_are_sglangs_memory_types(model_path, tmp_path):
    server = SGLangServer(model_path, server_config(), log_path=tmp_path / "l", device=None)
    probe = (
        "from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE as k, GPU_MEMORY_TYPE_CUDA_GRAPH as g, "
        "GPU_MEMORY_TYPE_WEIGHTS as w; print(k, g, w)"
    )
    out = subprocess.run([str(server._python.path), "-c", probe], capture_output=True, text=True, timeout=120)
    kv, graph, weights = out.stdout.split()
    assert sorted(RELEASED) == sorted([kv, graph]) and weights not in RELEASED


class RecordedClient:
    """Stands in for a GPU server's admin API: records calls; `fail` names one that raises."""

    def __init__(self, calls: list, fail: str | None = None) -> None:
        self.calls, self.fail = calls, fail

    async def server_info(self):
        return {"device": "cuda", "enable_memory_saver": True}

    async def release_memory_occupation(self, tags):
        self.calls.append(("release", tuple(tags)))

    async def resume_memory_occupation(self, tags):
        self.calls.append(("resume", tuple(tags)))
        if self.fail == "resume":
            raise RuntimeError("resume failed")


class RecordedTrainer:
    def __init__(self, calls: list) -> None:
        self.calls, self.running = calls, True

    async def reload(self):
        self.calls.append("trainer.reload")

    async def offload(self):
        self.calls.append("trainer.offload")


@pytest.mark.parametrize("body_fails", [False, True])
async def test_the_trainer_turn_always_gives_the_gpu_back(body_fails):
    calls: list = []
    share = GpuTimeShare(server=None, client=RecordedClient(calls), trainer=RecordedTrainer(calls))
    assert "releases kv_cache, cuda_graph" in await share.check()
    with pytest.raises(ZeroDivisionError) if body_fails else contextlib.nullcontext():
        async with share.trainer_turn():
            calls.append("train")
            if body_fails:
                raise ZeroDivisionError
    assert calls == [
        ("release", ("kv_cache", "cuda_graph")),
        "trainer.reload",
        "train",
        "trainer.offload",
        ("resume", ("kv_cache", "cuda_graph")),
    ]
