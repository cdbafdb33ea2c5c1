"""Trainer worker processes and the TrainerGroup that drives them.

Each worker is a fresh interpreter started with its device mask (`CUDA_VISIBLE_DEVICES`) already in its
environment, so torch never sees other GPUs. Several workers form a data-parallel group over
torch.distributed (NCCL on GPUs, gloo on the CPU): each trains on its share of the batch, gradients are summed,
and every rank takes the same optimizer step. Workers run in their own process group and are stopped by it.
A worker that dies makes the pending call raise `TrainerCrashedError` with its log tail, never hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import secrets
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from ..errors import TrainerCrashedError
from ..procs import die_with_parent, own, release, stop_group
from . import schedule
from .core import StepOptions, TrainerSettings
from .sequence import Sequence

_SRC = str(Path(__file__).resolve().parents[2])  # the directory holding art_sglang
KEY_ENV = "ART_SGLANG_TRAINER_KEY"


# -- the worker side (runs in the child process) ------------------------------------------------------------
def _worker_main(address: str, rank: int, world_size: int, store_path: str) -> None:
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop(KEY_ENV)))
    conn.send(("hello", rank, os.getpid()))
    import torch

    from .core import PolicyTrainer

    settings = TrainerSettings(**conn.recv())
    grad_sync = None
    if world_size > 1:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # the only GPU this process can see
        # A file, not PyTorch's TCP store (which listens on every interface); gloo and NCCL bootstrap on loopback.
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)

        def grad_sync(grads: list[torch.Tensor]) -> None:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    trainer = PolicyTrainer(settings, grad_sync)
    conn.send(("ok", {"device": str(trainer.device), "dtype": str(trainer.dtype)}))
    handlers = {
        "train": lambda sequences, options: trainer.train_step(sequences, options),
        "sft": lambda sequences, learning_rate, total_tokens: trainer.sft_step(sequences, learning_rate, total_tokens),
        "logprobs": lambda sequences: trainer.sequence_logprobs(sequences),
        "save_checkpoint": lambda directory, step: str(trainer.save_checkpoint(directory, step)),
        "load_checkpoint": lambda directory: trainer.load_checkpoint(directory),
        "adapter_payload": lambda: trainer.adapter_payload(),
        "write_adapter": lambda directory: trainer.write_adapter(directory),
        "export_merged": trainer.export_merged,
        "offload": lambda: trainer.offload(),
        "reload": lambda: trainer.reload(),
        "exit_now": lambda code: os._exit(code),  # for tests of crash handling
    }
    while True:
        try:
            command, kwargs = conn.recv()
        except EOFError:
            return
        if command == "shutdown":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", handlers[command](**kwargs)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


# -- the driving side (runs in the user's process) ---------------------------------------------------------
class TrainerGroup:
    """One worker per training device (GPU index), or `cpu_workers` workers on the CPU when `devices` is empty."""

    def __init__(
        self,
        settings: TrainerSettings,
        *,
        devices: list[int],
        log_dir: str | Path,
        cpu_workers: int = 1,
        cpu_threads: int = 1,
        start_timeout: float = 600.0,
    ) -> None:
        self.settings = settings
        self.devices = list(devices)
        self.world_size = len(devices) if devices else cpu_workers
        self.log_dir = Path(log_dir)
        self.cpu_threads = cpu_threads
        self.start_timeout = start_timeout
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []
        self._busy = asyncio.Lock()
        self._store: Path | None = None  # the workers' rendezvous file (NCCL reads it again at its first collective)
        self.warmed_up = False  # ART's warm-up step is taken once per start of the workers

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"trainer-{rank}.log"

    def _env(self, rank: int, key: str) -> dict[str, str]:
        env = dict(os.environ)
        env[KEY_ENV] = key
        env["PYTHONPATH"] = os.pathsep.join([_SRC, *filter(None, [env.get("PYTHONPATH")])])
        env["CUDA_VISIBLE_DEVICES"] = str(self.devices[rank]) if self.devices else ""
        if not self.devices:
            env["OMP_NUM_THREADS"] = str(self.cpu_threads)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # The workers of one host talk over loopback only (docs/security.md); set these to train across hosts.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        return env

    async def start(self) -> dict[str, Any]:
        key = secrets.token_hex(16)
        listener = Listener(("127.0.0.1", 0), authkey=bytes.fromhex(key))
        address = f"{listener.address[0]}:{listener.address[1]}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._store = self.log_dir / f".rendezvous-{key[:12]}"  # new per start: a FileStore must begin empty
        store_path = str(self._store)
        settings = asdict(self.settings)
        if not self.devices:
            settings.setdefault("threads", self.cpu_threads)
            settings["threads"] = settings["threads"] or self.cpu_threads
        for rank in range(self.world_size):
            code = (
                f"from art_sglang.trainer.worker import _worker_main; "
                f"_worker_main({address!r}, {rank}, {self.world_size}, {store_path!r})"
            )
            with open(self.log_path(rank), "ab") as log:
                log.write(f"\n=== art_sglang trainer rank {rank} starting at {time.strftime('%F %T')}\n".encode())
                log.flush()
                self._procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", code],
                        env=self._env(rank, key),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=die_with_parent,
                    )
                )
        try:
            conns: dict[int, Connection] = {}
            deadline = time.monotonic() + self.start_timeout
            while len(conns) < self.world_size:
                conn = await asyncio.to_thread(self._accept, listener, deadline)
                _, rank, _pid = conn.recv()
                conns[rank] = conn
            self._conns = [conns[r] for r in range(self.world_size)]
            for conn in self._conns:
                conn.send(settings)
            replies = await self._collect("start", deadline=time.monotonic() + self.start_timeout)
            own(self)
            self.warmed_up = False
        except BaseException:
            self.stop()
            raise
        finally:
            listener.close()
        return replies[0]

    def _accept(self, listener: Listener, deadline: float) -> Connection:
        sock = listener._listener._socket  # a timeout lets us notice workers that die before connecting
        while True:
            self._check_processes("start")
            if time.monotonic() > deadline:
                raise TrainerCrashedError(
                    f"trainer workers did not start within {self.start_timeout:g} s" + self._tails()
                )
            sock.settimeout(0.5)
            try:
                return listener.accept()
            except TimeoutError:
                continue

    def _check_processes(self, what: str) -> None:
        for rank, proc in enumerate(self._procs):
            code = proc.poll()
            if code is not None:
                self.stop()
                raise TrainerCrashedError(
                    f"trainer worker rank {rank} (pid {proc.pid}) exited with code {code} during '{what}'. "
                    f"Its log: {self.log_path(rank)}" + self._tails([rank])
                )

    def _tails(self, ranks: list[int] | None = None, lines: int = 30) -> str:
        out = []
        for rank in ranks if ranks is not None else range(self.world_size):
            try:
                text = self.log_path(rank).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"\n--- last lines of {self.log_path(rank)} ---\n" + "\n".join(text))
        return "".join(out)

    async def _collect(self, what: str, ranks: list[int] | None = None, deadline: float | None = None) -> list[Any]:
        """Wait for one answer from each of `ranks` (all by default), watching the processes meanwhile."""
        ranks = ranks if ranks is not None else list(range(self.world_size))

        def wait() -> list[Any]:
            results: dict[int, Any] = {}
            while len(results) < len(ranks):
                pending = {self._conns[r]: r for r in ranks if r not in results}
                for conn in wait_for(list(pending), timeout=0.2):
                    rank = pending[conn]
                    status, value = conn.recv()
                    if status == "error":
                        self.stop()
                        raise TrainerCrashedError(f"trainer worker rank {rank} failed during '{what}':\n{value}")
                    results[rank] = value
                if len(results) < len(ranks):
                    self._check_processes(what)
                    if deadline is not None and time.monotonic() > deadline:
                        self.stop()
                        raise TrainerCrashedError(f"trainer workers did not answer '{what}' in time" + self._tails())
            return [results[r] for r in ranks]

        reader = asyncio.ensure_future(asyncio.to_thread(wait))
        try:
            return await asyncio.shield(reader)
        except asyncio.CancelledError:
            # A thread cannot be cancelled: it would read on, and take the answer to the next call. Stop the workers
            # (the command's outcome is unknown; the next step starts them again from the last checkpoint) and wait
            # for the reader to see them gone, so that it is the only one that ever read these connections.
            self.stop()
            await asyncio.wait([reader])
            raise
        except (EOFError, OSError) as e:
            await self._name_the_dead(what)
            self.stop()
            raise TrainerCrashedError(f"lost the trainer workers during '{what}': {e}" + self._tails()) from None

    async def _name_the_dead(self, what: str) -> None:
        """A connection broke: give a dying worker a second to be reaped, so that the error says how it ended
        (a SIGKILLed worker's socket can reset before its exit code is there)."""
        for _ in range(20):
            self._check_processes(what)  # raises, naming the rank and its exit code
            await asyncio.sleep(0.05)

    async def call(
        self, command: str, per_rank: list[dict[str, Any]] | None = None, ranks: list[int] | None = None, **kwargs: Any
    ) -> list[Any]:
        """Send `command` to the given ranks (all by default) and wait for every answer."""
        if not self._conns:
            raise TrainerCrashedError("the trainer workers are not running (start() them, or they were stopped)")
        ranks = ranks if ranks is not None else list(range(self.world_size))
        async with self._busy:
            try:
                for rank in ranks:
                    self._conns[rank].send((command, per_rank[rank] if per_rank is not None else kwargs))
            except OSError as e:
                await self._name_the_dead(command)
                self.stop()
                raise TrainerCrashedError(f"lost the trainer workers during '{command}': {e}" + self._tails()) from None
            return await self._collect(command, ranks)

    # -- the interface the backend uses -----------------------------------------------------------------
    def _shards(self, sequences: list[Sequence]) -> list[list[Sequence]]:
        """The sequences split over the ranks, longest first onto the least loaded."""
        shards: list[list[Sequence]] = [[] for _ in range(self.world_size)]
        loads = [0] * self.world_size
        for s in sorted(sequences, key=len, reverse=True):
            r = loads.index(min(loads))
            shards[r].append(s)
            loads[r] += len(s)
        return shards

    async def sft(self, sequences: list[Sequence], learning_rate: float) -> dict[str, float]:
        """One supervised optimizer step on all ranks: mean cross-entropy per trained token, its gradient norm."""
        total = sum(sum(s.mask[1:]) for s in sequences)
        kwargs = {"learning_rate": learning_rate, "total_tokens": total}
        parts = await self.call("sft", per_rank=[{"sequences": sh, **kwargs} for sh in self._shards(sequences)])
        return {
            "loss": sum(p["loss_sum"] for p in parts) / max(total, 1),
            "grad_norm": parts[0]["grad_norm"],
            "tokens": float(total),
            "train_seconds": max(p["train_seconds"] for p in parts),
        }

    async def train(self, sequences: list[Sequence], options: StepOptions) -> dict[str, float]:
        """A `train()` call's optimizer steps as ART's LocalBackend takes them (trainer/schedule.py). Metrics: the
        loss, gradient norm and KL are means over the steps; the logprob gap compares the sampler's logprobs with
        the trainer's before this call's first update (after ART's warm-up step, which moves nothing measurable)."""
        rows = schedule.art_rows(sequences)
        warmup = not self.warmed_up
        if warmup:
            loss = dataclasses.replace(options.loss, kl_penalty_coef=0.0)
            warm = dataclasses.replace(options, learning_rate=schedule.WARMUP_LEARNING_RATE, loss=loss)
            await self._step([schedule.warmup_row(rows[0])], warm)
            self.warmed_up = True
        before = await self.logprobs(rows)
        gap = logprob_gap(rows, before)
        if options.precalculate_logprobs:
            rows = schedule.with_precalculated(rows, before)
        steps = [
            await self._step(b, options) for b in schedule.optimizer_batches(rows, options.grad_accumulation_sequences)
        ]
        tokens = sum(s["tokens"] for s in steps)
        metrics = {
            "loss": sum(s["loss"] for s in steps) / len(steps),
            "grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
            "entropy": sum(s["entropy_sum"] for s in steps) / max(tokens, 1.0),
            "tokens": tokens,
            "optimizer_steps": float(len(steps)),
            "warmup_steps": float(warmup),
            **gap,
            "train_seconds": sum(s["train_seconds"] for s in steps),
        }
        kl = [s["kl_policy_ref"] for s in steps if "kl_policy_ref" in s]
        if kl:
            metrics["kl_policy_ref"] = sum(kl) / len(kl)
        return metrics

    async def _step(self, batch: list[Sequence], options: StepOptions) -> dict[str, float]:
        """One optimizer step over `batch`, spread over the ranks; its metrics summed over them."""
        opts = dataclasses.replace(options, step_sequences=len(batch))
        parts = await self.call("train", per_rank=[{"sequences": sh, "options": opts} for sh in self._shards(batch)])
        out = {k: sum(p[k] for p in parts) for k in parts[0] if k not in ("grad_norm", "train_seconds")}
        out["loss"] = out["loss_sum"] / len(batch)
        out["grad_norm"] = parts[0]["grad_norm"]
        out["train_seconds"] = max(p["train_seconds"] for p in parts)
        if out["kl_batches"]:
            out["kl_policy_ref"] = out["kl_sum"] / out["kl_batches"]
        return out

    async def logprobs(self, sequences: list[Sequence]) -> list[list[float]]:
        """The policy's logprobs of each sequence's trainable tokens, computed on all ranks."""
        shards = [list(range(r, len(sequences), self.world_size)) for r in range(self.world_size)]
        parts = await self.call("logprobs", per_rank=[{"sequences": [sequences[i] for i in sh]} for sh in shards])
        out: list[list[float]] = [[] for _ in sequences]
        for shard, values in zip(shards, parts, strict=True):
            for i, v in zip(shard, values, strict=True):
                out[i] = v
        return out

    async def save_checkpoint(self, directory: str | Path, step: int) -> Path:
        return Path((await self.call("save_checkpoint", ranks=[0], directory=str(directory), step=step))[0])

    async def load_checkpoint(self, directory: str | Path) -> int:
        return (await self.call("load_checkpoint", directory=str(directory)))[0]

    async def adapter_payload(self) -> dict[str, Any]:
        """The adapter as it is now, packed for the server's load from tensors (see PolicyTrainer.adapter_payload)."""
        return (await self.call("adapter_payload", ranks=[0]))[0]

    async def write_adapter(self, directory: str | Path) -> dict[str, float]:
        """The adapter as it is now, written as a PEFT directory (see PolicyTrainer.write_adapter)."""
        return (await self.call("write_adapter", ranks=[0], directory=str(directory)))[0]

    async def export_merged(
        self, directory: str | Path, changed_only: bool = False, dtype: str | None = None
    ) -> dict[str, float]:
        kwargs = {"directory": str(directory), "changed_only": changed_only, "dtype": dtype}
        return (await self.call("export_merged", ranks=[0], **kwargs))[0]

    async def offload(self) -> dict[str, float]:
        return (await self.call("offload"))[0]

    async def reload(self) -> dict[str, float]:
        return (await self.call("reload"))[0]

    @property
    def running(self) -> bool:
        return bool(self._conns)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Ask the workers to exit; stop their process groups if they do not."""
        with contextlib.suppress(Exception):
            for conn in self._conns:
                conn.send(("shutdown", {}))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in self._procs) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        self.stop()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM each worker's process group, SIGKILL after `grace` seconds, and reap."""
        release(self)
        procs, self._procs = self._procs, []
        conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        for p in procs:
            stop_group(p.pid, grace, f"trainer worker {p.pid}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        if self._store is not None:
            self._store.unlink(missing_ok=True)


def logprob_gap(sequences: list[Sequence], trainer: list[list[float]]) -> dict[str, float]:
    """|sampler - trainer| logprob of each sampled token (the trainer's from `sequence_logprobs`): the mean, the
    worst, and how many exceed 1e-2 (a mean hides rare large mismatches)."""
    gaps = []
    for s, values in zip(sequences, trainer, strict=True):
        pairs = zip(s.trained_positions(), values, strict=True)
        gaps += [abs(s.logprobs[t] - v) for t, v in pairs if not math.isnan(s.logprobs[t])]
    return {
        "engine_trainer_logprob_gap": sum(gaps) / max(len(gaps), 1),
        "engine_trainer_logprob_gap_max": max(gaps, default=0.0),
        "engine_trainer_logprob_gap_over_1e-2": float(sum(g > 1e-2 for g in gaps)),
    }
