"""The check that the server serves the trainer's policy: both score one rendered reply, token by token.

Run once the first policy is published, on every server. A model SGLang serves differently from transformers (an
architecture it implements otherwise, a checkpoint field it ignores), or a server elsewhere started on another model,
would otherwise serve a wrong policy with no error.
"""

from __future__ import annotations

import math

from ..chat import ChatTemplate
from ..errors import PolicyMismatchError
from ..server import ReplicaClient
from ..trainer.sequence import Sequence
from ..trainer.worker import TrainerGroup
from .base import SyncContext

# Mean |engine - trainer| logprob allowed: fp32 on both sides gives ~1e-6, bf16 ~1e-2; a wrong layer gives nats.
MAX_MEAN_GAP = 0.1


def _probe(template: ChatTemplate) -> tuple[Sequence, int]:
    """One rendered reply both sides score, and where its reply starts."""
    prompt = template.render([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True)
    reply = template.encode("Apple. It is a sweet fruit that grows on trees.")
    ids = prompt + reply
    return Sequence(ids, [math.nan] * len(ids), [False] * len(prompt) + [True] * len(reply), 0.0, 1.0, 0), len(prompt)


async def trainer_scores(trainer: TrainerGroup, template: ChatTemplate) -> list[float]:
    """The trainer's side of the check. Shared mode takes it while the trainer still holds the GPU at start."""
    (scores,) = await trainer.logprobs([_probe(template)[0]])
    return scores


async def check_served_policy(ctx: SyncContext, template: ChatTemplate, trainer: list[float] | None = None) -> float:
    """The largest mean logprob gap on one rendered reply over the servers (each replica, or servers elsewhere,
    checked on its own); PolicyMismatchError when a server's policy differs from the trainer's. `trainer`: its
    scores from `trainer_scores`, when taken earlier."""
    sequence, prompt_length = _probe(template)
    ids = sequence.token_ids
    route = ctx.gateway.route(ctx.name)
    if trainer is None:
        trainer = await trainer_scores(ctx.trainer, template)
    client = ctx.client
    servers = [client.replicas[i] for i in sorted(client.admitted)] if isinstance(client, ReplicaClient) else [client]
    worst = 0.0
    for server in servers:
        engine = await server.score(ids, prompt_length, lora_path=route.adapter if route else None)
        gap = sum(abs(a - b) for a, b in zip(engine, trainer, strict=True)) / len(trainer)
        if not gap <= MAX_MEAN_GAP:  # NaN included
            raise PolicyMismatchError(
                f"the SGLang server at {server.base_url} and the trainer disagree on the same tokens (mean logprob gap "
                f"{gap:.3g}, allowed {MAX_MEAN_GAP}): it serves another model, or SGLang {ctx.server.sglang_version} "
                "serves this model differently from transformers, so its samples would not be the trained policy's. "
                "See docs/models.md for the families that are checked, and the server log for warnings about weights "
                "it did not load."
            )
        worst = max(worst, gap)
    return worst
