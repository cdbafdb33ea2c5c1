"""ART's file layout: `.art/<project>/models/<run_name>/` with checkpoints/, trajectories/, logs/.

openpipe-art 0.5.23 keeps a trainable model's files under its `run_name`; `name` is only what it is served as."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_ART_PATH = ".art"


def model_dir(project: str, name: str, art_path: str | Path = DEFAULT_ART_PATH) -> Path:
    return Path(art_path) / project / "models" / name


def run_key(model: Any) -> tuple[str, str]:
    """What identifies a model's run, as ART's storage does: its project and run name (its name without one)."""
    return model.project, getattr(model, "run_name", None) or model.name


def model_dir_of(model: Any, art_path: str | Path = DEFAULT_ART_PATH) -> Path:
    """Where ART keeps `model`'s files: under its run name (0.5.23), or its name for a model without one."""
    return model_dir(*run_key(model), art_path)


def server_log(model_dir: Path) -> Path:
    return model_dir / "logs" / "sglang.log"


def replica_log(model_dir: Path, i: int) -> Path:
    return model_dir / "logs" / f"sglang-{i}.log"


def checkpoint_dir(model_dir: Path, step: int) -> Path:
    return model_dir / "checkpoints" / f"{step:04d}"


def checkpoint_steps(model_dir: Path) -> list[int]:
    """The steps that have a checkpoint directory, in order."""
    found = (model_dir / "checkpoints").glob("[0-9]*")
    return sorted(int(d.name) for d in found if d.name.isdigit() and d.is_dir())


def train_inputs(model_dir: Path, step: int) -> Path:
    """The trajectory groups of a step, written before it trains."""
    return model_dir / "train_inputs" / f"{step:04d}.jsonl"
