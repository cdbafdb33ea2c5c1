#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, in chunks that each travel with one device call (64 MiB a call).
#
#   bash benchmarks/gpu/bundle.sh [OUTDIR]      # from the checkout's root; OUTDIR defaults to .gpu-bundle
#
# The image there has Python 3.12, torch 2.11.0+cu130, transformers 5.17, numpy, aiohttp, httpx, tqdm, ... and no
# network (its package list: the device tool's KINDS.md). Two sets are fetched from the package index:
#   sg   the SGLang 0.5.15.post1 server, as ../shared/tools/gpu-sglang/bundle.sh (seen serving on an H100): its
#        wheels without torch, numpy, triton or CUDA libraries, and sglang-kernel stripped of FA3, FlashMLA and
#        sm100 (615 MB -> ~16 MB; serve with --attention-backend triton --sampling-backend pytorch). Left out:
#        llguidance (15 MB; SGLang imports it only for --grammar-backend llguidance: a GPU serves with xgrammar).
#        anthropic is 0.125.0, the last release on httpx (2.x needs httpx2 and opentelemetry; the server never
#        imports it).
#   art  what the user's process needs beside the image to `import art` and run SGLangBackend, found with
#        `python -X importtime` (benchmarks/gpu/README.md): openpipe-art 0.5.23 (--no-deps), openai 2.30.0 (the
#        trainer venv's; the server keeps the 2.6.1 it pins), anthropic, pydantic, jiter, distro, docstring-parser,
#        sniffio, python-dotenv and peft 0.21.2 (the trainer workers' too). openpipe-art without
#        art/_megatron_runtime (archives only its Megatron backend unpacks). polars, which `import art` imports
#        (art/model.py) and uses only to pick a best checkpoint by metric, is a stub that raises on use: its runtime
#        wheel alone would be another chunk. weave (wandb's tracing, dozens of dependencies), which art's OpenAI client
#        imports on each request only to turn tracing off (art/model.py), is a stub of that one function too.
# Wheels both sets need travel once. Chunk c1 holds all of `art`, the SmolLM2 tokenizer/config (tok.tar.gz) and
# the polars stub, then server wheels up to 60 MB; c2.. the rest of the server's. Each chunk has manifest.txt
# ("sg|art|both WHEEL"), read by benchmarks/gpu/install.sh. OUTDIR must be ignored by git: add it to
# .git/info/exclude (this script does, for the default).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-.gpu-bundle}
case $out in /*) ;; *) out=$root/$out ;; esac
tok_src=${TOK_SRC:-$HOME/.cache/art-sglang/models/SmolLM2-135M-Instruct}
limit=${CHUNK_BYTES:-60000000}
if [ "$out" = "$root/.gpu-bundle" ] && ! grep -qx '/.gpu-bundle/' "$root/.git/info/exclude" 2>/dev/null; then
  mkdir -p "$root/.git/info" && echo '/.gpu-bundle/' >>"$root/.git/info/exclude"
fi
rm -rf "$out"; mkdir -p "$out/dl/sg" "$out/dl/art" "$out/dl/both"
dl() {  # dl DIR SPEC...: wheels for CPython 3.12 on x86-64 Linux, no dependencies
  local d=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_31_x86_64 \
    -d "$out/dl/$d" "$@" 2>&1 | grep -v -e "is ignored" -e "^$" || true
}
# both: the trainer side's needs that the server's list has too (pinned to the trainer venv's versions)
dl both anthropic==0.125.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  jiter==0.19.0 distro==1.9.0 docstring-parser==0.18.0 sniffio==1.3.1 peft==0.21.2
dl art openpipe-art==0.5.23 openai==2.30.0 python-dotenv==1.2.4
dl sg sglang==0.5.15.post1 sglang-kernel==0.4.4 flashinfer-python==0.6.12 transformers==5.12.1 tokenizers==0.22.2 \
  xgrammar==0.2.1 apache-tvm-ffi==0.1.11 openai==2.6.1 openai-harmony==0.0.4 \
  orjson uvloop pyzmq fastapi starlette uvicorn msgspec partial-json-parser setproctitle interegular python-multipart \
  pybase64 blobfile==3.0.0 einops gguf compressed-tensors prometheus-client watchfiles zstandard easydict \
  torch-memory-saver cuda-python cuda-bindings cuda-pathfinder nvidia-ml-py soundfile \
  pycryptodomex lxml xxhash dill annotated-doc h11 httptools websockets loguru anyio \
  ninja ipython traitlets jedi parso prompt_toolkit pygments matplotlib-inline stack_data executing asttokens \
  pure_eval decorator pexpect ptyprocess wcwidth ipython_pygments_lexers regex httpx==0.28.1 httpcore certifi idna \
  cffi pycparser opentelemetry-api importlib-metadata zipp jsonschema jsonschema-specifications referencing \
  rpds-py attrs aiohttp multidict yarl frozenlist aiosignal propcache aiohappyeyeballs rich typer click shellingham \
  markdown-it-py mdurl psutil requests urllib3 charset-normalizer
# one wheel per project and set: a wheel in `both` leaves `sg` (the server's list may have fetched it unpinned)
norm() { basename "$1" | cut -d- -f1 | tr 'A-Z.-' 'a-z__'; }
for w in "$out"/dl/both/*.whl; do
  for s in "$out"/dl/sg/*.whl; do [ "$(norm "$s")" = "$(norm "$w")" ] && rm -f "$s"; done
done
for d in sg art both; do
  dup=$(for w in "$out"/dl/$d/*.whl; do norm "$w"; done | sort | uniq -d)
  [ -z "$dup" ] || { echo "two versions of: $dup in $d" >&2; exit 1; }
done
strip() {  # strip WHEEL PATH...: the wheel rewritten without PATHs (files or directories), its RECORD to match
  local w=$1; shift; local x=$out/x; rm -rf "$x"; mkdir -p "$x"
  (cd "$x" && python3 -m zipfile -e "$w" . && for p in "$@"; do rm -rf "./$p"; done)
  rm -f "$w"; (cd "$x" && python3 - "$w" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for root, _, files in os.walk("."):
        for f in files:
            p = os.path.join(root, f)[2:]
            if p.endswith(".dist-info/RECORD"):  # keep the entries of the files that stay
                kept = [l for l in open(p).read().splitlines() if os.path.exists(l.split(",")[0])]
                z.writestr(p, "\n".join(kept) + "\n")
                continue
            z.write(p, p)
PY
  ); rm -rf "$x"
}
# sglang-kernel without what an H100 serving with triton attention never loads (FA3, FlashMLA, sm100)
strip "$(ls "$out"/dl/sg/sglang_kernel-*.whl)" sgl_kernel/flash_ops.abi3.so sgl_kernel/flashmla_ops.abi3.so sgl_kernel/sm100
# openpipe-art without the Megatron runtime's archives (9.5 MB), which only ART's Megatron backend unpacks
strip "$(ls "$out"/dl/art/openpipe_art-*.whl)" art/_megatron_runtime
# c1: the trainer side, the tokenizer and the polars stub
mkdir -p "$out/c1/stubs/polars"
cat >"$out/c1/stubs/polars/__init__.py" <<'PY'
"""Stand-in for polars on the GPU machine (benchmarks/gpu/bundle.sh): openpipe-art 0.5.23 imports polars in
art/model.py and uses it only to pick a best checkpoint by metric (TrainableModel.delete_checkpoints)."""


def __getattr__(name):
    raise ImportError(f"polars.{name}: polars is a stub on this machine (benchmarks/gpu/bundle.sh)")
PY
mkdir -p "$out/c1/stubs/weave/trace"
cat >"$out/c1/stubs/weave/__init__.py" <<'PY'
"""Stand-in for weave on the GPU machine (benchmarks/gpu/bundle.sh): openpipe-art 0.5.23's OpenAI client wraps each
request in `weave.trace.settings.override_settings(disabled=True)`, which turns weave's tracing off; nothing else
of weave is used by SGLangBackend's runs."""
PY
: >"$out/c1/stubs/weave/trace/__init__.py"
cat >"$out/c1/stubs/weave/trace/settings.py" <<'PY'
import contextlib


@contextlib.contextmanager
def override_settings(**settings):
    """Tracing is off here (there is no weave): nothing to override."""
    yield
PY
files=(config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json)
tar -C "$tok_src" -czf "$out/c1/tok.tar.gz" "${files[@]}"
: >"$out/c1/manifest.txt"
for d in art both; do
  for w in "$out"/dl/$d/*.whl; do mv "$w" "$out/c1/"; echo "$d $(basename "$w")" >>"$out/c1/manifest.txt"; done
done
used() { du -sb "$1" | cut -f1; }
# the server's wheels, largest first, each into the first chunk it fits (c1 first)
n=1
for w in $(ls -S "$out"/dl/sg/*.whl); do
  s=$(stat -c %s "$w"); placed=
  for i in $(seq 1 $n); do
    if [ $(($(used "$out/c$i") + s)) -le "$limit" ]; then placed=$i; break; fi
  done
  if [ -z "$placed" ]; then n=$((n + 1)); placed=$n; mkdir -p "$out/c$n"; : >"$out/c$n/manifest.txt"; fi
  mv "$w" "$out/c$placed/"; echo "sg $(basename "$w")" >>"$out/c$placed/manifest.txt"
done
rm -rf "$out/dl"
for i in $(seq 1 $n); do
  echo "c$i: $(used "$out/c$i") bytes, $(grep -c . "$out/c$i/manifest.txt") wheels"
done
echo "total: $(used "$out") bytes in $n chunks under $out"
