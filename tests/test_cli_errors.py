"""Bad input ends in one line on stderr that names the problem, exit code 2, and no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from sad3_megatron.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", DEMO, "diffusion.block_size=5"], "does not divide model.seq_len"),
        (["train", DEMO, "train.stepz=3"], "unknown config key train.stepz"),
        (["train", DEMO, "optim.lr=3"], "unknown config section"),
        (["train", DEMO, "data.train_files=/no/such/corpus.txt"], "not found"),
        (["train", DEMO, "diffusion.beta=0.9", "diffusion.omega=0.2"], "beta <= omega"),
        (["train", DEMO, "train.steps=many"], "train.steps must be int"),
        (["train", DEMO, "train.steps"], "section.key=value"),
        (["train", DEMO, "model.preset=gigantic"], "unknown model.preset"),
        (["train", DEMO, "diffusion.schedule=warp"], "unknown noise schedule"),
        (["train", DEMO, "model.attention_backend=cuda-magic"], "unknown model.attention_backend"),
        (["train", DEMO, "train.fp8=true"], "train.fp8 needs a CUDA GPU"),
        (["train", "/no/such/config.yaml"], "config file"),
        (["eval", "/no/such/run", "--data", DEMO], "no checkpoint"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_clear_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sad3: error:") and needle in err


def test_console_entry_point_exits_nonzero_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "sad3_megatron.cli", "train", DEMO, "diffusion.block_size=7"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sad3: error: diffusion.block_size=7 does not divide")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["eval", "/no/such/run", "--split", "val", "--draws", "0"], "--draws must be at least 1"),
        (["eval", "/no/such/run", "--split", "val", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["eval", "/no/such/run", "--data", DEMO, "--zero-shot-path", "/x"], "--zero-shot-path needs --zero-shot"),
        (["eval", "/no/such/run", "--zero-shot", "klingon"], "unknown zero-shot set 'klingon'"),
        (["eval", "/no/such/run"], "one of the arguments --data --split --zero-shot is required"),
        (["sample", "/no/such/run", "--num-tokens", "0"], "--num-tokens must be at least 1"),
        (["sample", "/no/such/run", "--steps", "0"], "--steps must be at least 1"),
        (["sample", "/no/such/run", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["sample", "/no/such/run", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["sample", "/no/such/run", "--temperature", "0"], "--temperature must be positive"),
        (["sample", "/no/such/run", "--threshold", "1.5"], "--threshold must be in (0, 1]"),
        (["sample", "/no/such/run", "--sampler", "psychic"], "unknown sampler 'psychic'"),
        (["sample", "/no/such/run", "--entropy-window", "0"], "entropy"),
        (["sample", "/no/such/run"], "no checkpoint at '/no/such/run'"),
    ],
)
def test_bad_eval_and_sample_flags_are_one_clear_line(argv, needle, capsys):
    """Flag checks run before any checkpoint is loaded."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sad3: error:") and needle in err, err
