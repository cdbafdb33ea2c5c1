"""Makes pinned-memory requests no-ops in every Python process of a CPU SGLang server.

Pinned memory needs a CUDA driver; SGLang's LoRA layers and backends ask for it even on the CPU, which kills
the server. SGLang spawns its scheduler and detokenizer as fresh interpreters, so this module is put on the
server's PYTHONPATH by art_sglang's launcher: Python imports `sitecustomize` at start-up in each of them.
It runs in the server venv (no art_sglang there) and never edits SGLang's files.
"""

import os

if os.environ.get("ART_SGLANG_NO_PIN_MEMORY") == "1":
    import functools

    import torch

    def _unpinned(factory):
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            return factory(*args, **kwargs)

        return wrapper

    for _name in (
        "empty",
        "zeros",
        "ones",
        "full",
        "tensor",
        "empty_like",
        "zeros_like",
        "ones_like",
        "full_like",
        "arange",
        "rand",
        "randn",
        "randint",
        "empty_strided",
    ):
        if hasattr(torch, _name):
            setattr(torch, _name, _unpinned(getattr(torch, _name)))

    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
