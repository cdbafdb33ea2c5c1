"""What every weight-sync method works with, and what it promises."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import SGLangConfig
from ..errors import LeaseError
from ..gateway import Gateway
from ..leases import Leases
from ..server import ReplicaSet, SGLangClient, SGLangServer
from ..trainer.worker import TrainerGroup

Durable = Callable[[], Awaitable[None]]  # writes a new step's checkpoint


@dataclass
class SyncContext:
    name: str  # the model's name: routes are `name` and `name@step`
    server: SGLangServer | ReplicaSet
    client: SGLangClient
    gateway: Gateway
    trainer: TrainerGroup
    config: SGLangConfig
    merged_root: Path  # where merged weights are exported (a RAM disk when there is room)
    model_dir: Path  # the model's checkpoints are under it
    leases: Leases
    drain_timeout: float = 60.0


class WeightSync:
    """One way of putting a policy on the server.

    `publish(step, checkpoint, durable)` makes the server serve `step`, whatever it serves now: the previous step,
    nothing of ours (just started or restarted), or a step that failed halfway. When it returns, new requests for
    the model are answered by `step`; when it raises, the caller puts the last good step back with another publish.
    A new step comes from the trainer, with `durable` writing its checkpoint: nothing answers as `step` before that
    has returned (a step whose checkpoint fails was never served, so its retry's replies are the only ones stamped
    with its number); a step published again has its checkpoint on disk and no `durable`.
    """

    method = "base"
    needs_trainer = True  # publishing exports the policy from the trainer (a republish too)

    def __init__(self, ctx: SyncContext) -> None:
        self.ctx = ctx
        self.step: int | None = None  # the step new requests for the model go to

    async def publish(self, step: int, checkpoint: Path, durable: Durable | None = None) -> dict[str, float]:
        raise NotImplementedError

    async def serve(self, step: int) -> None:
        """Make `name@step` answered by step's own weights while a lease holds it, or raise LeaseError. A method
        that keeps one policy on the server can serve only the newest step."""
        if step != self.step:
            raise LeaseError(
                f"step {step} of {self.ctx.name!r} cannot be served: weight_sync_method={self.method!r} keeps one "
                f"policy on the server (step {self.step}). Use weight_sync_method='lora' to serve older steps "
                "(PipelineTrainer, evaluation of old checkpoints)."
            )

    async def prune(self, keep: set[int]) -> None:
        """Unload what no lease, request or `keep` needs (ART's prune_model_adapters)."""

    async def retire(self) -> None:
        """Take the model's policy off a server that other models keep using (its start failed)."""

    async def close(self) -> None:
        """Finish background work (adapter unloads)."""

    async def export(self, step: int, layers: str | None = None) -> tuple[Path, dict[str, float]]:
        """Merged weights for `step` in the server's dtype, replacing older exports (only read while loading).
        `layers`: the changed layers alone, into that directory, which the export rewrites in place."""
        target = self.ctx.merged_root / (layers or f"step-{step:04d}")
        dtype = None if self.ctx.config.dtype == "auto" else self.ctx.config.dtype
        stats = await self.ctx.trainer.export_merged(target, layers is not None, dtype)
        keep = {target}
        if isinstance(self.ctx.server, ReplicaSet):  # a replica that dies before the next roll restarts on it
            keep.add(Path(self.ctx.server.model_path))
        for old in self.ctx.merged_root.glob("step-*"):
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)
        return target, stats
