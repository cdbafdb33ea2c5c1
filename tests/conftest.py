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


# Two workers (`pytest -n 2 --dist loadfile`, as scripts/test.sh runs the suite): each file on one worker, so a
# module's shared server (a module-scoped fixture) starts once; the longest files first, so that the two workers end
# together (seconds per file, one run, docs/testing.md). (`--dist loadgroup` would split files further, but
# pytest-xdist 3.8 sets a node id that pytest 9.2 no longer reads: its groups are ignored.)
WEIGHT = {
    "test_families.py": 540,
    "test_replicas.py": 450,
    "test_agents.py": 350,
    "test_reliability.py": 280,
    "test_step.py": 270,
    "test_backend.py": 270,
    "test_pipeline.py": 260,
    "test_server.py": 145,
    "test_shared_server.py": 110,
    "test_examples.py": 100,
    "test_trainer.py": 95,
    "test_sft.py": 58,
    "test_demo.py": 52,
    "test_art_suite.py": 33,
}


# Fixtures that start a server for several tests.
SHARED_SERVERS = {"lora_server", "trained", "agent", "one_off", "live"}
# The fast tier (`scripts/test.sh -m "not slow"`): everything but these files, the tests that use a shared server
# and those marked slow, plus the tests marked smoke (one real server).
SLOW_FILES = {
    "test_agents.py",
    "test_art_suite.py",
    "test_backend.py",
    "test_demo.py",
    "test_examples.py",
    "test_families.py",
    "test_pipeline.py",
    "test_reliability.py",
    "test_shared_server.py",
    "test_step.py",
    "test_trainer.py",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        shared = SHARED_SERVERS & set(item.fixturenames)
        if (item.path.name in SLOW_FILES or shared) and not item.get_closest_marker("smoke"):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -WEIGHT.get(item.path.name, 0))  # stable: each file keeps its order


def server_config(**overrides) -> SGLangConfig:
    """A small CPU server (dtype left at auto, as users get it: float32 here, as the trainer), a small KV pool."""
    values = dict(max_total_tokens=8192, max_lora_rank=16, max_loras_per_batch=2, server_timeout=240.0)
    values.update(overrides)
    return SGLangConfig(**values)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return small_model(quiet=True)


@pytest.fixture(scope="session")
def tiny_base(model_path, tmp_path_factory) -> Path:
    """SmolLM2's shape at 2 layers x 64, random weights, its tokenizer and template: for plumbing tests."""
    from families import tiny_smollm2

    return tiny_smollm2(model_path, tmp_path_factory.getbasetemp() / "tiny-smollm2")


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
