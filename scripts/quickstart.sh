#!/usr/bin/env bash
# The README's first command: set up both venvs and the small model, then answer a chat request through a
# managed SGLang server.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup_sglang.sh
exec .venv/bin/art-sglang chat "$@"
