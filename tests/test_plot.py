"""`sad3 plot`: curves read from metrics.jsonl and drawn to a PNG."""

import json

import pytest

from sad3_megatron.cli import main
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.evaluation.plots import read_run


def write_run(path, losses, val_every=2, tokens_per_step=100):
    path.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "loss": loss, "tokens": step * tokens_per_step, "lr": 1e-3})
        if step % val_every == 0:
            lines.append({"step": step, "val_nelbo": loss + 0.5, "val_ppl": 1.0, "elapsed": 1.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_read_run_puts_held_out_records_at_their_step_tokens(tmp_path):
    write_run(tmp_path / "a", [5.0, 4.0, 3.5, 3.0])
    curves = read_run(tmp_path / "a")
    assert curves.label == "a"
    assert curves.train_tokens == [100, 200, 300, 400] and curves.train_loss == [5.0, 4.0, 3.5, 3.0]
    assert curves.val_tokens == [200, 400] and curves.val_nelbo == [4.5, 3.5]


def test_sad3_plot_writes_a_png_of_several_runs(tmp_path, capsys):
    write_run(tmp_path / "a", [5.0, 4.0, 3.5, 3.0])
    write_run(tmp_path / "b", [6.0, 5.0, 4.0, 3.9])
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--labels", "A", "B"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 run(s)" in capsys.readouterr().out


def test_bad_runs_are_one_line_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    write_run(tmp_path / "a", [1.0])
    assert main(["plot", str(tmp_path / "a"), "--labels", "x", "y"]) == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(Sad3Error, match="no logged steps"):
        read_run(tmp_path / "empty")
