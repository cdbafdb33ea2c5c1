"""Finding the server's Python: the isolated venv that has SGLang (and no ART)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import ENV_SERVER_PYTHON
from ..errors import ServerNotInstalledError

SERVER_VENV = ".venv-sglang-server"
SETUP_COMMAND = "bash scripts/setup_sglang.sh"
# The checkout this package was installed from (src layout: <root>/src/art_sglang/server/venv.py).
_CHECKOUT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class ServerPython:
    path: Path
    sglang_version: str


def _candidates(explicit: str | None) -> list[tuple[Path, str]]:
    if explicit:
        return [(Path(explicit), "SGLangConfig.server_python")]
    if os.environ.get(ENV_SERVER_PYTHON):
        return [(Path(os.environ[ENV_SERVER_PYTHON]), f"${ENV_SERVER_PYTHON}")]
    found = []
    for base in (Path.cwd(), *Path.cwd().parents, _CHECKOUT):
        found.append((base / SERVER_VENV / "bin" / "python", f"{SERVER_VENV} in {base}"))
    return found


def _sglang_version(python: Path) -> str | None:
    """The version of SGLang installed for `python`, without importing SGLang (which takes seconds)."""
    probe = "import importlib.metadata as m; print(m.version('sglang'))"
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def find_server_python(explicit: str | None = None) -> ServerPython:
    """The Python that runs the SGLang server, or an error naming the command that creates it."""
    tried = []
    for path, source in _candidates(explicit):
        if not path.exists():
            tried.append(f"{path} ({source}): not found")
            continue
        version = _sglang_version(path)
        if version is None:
            tried.append(f"{path} ({source}): has no sglang")
            continue
        return ServerPython(path, version)
    raise ServerNotInstalledError(
        "No Python with SGLang was found for the inference server. Tried:\n  "
        + "\n  ".join(dict.fromkeys(tried))
        + f"\nCreate it with `{SETUP_COMMAND}` in the art-sglang checkout ({_CHECKOUT}), or point "
        f"SGLangConfig(server_python=...) or ${ENV_SERVER_PYTHON} at a Python that has sglang installed."
    )
