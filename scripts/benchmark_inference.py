"""Rollout throughput on a GRPO-shaped workload, for SGLang, vLLM, or SGLang behind our gateway.

Workload: P prompts x G samples, all sent at once as streamed chat requests. Every prompt shares one system prompt
(about S tokens) and has its own context; sampling at temperature 1 with exactly T output tokens (ignore_eos), so
every engine does the same work. With `--turns N` each sample is an agent-like episode of N turns: each turn sends
the whole conversation so far (the previous replies and a follow-up user message) as soon as the previous turn
ends. The prefix cache is flushed before each run. Reported: output tokens/s, time to first token and request
latency (p50/p99), prompt tokens, cached prompt tokens and the hit ratio (also for turns 2..N alone).
`--no-stream` sends plain requests: under ignore_eos a stream gives no token for special tokens sampled mid-reply,
so only a non-streamed reply lets the gateway keep every later turn's history token-exact.

Engines: `sglang` and `vllm` direct; `gateway` is SGLang behind our gateway as the backend runs it (prompts rendered
by the gateway with token-exact history, prefix warm-up of each group's prompt on); `gateway-nowarmup` the same with
the warm-up off, which isolates the gateway's own cost.

Each engine runs from its own venv, on 127.0.0.1, one at a time, same model, dtype, prompts and sampling:
    .venv/bin/python scripts/benchmark_inference.py --engine sglang
    .venv/bin/python scripts/benchmark_inference.py --engine vllm          # needs bash scripts/setup_vllm.sh
    .venv/bin/python scripts/benchmark_inference.py --engine sglang,vllm,gateway --runs 3 --out results.json
`--model` takes a local model directory (default: the bundled SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from art_sglang.chat import ChatTemplate  # noqa: E402
from art_sglang.config import SGLangConfig  # noqa: E402
from art_sglang.gateway import Gateway  # noqa: E402
from art_sglang.models import check_model_dir, small_model  # noqa: E402
from art_sglang.procs import die_with_parent  # noqa: E402
from art_sglang.server import SGLangServer  # noqa: E402
from art_sglang.server.process import free_port  # noqa: E402

WORDS = (
    "river mountain signal copper lantern harvest orbit velvet quarry ember meadow circuit falcon glacier "
    "harbor juniper kettle ledger mosaic nectar"
).split()


def workload(prompts: int, system_words: int, context_words: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    system = "You are a careful assistant. Reference notes: " + " ".join(rng.choices(WORDS, k=system_words))
    out = []
    for i in range(prompts):
        context = " ".join(rng.choices(WORDS, k=context_words))
        out.append(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Task {i}. Context: {context}. Continue the list of words."},
            ]
        )
    return out


FOLLOW_UP = "Good. Now continue the list with different words."


class VLLMServer:
    """vLLM's OpenAI server from .venv-vllm, in its own process group (../shared/notes/vllm-on-cpu.md)."""

    def __init__(self, model: Path, log_path: Path, timeout: float = 300) -> None:
        self.model, self.log_path, self.timeout = model, log_path, timeout
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        python = ROOT / ".venv-vllm" / "bin" / "python"
        if not python.exists():
            raise SystemExit("vLLM is not installed: run `bash scripts/setup_vllm.sh` first")
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": "auto",
            "VLLM_SERVER_DEV_MODE": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
        cmd = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            "bench",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + self.timeout
        async with httpx.AsyncClient() as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"vLLM exited during start-up; see {self.log_path}")
                try:
                    if (await c.get(f"{self.base_url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1)
        self.stop()
        raise SystemExit(f"vLLM was not healthy within {self.timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict], tokens: int, seed: int, stream: bool
) -> dict:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 1.0,
        "stream": stream,
        "ignore_eos": True,
        "seed": seed,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft, usage, text, prompt_ids, sampled = None, {}, [], None, []
    if not stream:  # the time to first token is the latency
        r = await client.post(url, json=body)
        r.raise_for_status()
        data = r.json()
        choice, usage = data["choices"][0], data.get("usage") or {}
        text, prompt_ids = [choice["message"]["content"] or ""], choice.get("prompt_token_ids")
        sampled = choice.get("token_ids") or []
    else:
        async with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                prompt_ids = prompt_ids or data.get("prompt_token_ids")  # our gateway's exact ids, as vLLM streams
                sampled += (data["choices"][0].get("token_ids") or []) if data.get("choices") else []
                delta = data["choices"][0].get("delta", {}).get("content") if data.get("choices") else None
                if delta:
                    text.append(delta)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                usage = data.get("usage") or usage
    return {
        "ttft": ttft or time.perf_counter() - t0,
        "latency": time.perf_counter() - t0,
        "prompt": usage.get("prompt_tokens", 0),
        "completion": usage.get("completion_tokens", 0),
        "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        "text": "".join(text),
        "ids": (prompt_ids, sampled) if prompt_ids else None,
    }


async def episode(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    messages: list[dict],
    turns: int,
    tokens: int,
    seed: int,
    stream: bool,
) -> list[dict]:
    """One sample: `turns` requests, each extending the conversation of the one before."""
    out, previous = [], None
    for turn in range(turns):
        r = await one_request(client, url, model, messages, tokens, seed + turn, stream)
        messages = [*messages, {"role": "assistant", "content": r.pop("text")}, {"role": "user", "content": FOLLOW_UP}]
        ids = r.pop("ids")
        if ids is not None and previous is not None:  # how much of this prompt the last turn's tokens could give
            r["reusable"] = next(
                (i for i, (a, b) in enumerate(zip(ids[0], previous, strict=False)) if a != b), len(previous)
            )
        previous = ids[0] + ids[1] if ids is not None else None
        out.append({**r, "turn": turn})
    return out


async def run_workload(
    base: str,
    model: str,
    prompts: list[list[dict]],
    group: int,
    tokens: int,
    flush: str | None,
    turns: int = 1,
    stream: bool = True,
) -> dict:
    async with httpx.AsyncClient(timeout=1800) as client:
        if flush:
            await client.post(flush)
        t0 = time.perf_counter()
        url = f"{base}/v1/chat/completions"
        episodes = [
            episode(client, url, model, m, turns, tokens, (i * 100 + j) * 10, stream)
            for i, m in enumerate(prompts)
            for j in range(group)
        ]
        results = [r for e in await asyncio.gather(*episodes) for r in e]
        wall = time.perf_counter() - t0
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, round(p * (len(xs) - 1)))]  # noqa: E731
    prompt, cached = sum(r["prompt"] for r in results), sum(r["cached"] for r in results)
    later = [r for r in results if r["turn"] > 0]
    later_prompt = sum(r["prompt"] for r in later)
    reusable = sum(r.get("reusable", 0) for r in later)
    return {
        "wall_s": wall,
        "output_tok_s": sum(r["completion"] for r in results) / wall,
        "ttft_p50_s": q([r["ttft"] for r in results], 0.5),
        "ttft_p99_s": q([r["ttft"] for r in results], 0.99),
        "latency_p50_s": q([r["latency"] for r in results], 0.5),
        "latency_p99_s": q([r["latency"] for r in results], 0.99),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_ratio": cached / prompt if prompt else 0.0,
        "later_turns_hit_ratio": sum(r["cached"] for r in later) / later_prompt if later_prompt else float("nan"),
        # Turns 2+: the share of the prompt that is the previous turn's exact tokens (the most a cache can give),
        # and of that, what was served from the cache. Known where the responses carry token ids (our gateway).
        "later_turns_reusable_share": reusable / later_prompt if reusable else float("nan"),
        "later_turns_hit_of_reusable": sum(r["cached"] for r in later) / reusable if reusable else float("nan"),
    }


async def bench_engine(engine: str, model: Path, args: argparse.Namespace, logs: Path) -> list[dict]:
    prompts = workload(args.prompts, args.system_words, args.context_words, args.seed)
    gateway = None
    if engine == "vllm":
        server = VLLMServer(model, logs / "vllm.log")
        await server.start()
        base, name, flush = server.base_url, "bench", f"{server.base_url}/reset_prefix_cache"
    else:
        server = SGLangServer(
            model,
            SGLangConfig(dtype="float32", max_total_tokens=65536, server_timeout=300),
            log_path=logs / "sglang.log",
            device=None,
            enable_lora=False,
            served_model_name="bench",
        )
        await server.start()
        base, name, flush = server.base_url, "bench", f"{server.base_url}/flush_cache"
        if engine.startswith("gateway"):
            template = ChatTemplate.load(model)
            gateway = Gateway(server.base_url, "bench", template=template, prefix_warmup=engine == "gateway")
            gateway.start()
            gateway.set_route("bench", 0, None)
            base = gateway.base_url.removesuffix("/v1")
    try:
        await run_workload(base, name, prompts[:1], 1, 4, None)  # warm-up
        runs = []
        for i in range(args.runs):
            r = await run_workload(
                base, name, prompts, args.group_size, args.max_tokens, flush, args.turns, not args.no_stream
            )
            print(
                f"  {engine} run {i + 1}: {r['output_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_s']:.2f} s, "
                f"hit {r['hit_ratio']:.0%}",
                flush=True,
            )
            runs.append(r)
        return runs
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="sglang", help="sglang, vllm, gateway, gateway-nowarmup, or a list")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--system-words", type=int, default=150, help="shared system prompt length (words)")
    p.add_argument("--context-words", type=int, default=60, help="per-prompt context length (words)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (turn)")
    p.add_argument("--turns", type=int, default=1, help="turns per episode (agent-like multi-turn when > 1)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="plain (non-streamed) requests; the time to first token is then the latency",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model = check_model_dir(args.model) if args.model else small_model(quiet=True)
    engines = args.engine.split(",")
    logs = Path(".art") / "benchmarks" / "logs"
    results: dict = {
        "date": time.strftime("%F %T"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "model": str(model),
        "workload": vars(args) | {"model": str(model)},
        "engines": {},
    }
    for engine in engines:
        runs = await bench_engine(engine, model, args, logs)
        results["engines"][engine] = {"median": median_of(runs), "runs": runs}
    print(
        f"\n{'engine':<17} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8} "
        f"{'prompt':>7} {'cached':>7} {'hit':>5} {'hit 2+':>6} {'reusable 2+':>11}"
    )
    for engine, r in results["engines"].items():
        m = r["median"]
        print(
            f"{engine:<17} {m['output_tok_s']:>7.1f} {m['ttft_p50_s']:>9.2f} {m['ttft_p99_s']:>9.2f} "
            f"{m['latency_p50_s']:>8.2f} {m['latency_p99_s']:>8.2f} {m['prompt_tokens']:>7.0f} "
            f"{m['cached_tokens']:>7.0f} {m['hit_ratio']:>5.0%} {m['later_turns_hit_ratio']:>6.0%} "
            f"{m['later_turns_reusable_share']:>11.1%}"
        )
    e = results["engines"]
    for a, b in (("sglang", "vllm"), ("gateway", "sglang"), ("gateway-nowarmup", "sglang")):
        if a in e and b in e:
            ratio = e[a]["median"]["output_tok_s"] / e[b]["median"]["output_tok_s"]
            results[f"{a}_over_{b}"] = ratio
            print(f"{a} / {b} output tok/s: {ratio:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    asyncio.run(main())
