"""ExternalServer: an SGLang server started elsewhere (another host), attached by URL.

It has SGLangServer's life cycle, as ReplicaSet uses it, without owning a process: `start` waits until the server
answers and checks that it can serve the policy exactly (LoRA on, rank and layers, logprobs of the policy itself);
`crash_reason` says why it counts as down (its liveness poll, or a call that failed); `stop` stops only the poll.
The server is never signalled or stopped: whoever started it owns it. `art-sglang serve` starts one with the flags
the backend needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from pathlib import Path
from typing import Any

from ..config import SGLangConfig
from ..errors import ArtSGLangError, ServerStartError, ServerUnreachableError, SGLangAPIError
from .client import SGLangClient

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between polls of a server's liveness
POLL_TIMEOUT = 5.0
POLL_MISSES = 2  # polls in a row without an answer before the server counts as down
ADMIN_TIMEOUT = 60.0  # an admin call to a server elsewhere (a hung host must not hold a sync for SGLang's 600 s)
# Mean |sampled - prefill| logprob on the probe allowed: fp32 ~1e-6, bf16 ~1e-2; temperature-scaled logprobs at the
# probe's temperature differ by nats.
MAX_PROBE_GAP = 0.1
PROBE_TEMPERATURE = 2.0
# What the backend needs of a server started elsewhere, as `art-sglang serve` starts it.
SERVE_HINT = (
    "Start it with `art-sglang serve --model <base model> --port <port>` (add --host 0.0.0.0 --api-key <key> for "
    "other hosts), which sets the flags and environment the backend needs."
)


def check_server_args(info: dict[str, Any], cfg: SGLangConfig, lora_rank: int) -> list[str]:
    """What in a server's `/server_info` keeps it from serving this backend's adapters (of rank `lora_rank`)."""
    problems = []
    if not info.get("enable_lora"):
        problems.append("LoRA is off (--enable-lora)")
    else:
        rank = info.get("max_lora_rank")
        if rank is not None and rank < lora_rank:
            problems.append(f"--max-lora-rank is {rank}, the adapters are of rank {lora_rank}")
        served = info.get("lora_target_modules") or []
        wanted = [m for m in cfg.lora_target_modules or [] if m != "all"]  # "all": PEFT's choice, known at load
        if "all" not in served and (missing := sorted(set(wanted) - set(served))):
            problems.append(f"--lora-target-modules {served} lacks {missing}")
        batch = info.get("max_loras_per_batch")
        if batch is not None and batch < cfg.max_loras_per_batch:
            problems.append(
                f"--max-loras-per-batch is {batch}, below SGLangConfig.max_loras_per_batch={cfg.max_loras_per_batch}"
            )
    return problems


class ExternalServer:
    """An SGLang server at `url`, started by someone else; see the module's docstring."""

    def __init__(self, url: str, config: SGLangConfig, *, lora_rank: int, log_path: str | Path) -> None:
        self.base_url = url.rstrip("/")
        self.config = config
        self.lora_rank = lora_rank
        self.log_path = Path(log_path)  # for messages only: its own log is on the host that runs it
        self.model_path = self.base_model_path = self.base_url
        self.served_model_name: str | None = None
        self._version = "unknown"
        self._down: str | None = "not attached yet"
        self._poll: asyncio.Task[None] | None = None  # ends when the server is down or detached

    @property
    def sglang_version(self) -> str:
        return self._version

    @property
    def pid(self) -> None:
        """No process of ours."""
        return None

    async def start(self) -> None:
        """Wait up to `server_timeout` for the server to answer, check it, then watch that it keeps answering."""
        async with SGLangClient(self.base_url, api_key=self.config.api_key, timeout=ADMIN_TIMEOUT) as client:
            deadline = asyncio.get_running_loop().time() + self.config.server_timeout
            while not await client.health():
                if asyncio.get_running_loop().time() > deadline:
                    raise ServerStartError(
                        f"the SGLang server at {self.base_url} did not answer /health within "
                        f"{self.config.server_timeout:.0f} s (SGLangConfig.server_timeout). Check that it runs and "
                        f"that this host reaches it. {SERVE_HINT}"
                    )
                await asyncio.sleep(POLL_INTERVAL)
            try:
                info = await client.server_info()
            except SGLangAPIError as e:
                if e.status != 401:
                    raise
                raise ArtSGLangError(
                    f"the SGLang server at {self.base_url} refused this backend's API key: SGLangConfig(api_key=...) "
                    "must equal the key the server was started with (--api-key)."
                ) from None
            if problems := check_server_args(info, self.config, self.lora_rank):
                raise ArtSGLangError(
                    f"the SGLang server at {self.base_url} cannot serve this backend's adapters: "
                    f"{'; '.join(problems)}. {SERVE_HINT}"
                )
            await _check_policy_logprobs(client, self.base_url)
        self._version = str(info.get("version", "unknown"))
        self.served_model_name = info.get("served_model_name") or info.get("model_path")
        self._down = None
        self._poll = asyncio.create_task(self._watch())
        log.info("art-sglang: attached SGLang %s at %s", self._version, self.base_url)

    async def _watch(self) -> None:
        """Mark the server down once it misses POLL_MISSES answers in a row. `/model_info` is answered by its HTTP
        process alone (`/health` runs a generation, which waits behind a long prefill): this asks whether the host
        and the server are there, not whether it is busy."""
        misses = 0
        try:
            async with SGLangClient(self.base_url, api_key=self.config.api_key, timeout=POLL_TIMEOUT) as client:
                while self._down is None:
                    await asyncio.sleep(POLL_INTERVAL)
                    try:
                        await client.model_info()
                        misses = 0
                    except ServerUnreachableError:
                        misses += 1
                    if misses >= POLL_MISSES:
                        self.mark_down(f"{self.base_url} did not answer {misses} times in a row")
        except Exception as e:  # the watch must not end unnoticed
            self.mark_down(f"its watch failed ({type(e).__name__}: {e})")

    def mark_down(self, reason: str) -> None:
        """Count it as down (its poll saw it go, or a call to it failed): ReplicaSet's watch takes it out."""
        if self._down is None:
            self._down = reason

    def stop(self) -> None:
        """Stop watching it; the server itself is left running. Safe from any thread."""
        self.mark_down("detached")
        poll, self._poll = self._poll, None
        if poll is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: the poll has ended
                poll.get_loop().call_soon_threadsafe(poll.cancel)

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
