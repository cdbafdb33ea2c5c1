"""`art-sglang`: demo (RL that visibly learns), chat (one request through a managed server), serve (a server for a
backend on another host), doctor, model."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

from .config import DeviceConfig, SGLangConfig, gpu_count, place, precision
from .errors import ArtSGLangError


def _model(args: argparse.Namespace) -> int:
    from .models import small_model

    print(small_model(args.cache))
    return 0


async def _chat(args: argparse.Namespace) -> None:
    import httpx

    from .models import check_model_dir, small_model
    from .paths import model_dir, server_log
    from .server import SGLangServer

    model = check_model_dir(args.model) if args.model else small_model()
    placement = place(DeviceConfig(), gpu_count())
    log_path = server_log(model_dir("quickstart", "chat", args.art_path))
    server = SGLangServer(
        model,
        SGLangConfig(max_total_tokens=16384),
        log_path=log_path,
        device=placement.inference_device,
        enable_lora=False,
        served_model_name="smollm2",
    )
    print(f"[art-sglang] mode: {placement.mode} ({placement.reason})")
    print(f"[art-sglang] starting SGLang {server.sglang_version} on {model} (log: {log_path}) ...")
    started = time.monotonic()
    await server.start()
    try:
        print(f"[art-sglang] server healthy at {server.base_url} after {time.monotonic() - started:.0f} s")
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:
            t0 = time.monotonic()
            r = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": args.prompt}],
                    "max_tokens": args.max_tokens,
                    "temperature": 0.0,
                    "logprobs": True,
                },
            )
            r.raise_for_status()
            body = r.json()
        choice = body["choices"][0]
        n = len(choice["logprobs"]["content"])
        print(f"\nuser: {args.prompt}\nassistant: {choice['message']['content']}\n")
        print(
            f"[art-sglang] {n} tokens with logprobs in {time.monotonic() - t0:.1f} s; "
            f"weight_version={body.get('metadata', {}).get('weight_version')}"
        )
    finally:
        server.stop()


def _serve(args: argparse.Namespace) -> int:
    """Run an SGLang server with the flags and environment a backend attaching it needs, until SIGINT or SIGTERM."""
    import signal

    from .chat import ChatTemplate, resolve_tool_call_parser
    from .config import ALL_LINEAR
    from .models import lora_targets, resolve_base_model
    from .server import SGLangServer
    from .server.process import API_KEY_ENV

    base = resolve_base_model(args.model)
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    parser = resolve_tool_call_parser(
        args.tool_call_parser, ChatTemplate.load(base, args.chat_template).source, base.name
    )
    targets = args.lora_target_modules or lora_targets(base, list(ALL_LINEAR))[0]
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    config = SGLangConfig(
        host=args.host,
        port=args.port,
        api_key=api_key,
        dtype=args.dtype,
        max_lora_rank=args.max_lora_rank,
        max_loras_per_batch=args.max_loras_per_batch,
        lora_target_modules=targets,
        tensor_parallel_size=len(gpus) if gpus else 1,
        max_total_tokens=args.max_total_tokens,
        chat_template=args.chat_template,
        server_timeout=args.timeout,
        server_args=[a for a in args.server_args if a != "--"],
    )
    server = SGLangServer(
        base,
        config,
        log_path=args.log,
        device=gpus,
        enable_lora=True,
        served_model_name=args.name or Path(args.model).name,  # a hub id's name, not its snapshot's hash
        tool_call_parser=parser,
    )
    if args.print:
        env = server.environment()
        env.update({API_KEY_ENV: "<key>"} if api_key else {})
        changed = [f"{k}={v}" for k, v in sorted(env.items()) if os.environ.get(k) != v]
        print(shlex.join([*changed, *server.command()]))
        return 0

    async def run() -> int:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        print(f"[art-sglang] starting SGLang {server.sglang_version} on {base} (log: {args.log}) ...", flush=True)
        await server.start()
        crashed = None
        try:
            where = server.base_url.replace("0.0.0.0", "<this host>")
            print(f"[art-sglang] serving at {server.base_url}: SGLangConfig(servers=[{where!r}])", flush=True)
            while not stopped.is_set() and (crashed := server.crash_reason()) is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), timeout=1.0)
        finally:
            server.stop()
        if crashed is not None:  # a supervisor sees it and may start it again
            print(f"[art-sglang] the server stopped: {crashed}; log: {args.log}", file=sys.stderr, flush=True)
            return 1
        print("[art-sglang] stopped", flush=True)
        return 0

    return asyncio.run(run())


def _doctor(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    from .server.venv import find_server_python

    n = gpu_count()
    placement = place(DeviceConfig(), n)
    print(f"GPUs found: {n}")
    print(f"mode: {placement.mode} ({placement.reason})")
    print(f"weight sync: {SGLangConfig().weight_sync_method}")
    server, trainer = precision(
        "auto", "auto", server_on_gpu=bool(placement.servers), trainer_on_gpu=bool(placement.training_devices)
    )
    print(f"precision (dtype 'auto'): server {server}, trainer {trainer}")
    for pkg in ("openpipe-art", "torch", "transformers", "peft"):
        try:
            print(f"{pkg}: {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"{pkg}: MISSING (run `bash scripts/setup_sglang.sh`)")
    ok = True
    try:
        sp = find_server_python()
        print(f"server python: {sp.path} (sglang {sp.sglang_version})")
    except ArtSGLangError as e:
        ok = False
        print(f"server python: MISSING\n  {e}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="art-sglang", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model", help="materialize SmolLM2-135M-Instruct offline (once) and print its path")
    p.add_argument("--cache", type=Path, default=None, help="cache root (default $ART_SGLANG_CACHE)")
    p.set_defaults(run=_model)
    p = sub.add_parser("chat", help="start a managed SGLang server and answer one chat request")
    p.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--model", type=Path, default=None, help="a local model directory (default: the small model)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--art-path", type=Path, default=Path(".art"))
    p.set_defaults(run=lambda a: asyncio.run(_chat(a)) or 0)
    p = sub.add_parser("demo", help="train SmolLM2-135M-Instruct with RL through SGLangBackend and plot it")
    from . import demo

    demo.add_arguments(p)
    p.set_defaults(run=demo.main)
    p = sub.add_parser(
        "serve", help="run an SGLang server for a backend elsewhere to attach (SGLangConfig(servers=[url]))"
    )
    p.add_argument("--model", required=True, help="the base model: a local directory or a name in the HF cache")
    p.add_argument("--host", default="127.0.0.1", help="bind address; any but loopback needs --api-key")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--api-key",
        default=None,
        help="the key the backend's SGLangConfig(api_key=...) sends; better in $ART_SGLANG_API_KEY, which `ps` "
        "does not show (neither the server's processes nor this one then have it on their command line)",
    )
    p.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1 (a TP-2 server); none: the CPU")
    p.add_argument("--name", default=None, help="the served model name (default: the model directory's)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank it takes")
    p.add_argument("--max-loras-per-batch", type=int, default=4)
    p.add_argument("--lora-target-modules", nargs="+", default=None, help="default: every linear layer, as trained")
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--tool-call-parser", default="auto", help="'auto': from the chat template")
    p.add_argument("--chat-template", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to start")
    p.add_argument("--log", type=Path, default=Path("sglang-serve.log"))
    p.add_argument("--print", action="store_true", help="print the server's command and exit")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: more sglang.launch_server flags")
    p.set_defaults(run=_serve)
    p = sub.add_parser("doctor", help="what was found, what would run, and what to fix")
    p.set_defaults(run=_doctor)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ArtSGLangError as e:
        print(f"art-sglang: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
