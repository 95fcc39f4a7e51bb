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


@pytest.mark.slow
def test_adaptation_quick_writes_its_report_and_plots_and_resumes(tmp_path):
    """AR pretraining, each recipe of configs/adapt/ from its weights, a scratch SAD3-LM, their bounds, Gen. PPL
    under the AR run, NFEs and confident decoding: the report's rows, the plots, and a rerun that redoes nothing."""
    out = tmp_path / "adapt"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, str(REPO / "tools" / "reproduce.py"), "adaptation", "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "report.md").read_text()
    for label in ("AR", "scratch L'=4", "SDAR", "Fast-dLLM v2", "Nemotron", "LLaDA2 curriculum"):
        assert f"| {label} |" in report
    assert "θ=0.5: NFEs/token" in report and "median top p" in report
    for png in ("adaptation_curves.png", "adaptation_gen_ppl_nfe.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "adaptation.json").read_text())
    assert rows["AR"]["eval"]["exact"] and not rows["SDAR"]["eval"]["exact"]
    assert rows["Fast-dLLM v2"]["eval"]["trained_with"].startswith("shift, complementary_masks")
    llada = sorted(p.name for p in (out / "runs").iterdir() if p.name.startswith("llada2_curriculum-"))
    assert len(llada) == 6  # the curriculum's stages, one run each
    checkpoints = sorted(p.name for p in (out / "runs" / "scratch" / "checkpoints").iterdir())
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "adaptation.json").read_text()) == rows
    assert sorted(p.name for p in (out / "runs" / "scratch" / "checkpoints").iterdir()) == checkpoints
