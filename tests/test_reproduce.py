"""tools/reproduce.py end to end on CPU: tiny models, a few steps, the report and the plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_table3_quick_writes_its_report_and_plots_and_resumes(tmp_path):
    out = tmp_path / "repro"
    # Not this process's one-rank group: its MASTER_PORT is taken (conftest set it up).
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    command = [sys.executable, str(REPO / "tools" / "reproduce.py"), "table3", "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "report.md").read_text()
    for label in ("AR", "SEDD", "MDLM", "L'=16", "L'=8", "L'=4", "D3PM (absorb), T=1000"):
        assert f"| {label} |" in report
    assert "≤ 32.71" in report and "table3_curves.png" in report  # the paper's number beside ours
    png = (out / "table3_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = json.loads((out / "table3.json").read_text())
    assert rows["AR"]["exact"] and not rows["SEDD"]["exact"] and rows["L'=4"]["block_size"] == 4

    # A rerun finds every stage's output and redoes nothing: same numbers, no new checkpoints.
    checkpoints = sorted(p.name for p in (out / "runs" / "mdlm" / "checkpoints").iterdir())
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "table3.json").read_text()) == rows
    assert sorted(p.name for p in (out / "runs" / "mdlm" / "checkpoints").iterdir()) == checkpoints
