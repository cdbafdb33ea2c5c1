"""ART's own backend-level tests, read from the installed openpipe-art wheel and run against SGLangBackend: the
constructor and the base model are swapped, nothing else but the one stale assertion named below. A new ART release
that changes a semantic these tests pin fails here at once."""

from __future__ import annotations

import re
import types
from pathlib import Path

import art
import pytest
from rollouts import BASE, make_backend

pytestmark = pytest.mark.server

ART_TESTS = Path(art.__file__).parent / "test"

# ART 0.5.23's test_step_skipping asserts that a step with no trainable data *renames* the previous checkpoint
# (['0000', '0002', '0003']), but its LocalBackend._advance_skipped_step *copies* it (shutil.copytree), so ART's own
# backend keeps '0001' as well; we match ART's code. This is the one change to ART's assertions.
STALE_RENAME = (
    'assert not os.path.exists(checkpoint_1), (\n                f"Checkpoint {checkpoint_1} should have been renamed"',
    'assert os.path.exists(checkpoint_1), (\n                f"Checkpoint {checkpoint_1} was copied, not renamed"',
)
STALE_LIST = (
    'expected_checkpoints = ["0000", "0002", "0003"]',
    'expected_checkpoints = ["0000", "0001", "0002", "0003"]',
)


def art_test_module(name: str, *replacements: tuple[str, str]) -> types.ModuleType:
    """ART's test file `name` with LocalBackend -> SGLangBackend (as the tests configure it) and its base model ->
    ours; each of `replacements` must match exactly once, so a changed ART test fails loudly here."""
    source = (ART_TESTS / name).read_text()
    source = source.replace("from art.local import LocalBackend", "")
    source = re.sub(r'base_model="[^"]+"', f'base_model="{BASE}"', source)
    for old, new in replacements:
        assert source.count(old) == 1, f"ART's {name} changed: {old!r} is not in it once; review this test"
        source = source.replace(old, new)
    module = types.ModuleType(f"art_test_{name[:-3]}")
    module.LocalBackend = lambda path: make_backend(path)
    exec(compile(source, str(ART_TESTS / name), "exec"), module.__dict__)
    return module


async def test_arts_step_skipping_test_passes():
    await art_test_module("test_step_skipping.py", STALE_RENAME, STALE_LIST).test_step_skipping()
