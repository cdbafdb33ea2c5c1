"""The managed SGLang server and its admin client, against a real server on this machine."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest
import torch
from conftest import server_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from art_sglang import (
    CapabilityError,
    PortInUseError,
    ServerNotInstalledError,
    ServerStartError,
    SGLangAPIError,
    SGLangClient,
    SGLangServer,
)
from art_sglang.procs import process_group_members
from art_sglang.server.process import free_port

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
LONG_SYSTEM = "You are a careful assistant. " * 40


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def chat_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def teacher_forced_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(output_ids)[:, None])[:, 0]


@pytest.mark.smoke
async def test_health_and_generate_with_logprobs(client, tokenizer):
    assert await client.health()
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    out = await client.generate(input_ids=prompt, sampling_params=GREEDY)
    assert 0 < len(out.output_ids) <= 12
    assert len(out.output_logprobs) == len(out.output_ids)
    assert all(lp <= 0.0 for lp in out.output_logprobs)
    assert out.prompt_tokens == len(prompt)
    assert out.completion_tokens == len(out.output_ids)
    assert "Paris" in tokenizer.decode(out.output_ids)
    assert out.weight_version == "default"
    info = await client.model_info()
    assert info["weight_version"] == "default"
    assert (await client.server_info())["device"] == "cpu"


async def flush(client) -> None:
    """SGLang refuses a flush while a request runs, and a request still runs for a moment after its reply has come
    back (until the scheduler's next step: "Cache not flushed because there are pending requests. #running-req: 1"
    once in CI); try again until it takes, as DiskSync does."""
    for _ in range(50):
        try:
            return await client.flush_cache()
        except SGLangAPIError:
            await asyncio.sleep(0.1)
    await client.flush_cache()


async def test_repeated_prompt_is_cached_and_flush_resets(client, tokenizer):
    prompt = chat_ids(tokenizer, "Name a colour.", system=LONG_SYSTEM)
    assert len(prompt) > 200
    await flush(client)
    first = await client.generate(input_ids=prompt, sampling_params=GREEDY)
    second = await client.generate(input_ids=prompt, sampling_params=GREEDY)
    assert first.cached_tokens == 0
    assert second.cached_tokens >= len(prompt) - 1
    await flush(client)
    third = await client.generate(input_ids=prompt, sampling_params=GREEDY)
    assert third.cached_tokens == 0


async def test_lora_adapter_matches_peft_and_unloads(client, tokenizer, model_path, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    peft_model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)  # a clear change of behaviour
    peft_model.save_pretrained(tmp_path / "adapter")

    prompt = chat_ids(tokenizer, "Tell me about the sea.")
    base_out = await client.generate(input_ids=prompt, sampling_params=GREEDY)
    await client.load_lora_adapter("a1", str(tmp_path / "adapter"))
    with pytest.raises(SGLangAPIError) as dup:
        await client.load_lora_adapter("a1", str(tmp_path / "adapter"))
    assert dup.value.status == 400 and "a1" in dup.value.server_message
    lora_out = await client.generate(input_ids=prompt, sampling_params=GREEDY, lora_path="a1")
    assert lora_out.output_ids != base_out.output_ids

    # PEFT's own greedy continuation and its teacher-forced logprobs on SGLang's tokens (fp32 both sides).
    with torch.no_grad():
        peft_ids = peft_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
    assert lora_out.output_ids == peft_ids.tolist()[: len(lora_out.output_ids)]
    expected = teacher_forced_logprobs(peft_model, prompt, lora_out.output_ids)
    diff = (expected - torch.tensor(lora_out.output_logprobs)).abs()
    assert diff.max().item() < 1e-3, diff

    await client.unload_lora_adapter("a1")
    with pytest.raises(SGLangAPIError):
        await client.unload_lora_adapter("a1")
    after = await client.generate(input_ids=prompt, sampling_params=GREEDY)
    assert after.output_ids == base_out.output_ids


async def test_update_weights_from_disk_changes_output_and_version(client, tokenizer, model_path, tmp_path):
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    before = await client.generate(input_ids=prompt, sampling_params=GREEDY)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers[-4:]:
            layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight) * 0.05)
    model.save_pretrained(tmp_path / "changed")
    try:
        result = await client.update_weights_from_disk(str(tmp_path / "changed"), weight_version="step-1")
        assert result["success"] is True
        changed = await client.generate(input_ids=prompt, sampling_params=GREEDY)
        assert changed.output_ids != before.output_ids
        assert changed.weight_version == "step-1"
        assert await client.weight_version() == "step-1"
    finally:
        await client.update_weights_from_disk(str(model_path), weight_version="default")
    restored = await client.generate(input_ids=prompt, sampling_params=GREEDY)
    assert restored.output_ids == before.output_ids


async def test_memory_release_is_refused_on_cpu_server(client):
    with pytest.raises(CapabilityError, match="not available on a CPU server"):
        await client.release_memory_occupation()
    with pytest.raises(CapabilityError):
        await client.resume_memory_occupation()
    assert await client.health()


async def test_api_errors_carry_the_server_message(client):
    with pytest.raises(SGLangAPIError) as err:
        await client.load_lora_adapter("missing", "/nonexistent/adapter")
    assert err.value.endpoint == "/load_lora_adapter"
    assert err.value.server_message
    assert await client.health()


@pytest.mark.slow
async def test_crash_is_detected_and_restart_and_stop_leave_nothing(model_path, tmp_path):
    server = SGLangServer(
        model_path, server_config(max_total_tokens=2048), log_path=tmp_path / "s.log", device=None, enable_lora=False
    )
    await server.start()
    try:
        pgid = server.pid
        assert server.crash_reason() is None
        children = process_group_members(pgid) - {pgid}
        assert children, "SGLang runs its scheduler in child processes"
        crashes: list[tuple[int, str]] = []

        async def on_crash(pid: int, reason: str) -> None:
            crashes.append((pid, reason))

        watcher = asyncio.create_task(server.watch(on_crash, interval=0.2))
        first_scratch, first_shm = server._scratch, server._shm_files
        assert list(first_scratch.iterdir()), "SGLang's IPC sockets live in the server's private TMPDIR"
        assert first_shm and all(f.exists() for f in first_shm), "its /dev/shm files are known"
        os.kill(max(children), signal.SIGKILL)
        await asyncio.wait_for(watcher, timeout=30)
        assert crashes and crashes[0][0] == pgid and ("died" in crashes[0][1] or "exited" in crashes[0][1])

        port = server.port
        await server.restart()
        assert server.port == port and server.restarts == 1
        async with SGLangClient(server.base_url) as c:
            assert await c.health()
        # What the killed server left (IPC sockets, /dev/shm load files named after them) went with its stop.
        assert not first_scratch.exists()
        assert not [f for f in first_shm if f.exists()]
        # A planned stop (as a restart begins with) is never a crash: a watch under way returns without on_crash.
        watcher = asyncio.create_task(server.watch(on_crash, interval=0.01))
        await asyncio.sleep(0.1)
        pgid, scratch = server.pid, server._scratch
        server.stop()
        await asyncio.wait_for(watcher, timeout=30)
        assert len(crashes) == 1
    finally:
        server.stop()
    assert not process_group_members(pgid)
    assert not scratch.exists()
    assert "=== art_sglang: starting" in (tmp_path / "s.log").read_text()


@pytest.mark.slow
async def test_startup_timeout_raises_with_log_tail_and_cleans_up(model_path, tmp_path):
    server = SGLangServer(
        model_path, server_config(server_timeout=3.0), log_path=tmp_path / "slow.log", device=None, enable_lora=False
    )
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="not healthy within server_timeout=3 s") as err:
        await server.start()
    assert time.monotonic() - t0 < 40
    assert "=== art_sglang: starting" in err.value.log_tail
    assert not server.running


@pytest.mark.slow
async def test_early_exit_raises_with_log_tail(model_path, tmp_path):
    server = SGLangServer(
        model_path,
        server_config(server_args=["--no-such-flag"]),
        log_path=tmp_path / "bad.log",
        device=None,
        enable_lora=False,
    )
    with pytest.raises(ServerStartError, match="exited with code") as err:
        await server.start()
    assert "--no-such-flag" in err.value.log_tail


@pytest.mark.slow
async def test_port_in_use_is_a_clear_error(model_path, tmp_path):
    port = free_port()  # below 55535, which the configuration requires
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        server = SGLangServer(model_path, server_config(port=port), log_path=tmp_path / "p.log", device=None)
        with pytest.raises(PortInUseError, match=f"Port {port} on 127.0.0.1 is already in use"):
            await server.start()


def test_missing_server_venv_names_the_setup_command(model_path, tmp_path, monkeypatch):
    with pytest.raises(ServerNotInstalledError, match=r"bash scripts/setup_sglang.sh"):
        SGLangServer(
            model_path, server_config(server_python="/nonexistent/bin/python"), log_path=tmp_path / "x", device=None
        )
    monkeypatch.setenv("ART_SGLANG_SERVER_PYTHON", "/usr/bin/true")
    with pytest.raises(ServerNotInstalledError, match=r"has no sglang"):
        SGLangServer(model_path, server_config(), log_path=tmp_path / "x", device=None)


def test_server_environment_and_flags(model_path, tmp_path):
    cpu = SGLangServer(model_path, server_config(port=1234), log_path=tmp_path / "l", device=None)
    env, cmd = cpu.environment(), cpu.command()
    assert env["SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK"] == "True"
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["PYTHONPATH"].endswith("cpu_launch")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--lora-backend") + 1] == "torch_native"
    assert cmd[cmd.index("--dtype") + 1] == "float32"  # dtype "auto" is never SGLang's auto (float16 for SmolLM2)
    gpu = SGLangServer(model_path, server_config(), log_path=tmp_path / "l", device=3, memory_saver=True)
    env, cmd = gpu.environment(), gpu.command()
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"  # what the trainer's auto is on a GPU
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert "SGLANG_USE_CPU_ENGINE" not in env and "--device" not in cmd
    assert "--enable-memory-saver" in cmd


def test_cpu_launcher_makes_pin_memory_a_no_op(lora_server):
    """The sitecustomize that every CPU server process imports (what lets --enable-lora start there)."""
    import subprocess

    probe = (
        "import torch; a = torch.empty(4, pin_memory=True); b = torch.zeros(2).pin_memory(); "
        "c = torch.tensor([1], pin_memory=True); print(a.is_pinned(), b.is_pinned(), c.shape[0])"
    )
    env = lora_server.environment()
    out = subprocess.run(
        [str(lora_server._python.path), "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "1"]
    env.pop("ART_SGLANG_NO_PIN_MEMORY")
    out = subprocess.run(
        [str(lora_server._python.path), "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0  # without the launcher, pinning needs a CUDA driver
