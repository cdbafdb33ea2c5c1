"""ExternalServer: an SGLang server started elsewhere (another host), attached by URL.

It has SGLangServer's life cycle, as ReplicaSet uses it, without owning a process: `start` waits until the server
answers and checks that it can serve the policy exactly (LoRA on, rank and layers, logprobs of the policy itself);
`crash_reason` is what its health poll last saw; `stop` stops only the poll. The server is never signalled or
stopped: whoever started it owns it. `art-sglang serve` starts one with the flags the backend needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from pathlib import Path
from typing import Any

from ..config import SGLangConfig
from ..errors import ArtSGLangError, ServerStartError
from .client import SGLangClient

log = logging.getLogger(__name__)

HEALTH_INTERVAL = 1.0  # seconds between health polls
HEALTH_MISSES = 2  # polls in a row without an answer before the server counts as down
# Mean |sampled - prefill| logprob on the probe allowed: fp32 ~1e-6, bf16 ~1e-2; temperature-scaled logprobs at the
# probe's temperature differ by nats.
MAX_PROBE_GAP = 0.1
PROBE_TEMPERATURE = 2.0
# What the backend needs of a server started elsewhere, as `art-sglang serve` starts it.
SERVE_HINT = (
    "Start it with `art-sglang serve --model <base model> --port <port>` (add --host 0.0.0.0 --api-key <key> for "
    "other hosts), which sets the flags and environment the backend needs."
)


def check_server_args(info: dict[str, Any], cfg: SGLangConfig) -> list[str]:
    """What in a server's `/server_info` keeps it from serving this backend's adapters."""
    problems = []
    if not info.get("enable_lora"):
        problems.append("LoRA is off (--enable-lora)")
    else:
        rank = info.get("max_lora_rank")
        if rank is not None and rank < cfg.max_lora_rank:
            problems.append(f"--max-lora-rank is {rank}, the adapters need {cfg.max_lora_rank}")
        served = info.get("lora_target_modules") or []
        wanted = cfg.lora_target_modules or []
        if "all" not in served and (missing := sorted(set(wanted) - set(served))):
            problems.append(f"--lora-target-modules {served} lacks {missing}")
    return problems


class ExternalServer:
    """An SGLang server at `url`, started by someone else; see the module's docstring."""

    def __init__(self, url: str, config: SGLangConfig, *, log_path: str | Path) -> None:
        self.base_url = url.rstrip("/")
        self.config = config
        self.log_path = Path(log_path)  # the backend's notes on it; its own log is where it runs
        self.model_path = self.base_model_path = self.base_url
        self.restarts = 0
        self.served_model_name: str | None = None
        self._version = "unknown"
        self._attached: int | None = None  # which attach the health poll belongs to
        self._attaches = 0
        self._down: str | None = "not attached yet"
        self._poll: asyncio.Task[None] | None = None  # ends when the server is down or detached

    @property
    def sglang_version(self) -> str:
        return self._version

    @property
    def pid(self) -> None:
        """No process of ours."""
        return None

    @property
    def running(self) -> bool:
        return self._attached is not None

    async def start(self) -> None:
        """Wait up to `server_timeout` for the server to answer, check it, then watch its health."""
        async with SGLangClient(self.base_url, api_key=self.config.api_key, timeout=60.0) as client:
            deadline = asyncio.get_running_loop().time() + self.config.server_timeout
            while not await client.health():
                if asyncio.get_running_loop().time() > deadline:
                    raise ServerStartError(
                        f"the SGLang server at {self.base_url} did not answer /health within "
                        f"{self.config.server_timeout:.0f} s (SGLangConfig.server_timeout). Check that it runs and "
                        f"that this host reaches it. {SERVE_HINT}"
                    )
                await asyncio.sleep(HEALTH_INTERVAL)
            info = await client.server_info()
            if problems := check_server_args(info, self.config):
                raise ArtSGLangError(
                    f"the SGLang server at {self.base_url} cannot serve this backend's adapters: "
                    f"{'; '.join(problems)}. {SERVE_HINT}"
                )
            await _check_policy_logprobs(client, self.base_url)
        self._version = str(info.get("version", "unknown"))
        self.served_model_name = info.get("served_model_name") or info.get("model_path")
        self._attaches += 1
        self._attached, self._down = self._attaches, None
        self._poll = asyncio.create_task(self._watch_health())
        log.info("art-sglang: attached SGLang %s at %s", self._version, self.base_url)

    async def _watch_health(self) -> None:
        attach = self._attached
        async with SGLangClient(self.base_url, api_key=self.config.api_key) as client:
            misses = 0
            while self._attached == attach:
                await asyncio.sleep(HEALTH_INTERVAL)
                misses = 0 if await client.health() else misses + 1
                if misses >= HEALTH_MISSES and self._attached == attach:
                    self._down = f"{self.base_url} did not answer /health {misses} times in a row"
                    return

    def stop(self) -> None:
        """Stop watching it; the server itself is left running. (It may run in a worker thread: the poll then
        ends at its next tick.)"""
        self._attached = None
        self._down = self._down or "detached"
        if self._poll is not None:
            with contextlib.suppress(RuntimeError):  # not on the loop's thread
                if asyncio.get_running_loop() is self._poll.get_loop():
                    self._poll.cancel()

    def crash_reason(self) -> str | None:
        return self._down

    def log_tail(self, lines: int = 40) -> str:
        return f"(the log of the SGLang server at {self.base_url} is on the host that runs it)"


async def _check_policy_logprobs(client: SGLangClient, url: str) -> None:
    """Sampled tokens' logprobs must be the policy's (log_softmax of the logits), as the trainer computes them,
    not of logits / temperature: sample a few tokens hot, then score the same tokens by a prefill."""
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    out = await client.generate(
        input_ids=prompt,
        sampling_params={"max_new_tokens": 8, "temperature": PROBE_TEMPERATURE, "ignore_eos": True},
    )
    scored = await client.score(prompt + out.output_ids, len(prompt))
    gaps = [abs(a - b) for a, b in zip(out.output_logprobs, scored, strict=True)]
    gap = sum(gaps) / len(gaps) if gaps else math.nan
    if not gap <= MAX_PROBE_GAP:
        raise ArtSGLangError(
            f"the SGLang server at {url} returns logprobs of the temperature-scaled distribution (mean gap {gap:.3g} "
            f"at temperature {PROBE_TEMPERATURE}), not the policy's: the trainer would see wrong old logprobs. Start "
            f"it with SGLANG_RETURN_ORIGINAL_LOGPROB=1 in its environment. {SERVE_HINT}"
        )
