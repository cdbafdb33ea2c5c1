"""Small tasks with a verifiable reward that SmolLM2-135M-Instruct learns with RL in a few steps (measured in
../shared/notes/learnable-tasks.md): used by the demo and the tests."""

from __future__ import annotations

import re

ONE_WORD_QUESTIONS = [
    "Name a fruit.",
    "Name a colour.",
    "Name an animal.",
    "Name a country.",
    "Name a planet.",
    "Name a vegetable.",
    "Name a musical instrument.",
    "Name a sport.",
]
ONE_WORD_INSTRUCTION = " Answer in exactly one word."


def one_word_reward(text: str | None) -> float:
    """1 for a one-word answer, 1/n for n words, 0 for none (punctuation ignored)."""
    words = re.findall(r"[A-Za-z0-9']+", text or "")
    return 1.0 / len(words) if words else 0.0
