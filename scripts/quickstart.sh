#!/usr/bin/env bash
# The README's first command: set up both venvs and the small model, then train SmolLM2-135M-Instruct with RL
# through a managed SGLang server until it visibly learns (art-sglang demo; flags pass through).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup_sglang.sh
exec .venv/bin/art-sglang demo "$@"
