"""ART's adapter leases (openpipe-art 0.5.23) for one model: which policy steps callers hold, counted.

A held step stays served by its own adapter: the weight sync (sync/lora.py) unloads an older step only when no
lease holds it and no request runs on it. Pinning `model.get_inference_name()` to the leased step is ART's own
context variable (`art.adapter_leases`); the counting is ours.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator


class Leases:
    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self.on_release: Callable[[int], None] = lambda step: None  # the weight sync's: it may unload `step` now

    def held(self) -> set[int]:
        return set(self._counts)

    @contextlib.contextmanager
    def hold(self, step: int) -> Iterator[None]:
        self._counts[step] += 1
        try:
            yield
        finally:
            self._counts[step] -= 1
            if self._counts[step] <= 0:
                del self._counts[step]
                self.on_release(step)
