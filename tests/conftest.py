"""Shared fixtures. Servers are real SGLang servers on 127.0.0.1 serving SmolLM2-135M-Instruct."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: skip litellm's fetch

import pytest  # noqa: E402
import torch  # noqa: E402

from art_sglang import SGLangClient, SGLangConfig, SGLangServer  # noqa: E402
from art_sglang.models import small_model  # noqa: E402

# The server and the tests share two cores: keep each to one thread.
torch.set_num_threads(1)


def _undo_arts_transformers_patch() -> None:
    """`import art` replaces a transformers masking helper with one written for the transformers ART pins; on
    ours it breaks every forward pass. Our trainer workers never import art; tests that run models in-process
    next to art put the original back."""
    import art.transformers.patches as patches
    from transformers import masking_utils

    masking_utils._preprocess_mask_arguments = patches._preprocess_mask_arguments


_undo_arts_transformers_patch()


def server_config(**overrides) -> SGLangConfig:
    """A small CPU server: fp32 so that its logprobs match PEFT's, a small KV pool."""
    values = dict(dtype="float32", max_total_tokens=8192, max_lora_rank=16, max_loras_per_batch=2, server_timeout=240.0)
    values.update(overrides)
    return SGLangConfig(**values)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return small_model(quiet=True)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
async def lora_server(model_path, log_dir):
    """One LoRA-enabled server shared by the tests that only talk to it (start-up costs 20-40 s)."""
    server = SGLangServer(model_path, server_config(), log_path=log_dir / "lora-server.log", device=None)
    await server.start()
    yield server
    server.stop()


@pytest.fixture
async def client(lora_server):
    async with SGLangClient(lora_server.base_url) as c:
        yield c
