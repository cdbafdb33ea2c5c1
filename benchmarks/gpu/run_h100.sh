#!/usr/bin/env bash
# On the GPU machine, after benchmarks/gpu/install.sh has installed the chunks it needs. From the checkout's root:
#
#   bash benchmarks/gpu/run_h100.sh d [long_episode.py flags]   # part d: the trainer alone (needs chunk c1 only)
#   bash benchmarks/gpu/run_h100.sh a [run_h100.py flags]       # parts a, b, c: SGLangBackend (needs every chunk)
#
# Writes to $OUT: run.log (everything printed), long_episode.json (d), results.json and logs.txt (a).
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ulimit -n 65536 2>/dev/null || true  # 1,024 requests at once through the gateway hold thousands of sockets
out=${OUT:-/tmp/gpu/out}
mkdir -p "$out"
if [ -f /tmp/art/env.sh ]; then . /tmp/art/env.sh; else echo "run_h100.sh: /tmp/art/env.sh missing: install chunk c1 first" >&2; fi
what=${1:-a}
shift || true
case $what in
  d)
    python3 benchmarks/gpu/long_episode.py --out "$out/long_episode.json" "$@" 2>&1 | tee -a "$out/run.log"
    ;;
  a)
    missing=$(for c in c1 c2 c3; do [ -e /tmp/sg/.done-$c ] || echo -n "$c "; done)
    if [ -n "$missing" ]; then  # a fresh machine: /tmp went with the last one
      echo "run_h100.sh: chunks not installed on this machine: $missing- install them (benchmarks/gpu/install.sh) first" \
        | tee -a "$out/run.log"
      exit 3
    fi
    {
      echo "== preflight $(date +%T)"
      nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
      timeout 120 /tmp/sg/python -c "import sglang, sgl_kernel, xgrammar, torch_memory_saver, flashinfer, torch; \
print('server side: sglang', sglang.__version__, 'torch', torch.__version__)" 2>&1 | tail -4
      timeout 120 python3 -c "import sys; sys.path.insert(0, 'src'); import art, torch, transformers, peft, openai; \
from art_sglang import SGLangBackend; print('trainer side: art', art.__version__ if hasattr(art, '__version__') else '?', \
'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'openai', openai.__version__)" 2>&1 | tail -4
      python3 benchmarks/gpu/run_h100.py --out "$out" "$@"
    } 2>&1 | tee -a "$out/run.log"
    ;;
  *)
    echo "usage: run_h100.sh d|a [flags]" >&2
    exit 2
    ;;
esac
