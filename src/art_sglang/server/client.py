"""SGLangClient: typed async access to the SGLang endpoints an RL backend uses.

Errors come back as `SGLangAPIError` with the server's own message, or `ServerUnreachableError` when it does not
answer. Calls that would crash the server are refused here with `CapabilityError`.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from ..errors import CapabilityError, ServerUnreachableError, SGLangAPIError

PauseMode = Literal["abort", "retract", "in_place"]


@dataclass
class GenerateOutput:
    """One `/generate` result. `output_ids[i]` was sampled with log-probability `output_logprobs[i]`."""

    text: str
    output_ids: list[int]
    output_logprobs: list[float]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None
    weight_version: str | None
    meta_info: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateOutput:
        meta = data.get("meta_info", {})
        token_logprobs = meta.get("output_token_logprobs") or []
        finish = meta.get("finish_reason")
        return cls(
            text=data.get("text", ""),
            output_ids=list(data.get("output_ids") or [t[1] for t in token_logprobs]),
            output_logprobs=[t[0] for t in token_logprobs],
            prompt_tokens=meta.get("prompt_tokens", 0),
            completion_tokens=meta.get("completion_tokens", 0),
            cached_tokens=meta.get("cached_tokens", 0),
            finish_reason=finish.get("type") if isinstance(finish, dict) else finish,
            weight_version=meta.get("weight_version"),
            meta_info=meta,
        )


class SGLangClient:
    """Async client for one SGLang server at `base_url` (e.g. `SGLangServer.base_url`)."""

    by_tensors = False  # adapters go to the server as tensors, not paths: it cannot read this machine's files

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers)
        self._server_info: dict[str, Any] | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> SGLangClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            response = await self._http.request(method, path, json=json)
        except httpx.TransportError as e:
            raise ServerUnreachableError(
                f"the SGLang server at {self.base_url} did not answer {path} ({type(e).__name__}: {e}); it crashed "
                "or is restarting (its log says which)"
            ) from e
        if response.status_code != 200:
            raise SGLangAPIError(path, response.status_code, _message(response))
        if not response.content:
            return None
        try:
            data = response.json()
        except ValueError:
            return response.text
        if isinstance(data, dict) and data.get("success") is False:
            raise SGLangAPIError(path, response.status_code, str(data.get("message", data)))
        return data

    # -- state ------------------------------------------------------------------------------------------
    async def health(self) -> bool:
        try:
            return (await self._http.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def model_info(self) -> dict[str, Any]:
        return await self._call("GET", "/model_info")

    async def weight_version(self) -> str:
        return (await self.model_info())["weight_version"]

    async def server_info(self) -> dict[str, Any]:
        self._server_info = await self._call("GET", "/server_info")
        return self._server_info

    async def _capabilities(self) -> dict[str, Any]:
        return self._server_info if self._server_info is not None else await self.server_info()

    # -- generation -------------------------------------------------------------------------------------
    async def generate(
        self,
        *,
        text: str | None = None,
        input_ids: list[int] | None = None,
        sampling_params: dict[str, Any] | None = None,
        return_logprob: bool = True,
        lora_path: str | None = None,
        rid: str | None = None,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
    ) -> GenerateOutput:
        """`/generate` with text or token ids; `lora_path` is the adapter's registered name."""
        if (text is None) == (input_ids is None):
            raise ValueError("generate() takes exactly one of text= or input_ids=")
        body: dict[str, Any] = {"sampling_params": sampling_params or {}, "return_logprob": return_logprob}
        body.update({"text": text} if text is not None else {"input_ids": input_ids})
        for key, value in (
            ("lora_path", lora_path),
            ("rid", rid),
            ("logprob_start_len", logprob_start_len),
            ("top_logprobs_num", top_logprobs_num),
        ):
            if value is not None:
                body[key] = value
        return GenerateOutput.from_json(await self._call("POST", "/generate", body))

    async def score(self, input_ids: list[int], start: int, *, lora_path: str | None = None) -> list[float]:
        """The served policy's logprobs of `input_ids[start:]` (start >= 1), by a prefill with no sampling; nan where
        SGLang gives none (a non-finite value)."""
        out = await self.generate(
            input_ids=input_ids,
            sampling_params={"max_new_tokens": 0},
            logprob_start_len=start - 1,
            lora_path=lora_path,
        )
        return [math.nan if e[0] is None else e[0] for e in out.meta_info["input_token_logprobs"][1:]]

    async def flush_cache(self) -> None:
        """Empty the radix cache. SGLang refuses while requests run (SGLangAPIError)."""
        await self._call("POST", "/flush_cache")

    async def pause_generation(self, mode: PauseMode = "abort") -> None:
        await self._call("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        await self._call("POST", "/continue_generation", {})

    # -- weights ----------------------------------------------------------------------------------------
    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
    ) -> dict[str, Any]:
        """Load new base weights from a directory. Never flush while requests run: it kills the server
        (pause first and pass flush_cache=False, or abort_all_requests=True)."""
        return await self._call(
            "POST",
            "/update_weights_from_disk",
            {
                "model_path": model_path,
                "weight_version": weight_version,
                "flush_cache": flush_cache,
                "abort_all_requests": abort_all_requests,
            },
        )

    async def update_weight_version(self, version: str) -> None:
        """Set the version that responses report (for adapter swaps, which leave the base weights alone)."""
        await self._call("POST", "/update_weight_version", {"new_version": version, "abort_all_requests": False})

    async def models(self) -> list[str]:
        """`/v1/models`: the served model name, then every loaded LoRA adapter."""
        return [m["id"] for m in (await self._call("GET", "/v1/models"))["data"]]

    # -- LoRA -------------------------------------------------------------------------------------------
    async def _require_lora(self) -> None:
        if not (await self._capabilities()).get("enable_lora"):
            raise CapabilityError("This SGLang server was started without --enable-lora; it cannot load adapters.")

    async def load_lora_adapter(self, name: str, path: str, *, pinned: bool = False) -> dict[str, Any]:
        """Load a PEFT adapter directory under `name`. A name already loaded is refused: use a new one."""
        await self._require_lora()
        return await self._call("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": pinned})

    async def load_lora_adapter_from_tensors(self, name: str, config: dict[str, Any], tensors: bytes) -> dict[str, Any]:
        """Load an adapter from memory under `name`: its PEFT config and its tensors pickled as the server's
        `SafeUnpickler` loads them (`trainer.pack.TensorPacker`). A name already loaded is refused."""
        await self._require_lora()
        body = {"lora_name": name, "config_dict": config, "serialized_tensors": base64.b64encode(tensors).decode()}
        return await self._call("POST", "/load_lora_adapter_from_tensors", body)

    async def unload_lora_adapter(self, name: str) -> dict[str, Any]:
        """Unload; SGLang waits until no running request uses it."""
        return await self._call("POST", "/unload_lora_adapter", {"lora_name": name})

    # -- memory -----------------------------------------------------------------------------------------
    async def _check_memory_saver(self, what: str) -> None:
        info = await self._capabilities()
        if info.get("device") == "cpu":
            raise CapabilityError(
                f"{what} is not available on a CPU server: it calls CUDA and takes the whole server down. "
                "On the CPU, sync weights with 'lora' or 'disk' and keep the server running."
            )
        if not info.get("enable_memory_saver"):
            raise CapabilityError(f"{what} needs a server started with --enable-memory-saver.")

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free GPU memory (weights, kv_cache, cuda_graph) of an idle server."""
        await self._check_memory_saver("release_memory_occupation")
        await self._call("POST", "/release_memory_occupation", {"tags": tags})

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self._check_memory_saver("resume_memory_occupation")
        await self._call("POST", "/resume_memory_occupation", {"tags": tags})


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()
    if isinstance(data, dict):
        for key in ("message", "detail", "error"):
            if key in data:
                value = data[key]
                return value.get("message", str(value)) if isinstance(value, dict) else str(value)
    return str(data)
