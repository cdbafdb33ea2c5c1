#!/usr/bin/env bash
# The README's test command: set up what is missing (idempotent), lint, then the whole suite against real servers,
# on two workers, a file each (tests/conftest.py). Arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"    the fast tier: no server but one smoke test (docs/testing.md)
#   bash scripts/test.sh -n 0 tests/test_step.py    one file, in this process
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup_sglang.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
