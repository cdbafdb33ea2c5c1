"""What one gateway process sustains when the engine is fast (issue 29 item 2).

Three processes: a stub of SGLang 0.5.15 (tests/stub_sglang.py's JSON: choices with `meta_info` ids and logprobs,
`prompt_token_ids` echoed, usage, `metadata.weight_version`; tool calls as SGLang's parser returns them; a fixed
service time per request; named a stub: it runs no model), the real `Gateway` in front of it (SmolLM2's tokenizer,
the agent tests' tool-call template, the defaults `SGLangConfig()` gives it: prefix warm-up on, 4,096 admitted), and
this driver. N agents at once, each through ART's OpenAI client (`openai.AsyncOpenAI`, no connection limit): a
system prompt of H tokens, a task, then three assistant turns (two tool calls, each answered by a tool result, then
an answer), each turn sending every earlier reply back as the client returned it. The same agents also go
straight at the stub, in the same run. Per (H, N):
- requests/s, latency p50 / p99 and errors, through the gateway and direct; added latency = gateway - direct;
- the gateway process's CPU per request, split by stage (time.thread_time around each, in the thread it runs on):
  parse (the client's JSON), digest (the request's hashes: crash triage and warm-up keys), reply log (conversation
  keys and lookup, `fill`), render (the chat template's Jinja), tokenize, encode (JSON to the engine and to the
  client), engine reply (parsing the engine's JSON), record (remembering the reply), and the rest (HTTP on both
  sides, asyncio, response rewriting: "forward");
- memory per remembered token: the reply log's own structures (arrays, turns, keys) over its tokens, and the
  process's resident memory growth over the same tokens.
A fresh gateway process per (H, N). Combinations whose histories in flight exceed `--max-tokens-in-flight` are
skipped and said so (the driver alone would hold them as text several times over).

    .venv/bin/python benchmarks/gateway_load.py --out docs/results/gateway_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEMPLATE = ROOT / "tests" / "templates" / "chatml_tools_reasoning.jinja"  # the agent tests' (tests/rollouts.py)
MODEL_DIR = Path.home() / ".cache" / "art-sglang" / "models" / "SmolLM2-135M-Instruct"
CALL_TOKENS, ANSWER_TOKENS = 24, 6  # sampled ids of a tool-call reply and of the answer (the agent tests' sizes)


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))


# -- the stub engine (its own process) ---------------------------------------------------------------------------
def serve_stub(port_file: Path, service_time: float) -> None:
    from aiohttp import web
    from stub_sglang import StubSGLang

    class AgentStub(StubSGLang):
        """Answers as SGLang 0.5.15 with the qwen25 tool parser: a tool call while fewer than two tool results are
        in the conversation, then an answer. Records nothing (a load run would hold every body). Listens with a
        backlog of 8,192 (aiohttp's default is 128): the baseline should not drop connections of its own."""

        def _serve(self) -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application(client_max_size=256 * 2**20)
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/generate", self._generate)
            runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port, backlog=8192)
            self._loop.run_until_complete(site.start())
            self._ready.set()
            self._loop.run_forever()

        async def _chat(self, request: web.Request) -> web.StreamResponse:
            body = await request.json()
            await asyncio.sleep(self.service_time)
            prompt = body.get("input_ids") or []
            tools_done = sum(m.get("role") == "tool" for m in body.get("messages") or [])
            call = tools_done < 2 and body.get("tools")
            k = len(prompt) + tools_done
            sampled = [(-0.5, 1000 + (k + i) % 40000) for i in range(CALL_TOKENS if call else ANSWER_TOKENS)]
            sampled[-1] = (-0.1, 2)  # <|im_end|>
            message: dict[str, Any] = {"role": "assistant", "content": None, "reasoning_content": None}
            if call:
                args = json.dumps({"a": k % 10, "b": (k // 10) % 10})
                fn = {"name": "add", "arguments": args}
                message["tool_calls"] = [
                    {"id": f"call_{k}_{tools_done}", "index": 0, "type": "function", "function": fn}
                ]
            else:
                message.update(content=str(k % 100), tool_calls=None)
            entries = [{"token": "x", "bytes": [120], "logprob": lp, "top_logprobs": []} for lp, _ in sampled[:-1]]
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": {"content": entries},
                "finish_reason": "tool_calls" if call else "stop",
                "matched_stop": None if call else 2,
            }
            if body.get("return_meta_info"):
                choice["meta_info"] = {"output_token_logprobs": [[lp, i, None] for lp, i in sampled]}
            if body.get("return_prompt_token_ids"):
                choice["prompt_token_ids"] = prompt
            n_prompt = len(prompt) or sum(len(str(m.get("content") or "")) for m in body.get("messages") or []) // 4
            usage = {
                "prompt_tokens": n_prompt,
                "completion_tokens": len(sampled),
                "total_tokens": n_prompt + len(sampled),
                "prompt_tokens_details": {"cached_tokens": 0},
            }
            return web.json_response(
                {
                    "id": "stub",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [choice],
                    "usage": usage,
                    "metadata": {"weight_version": self.weight_version},
                }
            )

    raise_file_limit()
    stub = AgentStub()
    stub.service_time = service_time
    with stub:
        port_file.write_text(str(stub.port))
        threading.Event().wait()


# -- the gateway (its own process), with each stage timed --------------------------------------------------------
class Stages:
    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.cpu[stage] = self.cpu.get(stage, 0.0) + seconds

    def timed(self, stage: str, fn):
        def wrapper(*a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.add(stage, time.thread_time() - t0)

        return wrapper


def instrument(stages: Stages) -> None:
    """Wrap each stage of the gateway's request path (the functions it calls, not its code)."""
    import aiohttp
    from aiohttp import web, web_request

    from art_sglang import chat
    from art_sglang.gateway import gateway, replies

    async def parse(self):  # aiohttp's BaseRequest.json: read, then loads
        raw = await self.read()
        t0 = time.thread_time()
        try:
            return json.loads(raw)
        finally:
            stages.add("parse", time.thread_time() - t0)

    web_request.BaseRequest.json = parse
    gateway._digest = stages.timed("digest", gateway._digest)
    # The gateway module's `json`: its loads is the engine reply's parse (dumps: streaming only, not timed)
    timed_loads = stages.timed("engine reply", json.loads)
    gateway.json = type("TimedJson", (), {"loads": staticmethod(timed_loads), "dumps": staticmethod(json.dumps)})
    web.json_response = stages.timed("encode", web.json_response)
    init = aiohttp.ClientSession.__init__

    def session_init(self, *a, **k):
        k.setdefault("json_serialize", stages.timed("encode", json.dumps))
        init(self, *a, **k)

    aiohttp.ClientSession.__init__ = session_init
    chat.ChatTemplate.text = stages.timed("render", chat.ChatTemplate.text)
    chat.ChatTemplate.encode = stages.timed("tokenize", chat.ChatTemplate.encode)
    replies.ReplyLog.build = stages.timed("reply log+render+tokenize", replies.ReplyLog.build)
    replies.ReplyLog.record = stages.timed("record", replies.ReplyLog.record)
    last_known = replies.ReplyLog._last_known  # noqa: SLF001

    def counted(self, messages, keys):
        turn, j = last_known(self, messages, keys)
        if any(m.get("role") == "assistant" for m in messages):  # a later turn: its history should be known
            stages.add("later turns", 1)
            stages.add("later turns found in the reply log", turn is not None)
        return turn, j

    replies.ReplyLog._last_known = counted  # noqa: SLF001


def reply_log_bytes(log) -> int:
    """The reply log's own memory: each turn's token array, the Turn object, its key, and the dict's slot."""
    slot = sys.getsizeof(log._turns) / max(1, len(log._turns))  # noqa: SLF001
    total = 0
    for key, turn in list(log._turns.items()):  # noqa: SLF001
        total += sys.getsizeof(turn.tokens) + sys.getsizeof(turn) + sys.getsizeof(key) + slot
        total += sys.getsizeof(turn.__dict__) if hasattr(turn, "__dict__") else 0
    return int(total)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def serve_gateway(upstream: str, warmup: bool) -> None:
    """Start the gateway, print its URL, then answer 'stats' / 'reset' lines on stdin with a JSON line."""
    raise_file_limit()
    stages = Stages()
    instrument(stages)
    from art_sglang.chat import ChatTemplate
    from art_sglang.gateway.gateway import Gateway

    template = ChatTemplate.load(MODEL_DIR, str(TEMPLATE))
    g = Gateway(upstream, "served", template=template, prefix_warmup=warmup, max_running_requests=4096)
    g.start()
    g.set_route("policy", 0, None)
    base_rss, cpu0 = rss(), time.process_time()
    print(json.dumps({"url": g.base_url}), flush=True)
    for line in sys.stdin:
        if line.strip() == "reset":
            stages.cpu.clear()
            base_rss, cpu0 = rss(), time.process_time()
            print(json.dumps({}), flush=True)
        elif line.strip() == "stats":
            log = g.replies
            tokens = log._tokens  # noqa: SLF001
            requests = sum(c["requests"] for c in g.counters.values())
            print(
                json.dumps(
                    {
                        "cpu_s": time.process_time() - cpu0,
                        "stages_s": dict(stages.cpu),
                        "requests": requests,
                        "remembered_tokens": tokens,
                        "remembered_turns": len(log),
                        "reply_log_bytes": reply_log_bytes(log),
                        "rss_growth_bytes": rss() - base_rss,
                        "max_history_tokens": log.max_tokens,
                    }
                ),
                flush=True,
            )
    g.stop()


# -- the driver --------------------------------------------------------------------------------------------------
def system_prompt(tokens: int, tokenizer) -> str:
    """About `tokens` tokens of plain prose (a long document an agent was given)."""
    words = ("the agent reads the ledger and checks each entry against the totals before it answers ").split()
    text = " ".join(words[i % len(words)] for i in range(tokens))
    while len(tokenizer.encode(text)) > tokens:
        text = text[: int(len(text) * 0.95)]
    return text


async def agent(client, k: int, system: str, latencies: list[float], errors: list[str]) -> None:
    from rollouts import TOOLS  # the agent tests' tool (imports art: the driver only)

    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Task {k}: add the numbers you are given."},
    ]
    for _ in range(3):
        t0 = time.perf_counter()
        try:
            reply = await client.chat.completions.create(
                model="policy", messages=messages, tools=TOOLS, tool_choice="auto", max_tokens=64, temperature=0.7
            )
        except Exception as e:  # noqa: BLE001 (counted and reported)
            errors.append(f"{type(e).__name__}: {str(e)[:200]} (cause: {e.__cause__!r:.200})")
            return
        latencies.append(time.perf_counter() - t0)
        choice = reply.choices[0]
        messages.append(choice.message.model_dump(exclude_none=True))
        for call in choice.message.tool_calls or []:
            args = json.loads(call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])})


async def drive(url: str, agents: int, system: str) -> dict[str, Any]:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(900.0))
    client = openai.AsyncOpenAI(base_url=url, api_key="none", http_client=http, max_retries=0)
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(agent(client, k, system, latencies, errors) for k in range(agents)))
    finally:
        await http.aclose()
    wall = time.perf_counter() - t0
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "latency_p50_ms": round(pct(0.5) * 1e3, 2),
        "latency_p99_ms": round(pct(0.99) * 1e3, 2),
        "latency_mean_ms": round(statistics.fmean(latencies) * 1e3, 2) if latencies else None,
    }


class Child:
    """A process of this script (`--role ...`), stopped with its process group."""

    def __init__(self, *args: str, stdin: bool = False) -> None:
        cmd = [sys.executable, __file__, *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def ask(self, line: str | None = None) -> dict[str, Any]:
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the {self.proc.args[3:]} process ended (exit {self.proc.poll()})")
        return json.loads(answer)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--histories", default="1024,8192,32768", help="system prompt tokens")
    p.add_argument("--levels", default="64,256,1024,4096", help="agents at once")
    p.add_argument("--service-time", type=float, default=0.05, help="the stub's seconds per request")
    p.add_argument("--warmup", choices=("on", "off"), default="on", help="the gateway's prefix warm-up (default on)")
    p.add_argument("--max-tokens-in-flight", type=float, default=40e6, help="skip (H, N) with H x N above this")
    p.add_argument("--role", choices=("stub", "gateway"), help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "stub":
        serve_stub(Path(args.port_file), args.service_time)
        return
    if args.role == "gateway":
        serve_gateway(args.upstream, args.warmup == "on")
        return

    raise_file_limit()
    started = time.monotonic()
    import rollouts  # noqa: F401 (agent()'s import of art, done before any clock starts)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    report: dict[str, Any] = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "service_time_s": args.service_time,
        "prefix_warmup": args.warmup,
        "runs": [],
    }

    def save() -> None:
        text = json.dumps(report, indent=1)
        if args.out:
            args.out.write_text(text + "\n")

    port_file = Path(f"/tmp/gateway-load-stub-{os.getpid()}")
    stub = Child("--role", "stub", "--port-file", str(port_file), "--service-time", str(args.service_time))
    try:
        for _ in range(100):
            if port_file.exists() and port_file.read_text():
                break
            await asyncio.sleep(0.1)
        upstream = f"http://127.0.0.1:{port_file.read_text()}"
        for history in (int(h) for h in args.histories.split(",")):
            system = system_prompt(history, tokenizer)
            for agents in (int(n) for n in args.levels.split(",")):
                row: dict[str, Any] = {"history_tokens": history, "agents": agents}
                report["runs"].append(row)
                if history * agents > args.max_tokens_in_flight:
                    row["skipped"] = f"{history} x {agents} tokens in flight > --max-tokens-in-flight"
                    save()
                    continue
                await drive(upstream + "/v1", 1, system)  # warm-up, untimed: first connections, lazy imports
                row["direct"] = await drive(upstream + "/v1", agents, system)
                gw = Child("--role", "gateway", "--upstream", upstream, "--warmup", args.warmup, stdin=True)
                try:
                    url = gw.ask()["url"]
                    await drive(url, 1, system)  # warm-up, untimed and not counted: the template's compile
                    gw.ask("reset")
                    row["gateway"] = await drive(url, agents, system)  # base_url ends in /v1
                    stats = gw.ask("stats")
                finally:
                    gw.stop()
                n = max(1, row["gateway"]["requests"])
                stages = stats.pop("stages_s")
                row["later_turns"] = int(stages.pop("later turns", 0))
                row["later_turns_found_in_reply_log"] = int(stages.pop("later turns found in the reply log", 0))
                both = stages.pop("reply log+render+tokenize", 0.0)
                stages["reply log"] = both - stages.get("render", 0.0) - stages.get("tokenize", 0.0)
                stages["forward"] = stats["cpu_s"] - sum(stages.values())
                row["gateway_cpu_ms_per_request"] = round(stats["cpu_s"] / n * 1e3, 3)
                row["stages_ms_per_request"] = {k: round(v / n * 1e3, 3) for k, v in sorted(stages.items())}
                tokens = max(1, stats["remembered_tokens"])
                row["memory"] = {
                    **stats,
                    "reply_log_bytes_per_token": round(stats["reply_log_bytes"] / tokens, 2),
                    "rss_growth_bytes_per_token": round(stats["rss_growth_bytes"] / tokens, 2),
                }
                row["added_latency_p50_ms"] = round(
                    row["gateway"]["latency_p50_ms"] - row["direct"]["latency_p50_ms"], 2
                )
                row["added_latency_p99_ms"] = round(
                    row["gateway"]["latency_p99_ms"] - row["direct"]["latency_p99_ms"], 2
                )
                print(json.dumps(row), flush=True)
                save()
    finally:
        stub.stop()
        port_file.unlink(missing_ok=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    save()


if __name__ == "__main__":
    asyncio.run(main())
