"""`art-sglang demo`, small: what the user sees (table rows, the plot, plain-words summary)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_a_row_per_step_and_saves_the_plot(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "art_sglang.cli",
            "demo",
            "--steps",
            "2",
            "--groups-per-step",
            "2",
            "--group-size",
            "2",
            "--path",
            str(tmp_path / ".art"),
            "--name",
            "demo-test",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "reward", "±"])
    rows = [line.split() for line in lines[header + 1 :] if line.strip() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert all(r[6] == "lora" for r in rows)
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows)
    plot = tmp_path / ".art" / "art-sglang-demo" / "models" / "demo-test" / "demo.png"
    assert plot.is_file() and plot.stat().st_size > 10_000
    assert f"[demo] plot: {plot}" in out.stdout
    assert "[demo] reward" in out.stdout
    # Quiet: the server's own logging went to its log file, not to the terminal.
    assert "server_args=ServerArgs" not in out.stdout + out.stderr
    assert (tmp_path / ".art" / "art-sglang-demo" / "models" / "demo-test" / "logs" / "sglang.log").is_file()
