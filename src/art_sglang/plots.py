"""ART's plot_tensors: a picture of one step's training rows, for debugging what the trainer is given."""

from __future__ import annotations

import time
from pathlib import Path

from .trainer.sequence import Sequence


def plot_rows(rows: list[Sequence], directory: Path) -> Path:
    """Heat maps of the rows (in training order) as ART draws its packed tensors: token ids, sampler logprobs,
    trained-token mask, advantages and weights, one row per sequence; saved as packed_tensors_plot_<time>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(len(r) for r in rows)

    def grid(values: list[list[float]]) -> np.ndarray:
        out = np.full((len(rows), width), np.nan)
        for i, v in enumerate(values):
            out[i, : len(v)] = v
        return out

    panels = {
        "Token IDs": grid([r.token_ids for r in rows]),
        "Token Log Probs": grid([r.logprobs for r in rows]),  # nan where not sampled: left blank
        "Trained tokens (mask)": grid([[float(m) for m in r.mask] for r in rows]),
        "Token Advantages": grid([[r.advantage * m for m in r.mask] for r in rows]),
        "Token Weights": grid([[r.weight * m for m in r.mask] for r in rows]),
    }
    fig, axes = plt.subplots(len(panels), 1, figsize=(15, 3 + 2 * len(panels)), squeeze=False)
    for ax, (title, values) in zip(axes[:, 0], panels.items(), strict=True):
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set(title=title, xlabel="Sequence Position", ylabel="Row")
    fig.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"packed_tensors_plot_{int(time.time())}.png"
    fig.savefig(path)
    plt.close(fig)
    return path
