"""The docs: no dead relative links, and the commands they name exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_no_dead_relative_links():
    dead = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                dead.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert dead == []


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    for script in re.findall(r"bash (scripts/\S+\.sh)", text):
        assert (ROOT / script).is_file(), script
    assert "bash scripts/quickstart.sh" in text and "bash scripts/test.sh" in text
