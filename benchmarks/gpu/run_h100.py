"""The GPU path for real (issue 33): SGLangBackend in shared mode on one GPU, through the project's own code.

Phases, each guarded (a failure or a timeout is recorded and the next phase runs), results written to
OUT/results.json after every step, server and trainer log tails to OUT/logs.txt, a table printed last:

- `lora`, `disk`, `restart` (part a): a random model in SmolLM2-135M's shape (its tokenizer, bf16 weights; the
  embedding, tied to the output layer, drawn with std 0.2 so that sampled tokens have a real model's entropy,
  about 2.7 nats, instead of a uniform 10.8), `SGLangBackend` with that sync method and the GPU's defaults (dtype
  left at "auto"; the server's and the trainer's are reported), the server from the carried wheels with
  `--attention-backend triton --sampling-backend pytorch`. register; (lora only) a tool call with tool_choice
  "required" alone and with a regex, a json_schema and a regex request (SGLang's GPU grammar backend); the
  engine/trainer logprob gap of fresh samples (as tests/rollouts.py's served_gap, the trainer scoring inside a
  shared-mode trainer turn) at step 0 and after each of 2 `train()` steps; each step's split (gate wait, release,
  reload, train, offload, resume, sync, total) from result.metrics and timed calls; CUDA graphs: the server's
  flags, its capture lines, and whether decode batches after each release/resume still run on graphs (its
  "cuda graph: True" log lines) with a single-stream decode rate before and after.
- `lora` also: more syncs of tiny steps for the LoRA sync end to end (part b: the step's sync + the time to the
  first token of a request sent right after, as benchmarks/weight_sync.py), and rollout throughput (part
  c: scripts/benchmark_inference.py's GRPO-shaped workload, groups of 8, 64 tokens, at 64 / 256 / 1,024 requests at
  once, straight to SGLang (with the step's adapter) and through the gateway, same server, same run).
- `b15` (part b): the same LoRA sync end to end for a random model in Qwen2.5-1.5B's shape (SmolLM2's vocabulary),
  LoRA r16 on all linear layers; `b7` the same for Qwen2.5-7B's layers (issue 29 item 6: a 7B adapter's sync).

On the GPU machine (after benchmarks/gpu/install.sh): `bash benchmarks/gpu/run_h100.sh a`. On this CPU, a reduced
run of the same code (2-layer models in fp32, the CPU server from .venv-sglang-server, few requests):

    .venv/bin/python benchmarks/gpu/run_h100.py --cpu --out /tmp/gpu-cpu-out
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOK_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
TEMPLATE = ROOT / "tests" / "templates" / "chatml_tools.jinja"  # ChatML with Qwen2.5's tools (qwen25 parser)
CALL = r'<tool_call>\n\{"name":"add","arguments":\{"a":[0-9],"b":[0-9]\}\}\n</tool_call>'
GPU_SERVER_ARGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch"]
# Rough seconds each phase needs on an H100 (server start with CUDA graphs, trainer start and compile, steps);
# a phase is skipped, and said so, when less time than this is left.
MODEL_OF = {"b15": "qwen2.5-1.5b-shape", "b7": "qwen2.5-7b-shape"}
ESTIMATE_S = {"lora": 200, "disk": 90, "restart": 140, "b15": 130, "b7": 200}


def log(msg: str) -> None:
    print(f"[run_h100 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- models -----------------------------------------------------------------------------------------------------
def build_models(args: argparse.Namespace, wanted: set[str]) -> dict[str, Path]:
    """Random models in SmolLM2-135M's, Qwen2.5-1.5B's and Qwen2.5-7B's shapes (those `wanted`), with SmolLM2's
    tokenizer, saved in the run's dtype and kept for a later call: built on the CPU (no CUDA context in this process),
    the 7B one on the GPU by a process of its own."""
    import shutil
    import subprocess

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    dtype = torch.float32 if args.cpu else torch.bfloat16
    root = Path(args.models)
    tok = Path(args.tok)
    out = {}
    smol = AutoConfig.from_pretrained(tok, **({"num_hidden_layers": 2} if args.cpu else {}))
    shape = dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    )
    if args.cpu:
        shape = dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    qwen = Qwen2Config(  # set whole at construction: it derives per-layer settings from the layer count
        vocab_size=smol.vocab_size,
        max_position_embeddings=8192,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=smol.bos_token_id,
        eos_token_id=smol.eos_token_id,
        pad_token_id=smol.pad_token_id,
        # Layers that add little to the residual stream: 28 random layers at the default 0.02 amplify bf16's
        # rounding until engine and trainer differ by 0.11 nats a token (the backend's policy check refused it,
        # 2026-12-07). The adapter's shapes, what this phase measures, are the same.
        initializer_range=0.002,
        **shape,
    )
    # Qwen2.5-7B's layers (issue 29 item 6: a 7B adapter's sync), SmolLM2's vocabulary as the others
    # initializer 0.001: at 0.002 the 7B shape's bf16 rounding put engine and trainer 0.101 nats apart (2026-12-07)
    seven = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
    seven.update(layer_types=None, initializer_range=0.001)
    qwen7 = qwen if args.cpu else Qwen2Config(**{**qwen.to_dict(), **seven})
    specs = (("smollm2-135m-shape", smol, 0.2), ("qwen2.5-1.5b-shape", qwen, 0.12), ("qwen2.5-7b-shape", qwen7, 0.12))
    for name, config, emb_std in specs:
        if name not in wanted:
            continue
        path = root / name
        if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
            out[name] = path
            continue
        if name == "qwen2.5-7b-shape" and not args.cpu and not args.build_here:
            # Drawn on the GPU by a process of its own (the CPU takes minutes for 7B parameters; this process
            # keeps no CUDA context beside the server and the trainer).
            cmd = [sys.executable, __file__, "--build-here", "--phases", "b7", "--models", str(root), "--tok", str(tok)]
            subprocess.run(cmd, check=True)
            out[name] = path
            continue
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device("cuda" if args.build_here else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if not args.cpu:  # (2-layer models with such embeddings only repeat their input: default init there)
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0.0, emb_std)  # tied: the output layer too
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        for f in TOK_FILES:
            if f != "config.json" and (tok / f).exists():
                shutil.copy(tok / f, path / f)
        params = sum(p.numel() for p in model.parameters())
        (path / "params.json").write_text(json.dumps({"params": params, "dtype": str(dtype)}))
        del model
        log(f"built {name}: {params / 1e6:.0f}M parameters, {dtype}, in {time.perf_counter() - t0:.1f} s")
        out[name] = path
    return out


# -- what the tests measure: tests/rollouts.py's helpers --------------------------------------------------------
from rollouts import TOOLS, engine_logprobs, training_sequences  # noqa: E402


async def trainer_logprobs(run, sequences):
    """The trainer's logprobs now; in shared mode inside a trainer turn (requests held, the server's memory
    released, the trainer on the GPU), as a step scores its inputs."""
    if run.timeshare is None:
        return await run.trainer.logprobs(sequences)
    async with run.gateway.closed():
        await run.gateway.wait_idle(600)
        async with run.timeshare.trainer_turn():
            return await run.trainer.logprobs(sequences)


async def served_gap(run, model, questions: int = 8, samples: int = 2, max_tokens: int = 32) -> dict:
    """|engine - trainer| logprob over fresh samples of what the server serves now."""
    import art

    from art_sglang.tasks import ONE_WORD_QUESTIONS, one_word_rollout

    qs = (ONE_WORD_QUESTIONS * 4)[:questions]
    trajectories = await asyncio.gather(
        *(one_word_rollout(model, q, max_tokens=max_tokens) for q in qs for _ in range(samples))
    )
    sequences = training_sequences(run, [art.TrajectoryGroup(list(trajectories))])
    ours = await trainer_logprobs(run, sequences)
    gaps, engine = [], []
    for s, lps in zip(sequences, ours, strict=True):
        for e, t in zip(engine_logprobs(s), lps, strict=True):
            gaps.append(abs(e - t))
            engine.append(e)
    return {
        "mean": statistics.fmean(gaps),
        "max": max(gaps),
        "p99": sorted(gaps)[min(len(gaps) - 1, round(0.99 * (len(gaps) - 1)))],
        "tokens": len(gaps),
        "mean_engine_logprob": statistics.fmean(engine),
        "versions": sorted({str(t.metadata.get("weight_version")) for t in trajectories}),
    }


# -- the server's log -------------------------------------------------------------------------------------------
class ServerLog:
    DECODE = re.compile(r"Decode batch.*?(?:cuda|cpu) graph: (True|False)")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def read(self, start: int = 0) -> str:
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    def graphs(self, start: int = 0) -> dict:
        found = self.DECODE.findall(self.read(start))
        return {"decode_log_lines_on_graph": found.count("True"), "decode_log_lines_off_graph": found.count("False")}

    def summary(self) -> dict:
        lines = self.read().splitlines()
        pick = lambda test, n: [ln[-300:] for ln in lines if test(ln)][:n]  # noqa: E731
        return {
            "capture": pick(
                lambda ln: "apture cuda graph" in ln or "cuda graph" in ln.lower() and "Decode" not in ln, 12
            ),
            "dtype": pick(lambda ln: "dtype=" in ln or "dtype:" in ln, 4),
            "weights_loaded": pick(lambda ln: "Load weight end" in ln, 4),
            "memory": pick(lambda ln: "KV Cache is allocated" in ln or "max_total_num_tokens" in ln, 4),
            "releases": sum("release_memory_occupation" in ln for ln in lines),
            "errors": pick(lambda ln: "Traceback" in ln or " ERROR " in ln or "Error:" in ln, 12),
            "starts": sum(ln.startswith("=== art_sglang: starting") for ln in lines),
            **self.graphs(),
        }


def weight_dtype(log_path: Path, model_dir: Path) -> dict:
    """The server's weight dtype from its log: SGLang logs the memory its weights took ("Load weight end. ... mem
    usage=X GB") but not their dtype; bytes per parameter tell it (2: bf16/fp16, 4: fp32)."""
    try:
        params = json.loads((Path(model_dir) / "params.json").read_text())["params"]
        text = ServerLog(log_path).read()
        gb = float(re.findall(r"Load weight end\..*?mem usage=([0-9.]+) GB", text)[-1])
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    per = gb * 2**30 / params
    dtype = "16-bit" if 1.5 < per < 3 else "float32" if 3 <= per < 5 else "unknown"
    return {"weight_gb": gb, "params": params, "bytes_per_param": per, "dtype": dtype}


def append_log_tail(out_dir: Path, title: str, path: Path, limit: int = 1_500_000) -> None:
    try:
        data = path.read_bytes()[-limit:]
    except OSError as e:
        data = f"(cannot read {path}: {e})".encode()
    with open(out_dir / "logs.txt", "ab") as f:
        f.write(f"\n\n===== {title}: {path} (last {len(data)} bytes) =====\n".encode())
        f.write(data)


# -- requests through the project's client ----------------------------------------------------------------------
PROBES = [0]  # each probe's prompt differs: the gateway refuses a request again once it was blamed for a crash


async def ask(model, prompt: str, **kwargs) -> tuple[Any, str | None, float]:
    """One chat request with a prompt of its own (`prompt` formatted with a new number): (response, None, seconds),
    or (None, the error, seconds) where it failed."""
    PROBES[0] += 1
    messages = [{"role": "user", "content": prompt.format(PROBES[0])}]
    t0 = time.perf_counter()
    try:
        r = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=messages, **kwargs
        )
    except Exception as e:  # noqa: BLE001 (recorded: the run goes on)
        return None, f"{type(e).__name__}: {str(e)[:400]}", time.perf_counter() - t0
    return r, None, time.perf_counter() - t0


async def decode_probe(model, tokens: int) -> dict:
    """One request alone, `tokens` tokens: its decode rate (a lost CUDA graph shows as a slower single stream)."""
    prompt = "Tell me a long story about lighthouse {}."
    r, error, dt = await ask(model, prompt, max_tokens=tokens, temperature=1.0, extra_body={"ignore_eos": True})
    if error is not None:
        return {"error": error}
    n = r.usage.completion_tokens if r.usage else tokens
    return {"tokens": n, "seconds": dt, "tok_s": n / dt}


async def first_token(model) -> dict:
    """A request for one token right after a step: the time until the new policy gave its first token (what
    benchmarks/weight_sync.py takes from a stream). Not streamed: ART's OpenAI client closes a stream as soon as it
    reads [DONE], and the gateway takes its failing write of the stream's end for the server going away (it sends
    the request again and counts a crash: seen on the CPU dry run; see benchmarks/gpu/README.md)."""
    r, error, dt = await ask(model, "Say hi to {}.", max_tokens=1)
    if error is not None:
        return {"error": error, "after_s": dt}
    version = ((r.model_extra or {}).get("metadata") or {}).get("weight_version")
    return {"ttft_s": dt, "weight_version": version}


async def request_checks(model) -> dict:
    """A tool call (tool_choice "required", alone and with a regex), a json_schema and a regex request."""
    client = model.openai_client()
    name = model.get_inference_name()
    messages = [{"role": "user", "content": "What is 2 + 3? Use the tool."}]
    out: dict = {}

    async def one(key: str, **kw) -> None:
        try:
            r = await client.chat.completions.create(model=name, messages=messages, **kw)
            c = r.choices[0]
            calls = [{"name": t.function.name, "arguments": t.function.arguments} for t in c.message.tool_calls or []]
            out[key] = {
                "finish_reason": c.finish_reason,
                "tool_calls": calls,
                "content": (c.message.content or "")[:200],
            }
        except Exception as e:  # noqa: BLE001 (recorded: the run goes on)
            out[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}

    await one("tool_call_required", tools=TOOLS, tool_choice="required", max_tokens=64)
    await one(
        "tool_call_required_regex", tools=TOOLS, tool_choice="required", max_tokens=64, extra_body={"regex": CALL}
    )
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    await one(
        "json_schema",
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    await one("regex", max_tokens=16, extra_body={"regex": "(yes|no), [a-z]{2,8}"})
    with contextlib.suppress(Exception):
        out["json_schema"]["valid_json"] = isinstance(json.loads(out["json_schema"]["content"]).get("answer"), int)
    for key, test in (
        ("tool_call_required", lambda r: bool(r.get("tool_calls")) and r["tool_calls"][0]["name"] == "add"),
        ("tool_call_required_regex", lambda r: bool(r.get("tool_calls")) and r["tool_calls"][0]["name"] == "add"),
        ("json_schema", lambda r: r["content"].lstrip().startswith("{")),  # constrained (valid_json: whole)
        ("regex", lambda r: re.fullmatch("(yes|no), [a-z]{2,8}", r["content"]) is not None),
    ):
        try:
            out[key]["ok"] = bool(test(out[key]))
        except Exception:  # noqa: BLE001
            out[key]["ok"] = False
    return out


async def one_word_groups(model, questions: int, samples: int, max_tokens: int):
    import art

    from art_sglang.tasks import ONE_WORD_QUESTIONS, one_word_rollout

    qs = (ONE_WORD_QUESTIONS * 4)[:questions]
    return await art.gather_trajectory_groups(
        [art.trajectory_group([one_word_rollout(model, q, max_tokens=max_tokens) for _ in range(samples)]) for q in qs],
        pbar_desc=None,
    )


# -- timing shared mode's turn ----------------------------------------------------------------------------------
class Timer:
    """Times the calls a shared-mode step makes around its training (wrapped on the run's own objects)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []

    def wrap(self, obj, attr: str, label: str) -> None:
        original = getattr(obj, attr)

        async def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return await original(*a, **k)
            finally:
                self.events.append((label, time.perf_counter() - t0))

        setattr(obj, attr, timed)

    def take(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, s in self.events:
            out[label] = out.get(label, 0.0) + s
        self.events = []
        return out


def instrument(run) -> Timer:
    timer = Timer()
    if run.timeshare is not None:
        timer.wrap(run.timeshare.client, "release_memory_occupation", "release_s")
        timer.wrap(run.timeshare.client, "resume_memory_occupation", "resume_s")
        timer.wrap(run.timeshare.trainer, "reload", "trainer_reload_s")
        timer.wrap(run.timeshare.trainer, "offload", "trainer_offload_s")
    timer.wrap(run.gateway, "wait_idle", "gate_wait_idle_s")
    return timer


METRIC_KEYS = (
    "time/step_s",
    "time/train_s",
    "time/sync_s",
    "engine_trainer_logprob_gap",
    "engine_trainer_logprob_gap_max",
    "engine_trainer_logprob_gap_over_1e-2",
    "tokens",
    "optimizer_steps",
    "loss",
    "grad_norm",
)


def step_metrics(result) -> dict:
    m = result.metrics
    keep = {k: m[k] for k in METRIC_KEYS if k in m}
    keep.update({k: v for k, v in m.items() if k.startswith("sync/") or k.startswith("data/")})
    return keep


# -- throughput (part c) ----------------------------------------------------------------------------------------
async def throughput(run, model, levels: list[int], tokens: int, timeout: float = 90.0) -> dict:
    """scripts/benchmark_inference.py's workload and runner at each level, straight to SGLang (with the adapter the
    gateway routes to) and through the gateway, one after the other on the same server."""
    import benchmark_inference as bi
    import httpx

    route = run.gateway.route(model.name)
    adapter = route.adapter if route is not None else None

    def client_class(lora: str | None):
        class Client(httpx.AsyncClient):  # no connection cap (httpx's default is 100) and, direct, the adapter
            def __init__(self, *a, **k):
                k["limits"] = httpx.Limits(max_connections=None, max_keepalive_connections=None)
                super().__init__(*a, **k)

            def _add(self, k):
                if lora and isinstance(k.get("json"), dict) and "messages" in k["json"]:
                    k["json"] = {**k["json"], "lora_path": lora}
                return k

            async def post(self, url, **k):
                return await super().post(url, **self._add(k))

            def stream(self, method, url, **k):
                return super().stream(method, url, **self._add(k))

        return Client

    real = bi.httpx
    direct = (run.server.base_url, run.gateway.served_model, adapter)
    gateway = (run.gateway.base_url.removesuffix("/v1"), model.get_inference_name(), None)
    flush = f"{run.server.base_url}/flush_cache"
    out: dict = {"adapter": adapter, "tokens": tokens, "group_size": 8, "levels": {}}
    try:
        for n in levels:
            prompts = bi.workload(max(1, n // 8), 150, 60, seed=n)
            row = out["levels"][str(n)] = {}
            for path, (base, name, lora) in (("direct", direct), ("gateway", gateway)):
                bi.httpx = types.SimpleNamespace(AsyncClient=client_class(lora))
                try:
                    await bi.run_workload(base, name, prompts[:1], 1, 4, None, stream=False)  # warm-up
                    run_ = bi.run_workload(base, name, prompts, 8, tokens, flush, 1, stream=False)
                    r = await asyncio.wait_for(run_, timeout=timeout)
                    row[path] = {
                        k: r[k]
                        for k in (
                            "wall_s",
                            "output_tok_s",
                            "latency_p50_s",
                            "latency_p99_s",
                            "prompt_tokens",
                            "cached_tokens",
                            "hit_ratio",
                        )
                    }
                    row[path]["requests"] = len(prompts) * 8
                    row[path]["requests_per_s"] = len(prompts) * 8 / r["wall_s"]
                except Exception as e:  # noqa: BLE001
                    row[path] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                finally:
                    bi.httpx = real
                log(f"throughput {n} {path}: {row[path]}")
            if "output_tok_s" in row.get("direct", {}) and "output_tok_s" in row.get("gateway", {}):
                row["gateway_over_direct"] = row["gateway"]["output_tok_s"] / row["direct"]["output_tok_s"]
    finally:
        bi.httpx = real
    return out


# What each trainer worker reported when it started (its device and dtype): the backend does not keep it.
TRAINER_STARTS: list[dict] = []


def record_trainer_starts() -> None:
    from art_sglang.trainer import worker

    original = worker.TrainerGroup.start

    async def start(self):
        reply = await original(self)
        TRAINER_STARTS.append(reply)
        return reply

    worker.TrainerGroup.start = start


# -- the phases -------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace, models: dict[str, Path]) -> None:
        self.args = args
        self.models = models
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.results: dict = {
            "date": time.strftime("%F %T"),
            "machine": f"{platform.node()}, {os.cpu_count()} cores",
            "command": " ".join(sys.argv),
            "python": sys.version.split()[0],
            "cpu_dry_run": args.cpu,
            "models": {k: str(v) for k, v in models.items()},
            "phases": {},
        }
        self.versions()

    def versions(self) -> None:
        import importlib.metadata as md

        v = {}
        for dist in ("torch", "transformers", "peft", "openpipe-art", "openai", "aiohttp", "httpx"):
            with contextlib.suppress(Exception):
                v[dist] = md.version(dist)
        with contextlib.suppress(Exception):
            import subprocess

            probe = "import importlib.metadata as m; print(m.version('sglang'), m.version('transformers'))"
            py = self.args.server_python or str(ROOT / ".venv-sglang-server" / "bin" / "python")
            got = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=120).stdout.split()
            v["server: sglang"], v["server: transformers"] = got
        with contextlib.suppress(Exception):
            import subprocess

            gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
            v["gpu"] = gpu or "none"
        self.results["versions"] = v

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.out / "results.json")

    def sglang_config(self, method: str, graph_bs: int | None = None):
        from art_sglang import SGLangConfig

        kw: dict = dict(weight_sync_method=method, server_timeout=600)
        if TEMPLATE.exists():
            kw["chat_template"] = str(TEMPLATE)
        if self.args.cpu:
            kw.update(dtype="float32", max_total_tokens=16384)
        else:
            args = list(GPU_SERVER_ARGS)
            if graph_bs:
                args += ["--cuda-graph-max-bs", str(graph_bs)]
            kw.update(server_python=self.args.server_python, server_args=args)
        return SGLangConfig(**kw)

    async def phase(self, name: str, fn) -> None:
        left = self.deadline - time.monotonic()
        need = ESTIMATE_S[name] if not self.args.cpu else 0
        record = self.results["phases"][name] = {"status": "running"}
        if left < need:
            record["status"] = f"skipped: {left:.0f} s of the budget left, the phase needs about {need} s"
            log(record["status"])
            self.save()
            return
        t0 = time.monotonic()
        log(f"phase {name}: start ({left:.0f} s of the budget left)")
        try:
            await asyncio.wait_for(fn(record), timeout=max(30.0, left - 20))
            record["status"] = "ok"
        except BaseException as e:  # noqa: BLE001 (recorded; the next phase runs)
            record["status"] = f"failed: {type(e).__name__}: {str(e)[:2000]}"
            record["traceback"] = traceback.format_exc()[-6000:]
            log(f"phase {name} failed: {type(e).__name__}: {str(e)[:500]}")
            if isinstance(e, KeyboardInterrupt):
                raise
        record["seconds"] = time.monotonic() - t0
        self.save()

    async def backend_run(self, record: dict, name: str, base: Path, method: str, graph_bs: int | None, body) -> None:
        """Start an SGLangBackend for `base`, hand its run to `body`, and keep what its logs say."""
        import art

        from art_sglang import SGLangBackend, TrainerConfig

        model = art.TrainableModel(name=name, project="gpu", run_name=name, base_model=str(base))
        backend = SGLangBackend(
            path=self.work / name,
            sglang_config=self.sglang_config(method, graph_bs),
            trainer_config=TrainerConfig(lora_rank=16, lora_alpha=32),
        )
        run = None
        try:
            async with backend:
                record["placement"] = {"mode": backend.placement.mode, "reason": backend.placement.reason}
                t0 = time.perf_counter()
                await model.register(backend)  # starts the server, the gateway and the trainer
                record["start_s"] = time.perf_counter() - t0
                run = backend.model_run(model)
                info = await run.client.server_info()
                keys = (
                    "dtype",
                    "disable_cuda_graph",
                    "cuda_graph_max_bs",
                    "attention_backend",
                    "sampling_backend",
                    "grammar_backend",
                    "lora_backend",
                    "enable_memory_saver",
                    "mem_fraction_static",
                    "max_running_requests",
                    "max_total_num_tokens",
                    "max_loras_per_batch",
                    "device",
                    "version",
                )
                record["server_info"] = {k: info.get(k) for k in keys if k in info}
                record["server_info"]["internal_states"] = str(info.get("internal_states"))[:600]
                s = run.trainer.settings
                record["trainer"] = {
                    "dtype_setting": s.dtype,
                    "dtype_resolved": s.dtype if s.dtype != "auto" else ("float32" if self.args.cpu else "bfloat16"),
                    "adapter_dtype": s.adapter_dtype,
                    "compile": s.compile,
                    "lora_rank": s.lora_rank,
                    "gradient_checkpointing": s.gradient_checkpointing,
                    "worker_reported": TRAINER_STARTS[-1] if TRAINER_STARTS else None,
                }
                record["server_dtype_from_weight_memory"] = weight_dtype(run.server.log_path, base)
                record["sync_method"] = run.sync.method
                record["shared_mode_release"] = None if run.timeshare is None else run.timeshare.use_release
                slog = ServerLog(run.server.log_path)
                mode = backend.placement.mode
                log(f"{name}: ready in {record['start_s']:.1f} s ({mode} mode, sync {run.sync.method})")
                try:
                    await body(record, model, backend, run, slog)
                finally:
                    record["server_log"] = slog.summary()
                    self.save()
        finally:
            if run is not None:
                append_log_tail(self.out, f"{name} server", run.server.log_path)
                append_log_tail(self.out, f"{name} trainer", run.trainer.log_path(0), limit=300_000)

    async def steps(
        self, record, model, backend, run, slog, *, count, questions, samples, max_tokens, gap_each
    ) -> None:
        timer = run.__dict__.get("_bench_timer")
        if timer is None:  # once per run: its objects' calls are wrapped
            timer = run.__dict__["_bench_timer"] = instrument(run)
        record.setdefault("steps", [])
        for _ in range(count):
            groups = await one_word_groups(model, questions, samples, max_tokens)
            rewards = [t.reward for g in groups for t in g.trajectories]
            timer.take()
            t0 = time.perf_counter()
            result = await backend.train(model, groups, learning_rate=self.args.lr)
            wall = time.perf_counter() - t0
            mark = slog.mark()
            step = {"step": result.step, "wall_s": wall, "rewards_mean": statistics.fmean(rewards)}
            step["split"] = timer.take()
            step["metrics"] = step_metrics(result)
            ft = await first_token(model)
            step["first_token"] = ft
            sync = result.metrics.get("time/sync_s")
            if sync is not None and "ttft_s" in ft:
                step["sync_plus_first_token_s"] = sync + ft["ttft_s"]
            if gap_each:
                step["gap"] = await served_gap(run, model)
                step["probe"] = await decode_probe(model, self.args.probe_tokens)
                step["graphs_after_resume"] = slog.graphs(mark)
            record["steps"].append(step)
            log(
                f"{model.name} step {result.step}: train {step['metrics'].get('time/train_s', float('nan')):.2f} s, "
                f"sync {fmt(sync)} s, first token {fmt(ft.get('ttft_s'))} s"
                + (f", gap {step['gap']['mean']:.2e}/{step['gap']['max']:.2e}" if gap_each else "")
                + f", split { ({k: round(v, 3) for k, v in step['split'].items()}) }"
            )
            self.save()

    # part a, with b (demo model) and c inside the lora phase
    def sync_phase(self, method: str):
        async def body(record, model, backend, run, slog):
            a = self.args
            await decode_probe(model, 16)  # warm-up: the first requests may compile kernels
            mark = slog.mark()
            record["probe_before"] = await decode_probe(model, a.probe_tokens)
            record["graphs_before"] = slog.graphs(mark)
            if method == "lora":
                record["requests"] = await request_checks(model)
                log(f"requests: {json.dumps({k: v.get('ok') for k, v in record['requests'].items()})}")
                self.save()
            record["gap_step0"] = await served_gap(run, model)
            log(f"{method}: step 0 gap mean {record['gap_step0']['mean']:.2e} max {record['gap_step0']['max']:.2e}")
            self.save()
            await self.steps(
                record,
                model,
                backend,
                run,
                slog,
                count=a.steps,
                questions=a.questions,
                samples=a.samples,
                max_tokens=12,
                gap_each=True,
            )
            if method == "lora" and a.extra_syncs:
                b = record["sync_e2e"] = {}
                await self.steps(
                    b,
                    model,
                    backend,
                    run,
                    slog,
                    count=a.extra_syncs,
                    questions=1,
                    samples=4,
                    max_tokens=8,
                    gap_each=False,
                )
            if method == "lora" and a.levels:
                record["throughput"] = await throughput(run, model, a.levels, a.throughput_tokens)

        async def fn(record):
            bs = None if method == "lora" else self.args.small_graph_bs
            await self.backend_run(record, f"gpu-{method}", self.models["smollm2-135m-shape"], method, bs, body)

        return fn

    def lora_e2e_phase(self, name: str):
        """`b15` or `b7`: the LoRA sync end to end for a bigger shape."""

        async def body(record, model, backend, run, slog):
            await self.steps(
                record,
                model,
                backend,
                run,
                slog,
                count=self.args.b15_syncs,
                questions=1,
                samples=4,
                max_tokens=8,
                gap_each=False,
            )
            record["gap_end"] = await served_gap(run, model)

        async def fn(record):
            base = self.models[MODEL_OF[name]]
            await self.backend_run(record, f"gpu-{name}", base, "lora", self.args.small_graph_bs, body)

        return fn


# -- the table --------------------------------------------------------------------------------------------------
def fmt(v, f: str = "{:.3f}") -> str:
    return "-" if v is None else f.format(v)


def sync_rows(r: dict) -> list[str]:
    rows = []
    info = r.get("server_info", {})
    if info:
        logged = r.get("server_dtype_from_weight_memory", {})
        logged = f"{logged.get('dtype')}, {fmt(logged.get('bytes_per_param'), '{:.2f}')} bytes/parameter"
        graphs = "off" if info.get("disable_cuda_graph") else "on"
        rows.append(
            f"   server --dtype {info.get('dtype')} (weights: {logged}), cuda graphs {graphs} (max bs "
            f"{info.get('cuda_graph_max_bs')}), grammar {info.get('grammar_backend')}; "
            f"trainer {(r.get('trainer', {}).get('worker_reported') or {}).get('dtype')}"
        )
    if "gap_step0" in r:
        g = r["gap_step0"]
        rows.append(
            f"   step 0 gap mean {g['mean']:.2e} max {g['max']:.2e} ({g['tokens']} tokens, mean engine logprob "
            f"{g['mean_engine_logprob']:.2f})"
        )
    for s in r.get("steps", []):
        m, sp, g = s.get("metrics", {}), s.get("split", {}), s.get("gap", {})
        gr = s.get("graphs_after_resume", {})
        rows.append(
            f"   step {s['step']}: {fmt(m.get('time/step_s'), '{:.2f}')} s = release {fmt(sp.get('release_s'))} "
            f"reload {fmt(sp.get('trainer_reload_s'))} train {fmt(m.get('time/train_s'), '{:.2f}')} "
            f"offload {fmt(sp.get('trainer_offload_s'))} resume {fmt(sp.get('resume_s'))} "
            f"sync {fmt(m.get('time/sync_s'))}"
        )
        if g or gr:
            rows.append(
                f"      gap {fmt(g.get('mean'), '{:.2e}')} / max {fmt(g.get('max'), '{:.2e}')}; decode "
                f"{fmt(s.get('probe', {}).get('tok_s'), '{:.0f}')} tok/s; decode log lines after the resume: "
                f"{gr.get('decode_log_lines_on_graph')} on a CUDA graph, {gr.get('decode_log_lines_off_graph')} off"
            )
    if "requests" in r:
        rows.append(
            "   requests: " + ", ".join(f"{k} {'ok' if v.get('ok') else 'NO'}" for k, v in r["requests"].items())
        )
    steps = r.get("steps", []) + r.get("sync_e2e", {}).get("steps", [])
    e2e = [s["sync_plus_first_token_s"] for s in steps if "sync_plus_first_token_s" in s]
    if e2e:
        rows.append(f"   sync + first token: p50 {statistics.median(e2e):.3f} s over {len(e2e)} syncs")
    for n, row in (r.get("throughput") or {}).get("levels", {}).items():
        d, g = row.get("direct", {}), row.get("gateway", {})
        rows.append(
            f"   {n:>5} at once: direct {fmt(d.get('output_tok_s'), '{:.0f}')} tok/s, gateway "
            f"{fmt(g.get('output_tok_s'), '{:.0f}')} tok/s, gateway/direct "
            f"{fmt(row.get('gateway_over_direct'), '{:.2f}')}, cache hit {fmt(d.get('hit_ratio'), '{:.0%}')} / "
            f"{fmt(g.get('hit_ratio'), '{:.0%}')}"
        )
        for path in ("direct", "gateway"):
            if "error" in row.get(path, {}):
                rows.append(f"      {path}: {row[path]['error']}")
    return rows


def table(results: dict) -> str:
    rows = []
    p = results["phases"]
    for method in ("lora", "disk", "restart"):
        if (r := p.get(method)) is not None:
            rows.append(f"== {method}: {r.get('status')} (start {fmt(r.get('start_s'), '{:.0f}')} s)")
            rows += sync_rows(r)
    for name in MODEL_OF:
        if (r := p.get(name)) is None:
            continue
        rows.append(f"== {name} ({MODEL_OF[name]}, lora r16): {r.get('status')}")
        for s in r.get("steps", []):
            m = s.get("metrics", {})
            rows.append(
                f"   step {s['step']}: sync {fmt(m.get('time/sync_s'))} s (adapter export "
                f"{fmt(m.get('sync/adapter_export_seconds'))}, load {fmt(m.get('sync/adapter_load_seconds'))}, "
                f"{fmt(m.get('sync/adapter_bytes', 0) / 1e6, '{:.1f}')} MB) + first token "
                f"{fmt(s.get('first_token', {}).get('ttft_s'))} s"
            )
        if "gap_end" in r:
            rows.append(f"   gap mean {r['gap_end']['mean']:.2e} max {r['gap_end']['max']:.2e}")
    return "\n".join(rows)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu/out"))
    p.add_argument("--cpu", action="store_true", help="the reduced run on a machine without a GPU")
    p.add_argument("--phases", default="lora,disk,restart,b15")
    p.add_argument("--budget", type=float, default=None, help="seconds for all phases (default 570; --cpu 7200)")
    p.add_argument("--tok", default=None, help="SmolLM2's tokenizer and config (default /tmp/gpu/tok; --cpu the cache)")
    p.add_argument("--models", default=None, help="where the random models are written")
    p.add_argument("--work", default=None, help="the backends' .art directory")
    p.add_argument("--server-python", default="/tmp/sg/python")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--extra-syncs", type=int, default=4, help="more lora steps for the sync end to end (part b)")
    p.add_argument("--b15-syncs", type=int, default=3, help="steps of the b15 and b7 phases")
    p.add_argument("--levels", default="64,256,1024", help="requests at once for part c ('' skips it)")
    p.add_argument("--throughput-tokens", type=int, default=64)
    p.add_argument("--probe-tokens", type=int, default=128)
    p.add_argument("--build-here", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--small-graph-bs", type=int, default=32, help="--cuda-graph-max-bs of disk/restart/b15/b7 servers")
    args = p.parse_args()
    if args.cpu:
        args.budget = args.budget or 7200
        args.tok = args.tok or str(Path.home() / ".cache" / "art-sglang" / "models" / "SmolLM2-135M-Instruct")
        args.models = args.models or "/tmp/gpu-cpu/models"
        args.work = args.work or f"/tmp/gpu-cpu/work/{time.strftime('%H%M%S')}"
        args.server_python = None
        args.extra_syncs = min(args.extra_syncs, 2)
        args.b15_syncs = min(args.b15_syncs, 2)
        args.levels = "8,16" if args.levels == "64,256,1024" else args.levels
        args.throughput_tokens = min(args.throughput_tokens, 8)
        args.probe_tokens = min(args.probe_tokens, 16)
        args.questions, args.samples = min(args.questions, 2), min(args.samples, 3)
    args.budget = args.budget or 570
    args.tok = args.tok or "/tmp/gpu/tok"
    args.models = args.models or "/tmp/gpu/models"
    args.work = args.work or f"/tmp/gpu/work/{time.strftime('%H%M%S')}"  # a fresh .art per call
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):  # 1,024 requests at once hold ~3 sockets each in this process (gateway)
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    phases = args.phases.split(",")
    wanted = {MODEL_OF.get(name, "smollm2-135m-shape") for name in phases}
    models = build_models(args, wanted)
    if args.build_here:
        return
    record_trainer_starts()
    run = Run(args, models)
    run.save()
    log(f"versions: {run.results['versions']}")
    for name in phases:
        if name in ("lora", "disk", "restart"):
            await run.phase(name, run.sync_phase(name))
        elif name in MODEL_OF:
            await run.phase(name, run.lora_e2e_phase(name))
        else:
            raise SystemExit(f"unknown phase {name!r}")
    run.results["seconds"] = time.monotonic() - run.started
    run.save()
    print("\n" + table(run.results), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
