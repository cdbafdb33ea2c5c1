"""SGLangServer: one SGLang server process tree, owned from start to reaping.

The server runs from its own venv, in its own process group, bound to loopback. It is stopped by that group
(SIGKILL: see `stop`), also at interpreter exit, and never by name. Any process of its tree dying is a crash that
`watch` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from ..config import SGLangConfig, auto_dtype
from ..errors import PortInUseError, ServerStartError
from ..procs import alive, die_with_parent, free_port, kill_group, mapped_shm_files, own, process_group_members, release
from .venv import find_server_python

log = logging.getLogger(__name__)
# SGLang takes its API key only as a flag, which `ps` shows to every user: it comes through the environment instead
# and is appended to the arguments inside the launcher (its children get their arguments pickled, not on a command
# line).
API_KEY_ENV = "ART_SGLANG_API_KEY"
KEYED_LAUNCH = (
    f"import os, runpy, sys; sys.argv += ['--api-key', os.environ.pop({API_KEY_ENV!r})]; "
    "runpy.run_module('sglang.launch_server', run_name='__main__', alter_sys=True)"
)

CPU_LAUNCH_DIR = Path(__file__).parent / "cpu_launch"
CPU_DEFAULT_MAX_TOTAL_TOKENS = 65536  # SmolLM2 in float32: 3 GB of KV


def check_port_free(host: str, port: int) -> None:
    """Raise if something listens on the port. SO_REUSEADDR as the server uses it: connections of a server just
    stopped (TIME_WAIT) do not count, a listening socket does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUseError(
                f"Port {port} on {host} is already in use ({e.strerror}). Stop whatever listens there, choose "
                "another SGLangConfig(port=...), or leave port=None to take a free one."
            ) from None


class SGLangServer:
    """A real SGLang server for one model.

    `device` is the GPU index (or the `tensor_parallel_size` indices) for `CUDA_VISIBLE_DEVICES`, or None for the
    CPU (which starts through our launcher so that LoRA works there). `await start()` returns once `/health`
    answers 200.
    """

    def __init__(
        self,
        model_path: str | Path,
        config: SGLangConfig,
        *,
        log_path: str | Path,
        device: int | list[int] | None,
        enable_lora: bool = True,
        memory_saver: bool = False,
        served_model_name: str | None = None,
        weight_version: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.model_path = str(model_path)  # what it serves; a restart may point it at merged weights
        self.base_model_path = str(model_path)
        self.config = config
        self.log_path = Path(log_path)
        self.gpus: list[int] = [] if device is None else [device] if isinstance(device, int) else list(device)
        self.enable_lora = enable_lora
        self.memory_saver = memory_saver
        self.served_model_name = served_model_name
        self.weight_version = weight_version
        self.tool_call_parser = tool_call_parser  # resolved: "auto" is decided from the template by the caller
        self.port: int | None = config.port
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None  # the server's TMPDIR
        self._shm_files: set[Path] = set()  # what its processes mapped in /dev/shm
        self._tree: set[int] = set()
        self._python = find_server_python(config.server_python)

    # -- what is launched -------------------------------------------------------------------------------
    @property
    def sglang_version(self) -> str:
        return self._python.sglang_version

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port until start()")
        return f"http://{self.config.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        c = self.config
        launch = ["-c", KEYED_LAUNCH] if c.api_key else ["-m", "sglang.launch_server"]
        cmd = [
            str(self._python.path),
            *launch,
            "--model-path",
            self.model_path,
            "--host",
            c.host,
            "--port",
            str(self.port),
            "--tp-size",
            str(c.tensor_parallel_size),
            "--dp-size",
            str(c.data_parallel_size),
            "--mem-fraction-static",
            str(c.mem_fraction_static),
            "--dtype",
            auto_dtype(bool(self.gpus)) if c.dtype == "auto" else c.dtype,  # never SGLang's auto (float16)
            "--enable-cache-report",
        ]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.weight_version:
            cmd += ["--weight-version", self.weight_version]
        if c.context_length:
            cmd += ["--context-length", str(c.context_length)]
        if c.disable_radix_cache:
            cmd += ["--disable-radix-cache"]
        if c.chat_template:
            cmd += ["--chat-template", c.chat_template]
        if self.tool_call_parser:
            cmd += ["--tool-call-parser", self.tool_call_parser]
        if c.reasoning_parser:
            cmd += ["--reasoning-parser", c.reasoning_parser]
        # xgrammar applies its token masks only on CUDA: on the CPU a constrained request kills the scheduler.
        grammar = c.grammar_backend or ("llguidance" if not self.gpus else None)
        if grammar:
            cmd += ["--grammar-backend", grammar]
        if c.max_running_requests is not None:
            cmd += ["--max-running-requests", str(c.max_running_requests)]
        if self.enable_lora:
            cmd += [
                "--enable-lora",
                "--max-lora-rank",
                str(c.max_lora_rank),
                "--lora-target-modules",
                *(c.lora_target_modules or ["all"]),
                "--max-loras-per-batch",
                str(c.max_loras_per_batch),
            ]
        if not self.gpus:
            cmd += [
                "--device",
                "cpu",
                "--attention-backend",
                "torch_native",
                "--sampling-backend",
                "pytorch",
                "--disable-cuda-graph",
                "--sleep-on-idle",
                "--max-total-tokens",
                str(c.max_total_tokens or CPU_DEFAULT_MAX_TOTAL_TOKENS),
            ]
            if self.enable_lora:
                cmd += ["--lora-backend", "torch_native"]  # the only LoRA backend that runs on the CPU
        elif c.max_total_tokens:
            cmd += ["--max-total-tokens", str(c.max_total_tokens)]
        if self.memory_saver:
            cmd += ["--enable-memory-saver"]
        return cmd + list(c.server_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the project venv's paths must not leak into the server venv
        env["SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK"] = "True"
        env["SGLANG_DISABLE_TP_MEMORY_INBALANCE_CHECK"] = "True"  # the name newer releases read
        env["PYTHONUNBUFFERED"] = "1"
        # Logprobs of the policy itself (log_softmax of the logits), not of logits / temperature: what the
        # trainer computes, whatever the sampling settings.
        env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
        if self.config.api_key:
            env[API_KEY_ENV] = self.config.api_key  # read and removed by KEYED_LAUNCH
        if not self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["SGLANG_USE_CPU_ENGINE"] = "1"  # without it the rotary embedding imports vllm
            env["OMP_NUM_THREADS"] = str(self.config.cpu_threads)
            env["ART_SGLANG_NO_PIN_MEMORY"] = "1"
            env["PYTHONPATH"] = str(CPU_LAUNCH_DIR)  # its sitecustomize reaches every spawned process
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpus))
        return env

    # -- life cycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Launch and wait for health; on timeout or early exit, stop the tree and raise with the log tail."""
        if self.running:
            raise RuntimeError("the server is already running")
        if self.port is None:
            self.port = free_port(self.config.host)
        else:
            check_port_free(self.config.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.config.api_key:  # SGLang logs its arguments, the key among them: the log is the owner's alone
            self.log_path.touch(mode=0o600)
            os.chmod(self.log_path, 0o600)
        cmd = self.command()
        # SGLang names its IPC sockets with tempfile and leaves them behind when killed (its /dev/shm files too,
        # found from its processes' memory maps once it is up): a private TMPDIR lets stop() remove them.
        self._scratch = Path(tempfile.mkdtemp(prefix="art-sglang-server-"))
        env = {**self.environment(), "TMPDIR": str(self._scratch)}
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== art_sglang: starting at {time.strftime('%F %T')}: {' '.join(cmd)}\n".encode())
            logf.flush()
            self._proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        own(self)
        log.info("SGLang server starting (pid %d, %s); log: %s", self._proc.pid, self.base_url, self.log_path)
        try:
            await self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self._tree = process_group_members(self._proc.pid)
        self._shm_files = mapped_shm_files(self._tree)  # removed at stop: a killed server cannot

    async def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.config.server_timeout
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else None
        async with httpx.AsyncClient(timeout=5.0, headers=headers) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise ServerStartError(
                        f"The SGLang server exited with code {code} during start-up (log: {self.log_path}).",
                        self.log_tail(),
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.base_url}/health")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"The SGLang server was not healthy within server_timeout={self.config.server_timeout:g}"
                        f" s (log: {self.log_path}). Raise SGLangConfig(server_timeout=...) or "
                        "ART_SERVER_TIMEOUT if it is only slow.",
                        self.log_tail(),
                    )
                await asyncio.sleep(0.5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGKILL the process group, wait until it is gone, and reap the launcher. Not SIGTERM: SGLang answers it
        with a graceful exit that takes ~6 s however idle it is (a drain, then a 5 s pause for crash diagnostics
        once its children are signalled), and keeps nothing a stop would save: it writes no state, and its
        shared-memory files and IPC sockets are removed here. Callers drain requests first (the gateway holds new
        ones)."""
        proc, self._proc = self._proc, None  # first: a watcher that sees this knows the stop is planned
        release(self)
        if proc is None:
            return
        # start_new_session: the launcher leads its own group. Reaped here, so it leaves no zombie.
        kill_group(proc.pid, "the SGLang server")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        self._tree = set()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        scratch, self._scratch = self._scratch, None
        files, self._shm_files = self._shm_files, set()
        for f in files:
            with contextlib.suppress(OSError):
                f.unlink(missing_ok=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    async def restart(self, model_path: str | Path | None = None, weight_version: str | None = None) -> None:
        """Stop and start again on the same port (clients keep their URL), optionally on new weights."""
        await asyncio.to_thread(self.stop)
        if model_path is not None:
            self.model_path = str(model_path)
        if weight_version is not None:
            self.weight_version = weight_version
        self.restarts += 1
        await self.start()

    # -- crash detection --------------------------------------------------------------------------------
    def crash_reason(self) -> str | None:
        """None while the whole tree lives; otherwise what died."""
        return self._dead(self._proc, self._tree) if self._proc is not None else "the server is not running"

    @staticmethod
    def _dead(proc: subprocess.Popen[bytes], tree: set[int]) -> str | None:
        code = proc.poll()
        if code is not None:
            return f"the launcher (pid {proc.pid}) exited with code {code}"
        dead = sorted(p for p in tree if not alive(p))
        return f"server process(es) {dead} died" if dead else None

    async def watch(self, on_crash: Callable[[int, str], Awaitable[None]], interval: float = 0.5) -> None:
        """Watch the running server's process tree until it dies, then await `on_crash(pid, reason)` once.

        Returns without calling it when the server is stopped or restarted on purpose: stop() forgets the process
        before it signals it, so a planned stop is never taken for a crash. Run it as a task; cancel to stop."""
        proc, tree = self._proc, set(self._tree)
        if proc is None:
            return
        while True:
            await asyncio.sleep(interval)
            if self._proc is not proc:
                return
            reason = self._dead(proc, tree)
            if reason is not None and self._proc is proc:  # checked again: a stop may have begun meanwhile
                log.error("SGLang server crashed: %s", reason)
                await on_crash(proc.pid, reason)
                return

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
