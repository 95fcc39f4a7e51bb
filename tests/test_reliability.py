"""Reliability: the non-finite guard, checkpoint integrity, preemption, and the noise schedule as
resumable trainer state. Faults come from the test-only hook $SAD3_FAULT_INJECT (engine/guard.py)."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sad3_megatron.cli import main
from sad3_megatron.config import load_config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.schedules import NoiseSchedule
from sad3_megatron.engine.guard import FAULT_ENV, injected_fault
from sad3_megatron.engine.metrics import strict_record
from sad3_megatron.engine.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent

SMALL = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64", "model.seq_len=32",
    "train.micro_batch_size=2", "train.progress_bar=false", "train.eval_interval=1000", "train.ema_decay=0.9",
    "train.log_interval=1", "train.lr_schedule=constant", "train.warmup_steps=1", "train.eval_batches=1",
]  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, parsed strictly: a bare NaN or Infinity fails the test."""

    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds a bare {name}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float | None]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def weights(run_dir: Path, step: int, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors"))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_fault_spec_names_kind_steps_and_rank(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan_loss:step=3,5-6:rank=0;sigterm:step=2:rank=1")
    assert [s for s in range(1, 8) if injected_fault("nan_loss", s)] == [3, 5, 6]
    assert not injected_fault("sigterm", 2)  # rank 1 only; a single process is rank 0
    monkeypatch.delenv(FAULT_ENV)
    assert not injected_fault("nan_loss", 3)


def test_metrics_records_stay_strict_json():
    record = strict_record({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
    assert record == {"step": 3, "loss": None, "grad_norm": None, "lr": 0.1, "nonfinite": ["loss", "grad_norm"]}
    json.dumps(record, allow_nan=False)


def test_consecutive_nonfinite_steps_stop_the_run_and_never_save_nonfinite_weights(tmp_path, monkeypatch, capsys):
    """Steps 2.. have a NaN loss: each is skipped (weights unchanged, counted), and the third in a
    row ends the run with one line naming the step; every checkpoint on disk is step 1's weights."""
    monkeypatch.setenv(FAULT_ENV, "nan_loss:step=2-9:rank=*")
    argv = ["train", "configs/demo.yaml", *SMALL, f"run.out_dir={tmp_path}", "train.steps=8"]
    argv += ["train.save_interval=1", "train.keep_last=10", "train.max_skipped_steps=3"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sad3: error: step 4: 3 consecutive optimizer steps had a non-finite loss"), err
    by_step = {r["step"]: r for r in records(tmp_path)}
    assert sorted(by_step) == [1, 2, 3, 4]
    assert by_step[1]["skipped"] is False and by_step[1]["loss"] is not None
    for step in (2, 3, 4):
        assert by_step[step]["skipped"] and by_step[step]["loss"] is None and "loss" in by_step[step]["nonfinite"]
    assert [by_step[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved == ["step_0000001", "step_0000002", "step_0000003"]  # step 4 raised before saving
    for step in (2, 3):
        for name in ("model", "ema"):
            first, later = weights(tmp_path, 1, name), weights(tmp_path, step, name)
            assert all(torch.equal(first[k], later[k]) for k in first), (step, name)
    assert all(torch.isfinite(v).all() for v in weights(tmp_path, 3).values())


def test_the_guard_catches_a_real_divergence(tmp_path, monkeypatch, capsys):
    """The demo model at lr = 1e3 without clipping overflows the gradient
    norm; the run stops with one line instead of training on NaN, and its checkpoints are finite."""
    argv = ["train", "configs/demo.yaml", "model.seq_len=32", "train.micro_batch_size=4", "train.progress_bar=false"]
    argv += ["train.log_interval=1", "train.eval_interval=1000", "train.eval_batches=1", f"run.out_dir={tmp_path}"]
    argv += ["train.steps=12", "train.lr=1e3", "train.min_lr=1e3", "train.grad_clip=0", "train.save_interval=2"]
    argv += ["train.max_skipped_steps=3"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "consecutive optimizer steps had a non-finite" in err and len(err.splitlines()) == 1, err
    assert any(r.get("skipped") for r in records(tmp_path))
    for ckpt in (tmp_path / "checkpoints").glob("step_*"):
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / name)).values()), ckpt


def test_truncated_newest_checkpoint_resume_falls_back_and_eval_refuses(tmp_path, capsys):
    def config(run: str, steps: int):
        return load_config("configs/demo.yaml", SMALL + [f"run.out_dir={tmp_path / run}", f"train.steps={steps}"])

    train(config("straight", 6))
    run = tmp_path / "damaged"
    first = config("damaged", 4)
    first.train.save_interval = 2
    train(first)
    shard = run / "checkpoints" / "step_0000004" / "optimizer.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    code, _, err = run_cli(["eval", str(shard.parent), "--split", "val"], capsys)
    assert code == 0, err  # eval reads only config + weights, which are intact
    resumed = config("damaged", 6)
    resumed.train.save_interval = 2
    train(resumed)
    err = capsys.readouterr().err
    assert "checkpoint" in err and "step_0000004" in err and "is damaged" in err, err
    assert losses(run) == losses(tmp_path / "straight")  # steps 3-4 redone from step 2: bit-identical

    newest = run / "checkpoints" / "step_0000006"
    ema = newest / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    for target in (newest, run):  # the checkpoint, or its run directory
        code, _, err = run_cli(["eval", str(target), "--split", "val"], capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "step_0000006" in err and "is damaged (ema.safetensors has 100 bytes" in err and "step_0000004" in err
    code, _, err = run_cli(["sample", str(newest), "--num-tokens", "8", "--steps", "2"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "is damaged" in err, err
    with pytest.raises(Sad3Error, match="is damaged"):
        train(load_config("configs/demo.yaml", SMALL + [f"run.out_dir={run}", f"train.resume={newest}"]))

    older = run / "checkpoints" / "step_0000004"
    text = (older / "config.yaml").read_text()
    (older / "config.yaml").write_text(text.replace("seq_len: 32", "seq_len: 64"))  # same size, other content
    code, _, err = run_cli(["eval", str(older), "--split", "val"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "config.yaml does not match its recorded sha256" in err
    (older / "config.yaml").write_text("model: [not, a, mapping\n")
    (older / "manifest.json").unlink()  # a checkpoint without a manifest is still read defensively
    code, _, err = run_cli(["eval", str(older), "--split", "val"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "is unreadable" in err, err
    (older / "config.yaml").write_text("- just\n- a list\n")
    code, _, err = run_cli(["eval", str(older), "--split", "val"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "is malformed" in err, err
    (older / "config.yaml").write_text((newest / "config.yaml").read_text())
    (older / "ema.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    code, _, err = run_cli(["eval", str(older), "--split", "val"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "ema.safetensors" in err and "unreadable" in err, err


def test_a_resumed_run_restores_a_noise_schedule_that_differs_from_the_config(tmp_path, monkeypatch):
    """A schedule search replaces the schedule at an evaluation; it is checkpoint state: resuming
    without the search continues with the searched schedule, exactly as the uninterrupted run."""
    searched = NoiseSchedule("clipped", t_min=0.05, t_max=0.35)

    def search(self, step, val):
        self.schedule = searched

    def config(run: str, steps: int):
        extra = [f"run.out_dir={tmp_path / run}", f"train.steps={steps}", "train.eval_interval=2"]
        return load_config("configs/demo.yaml", SMALL + extra + ["train.save_interval=2"])

    train(config("plain", 4))
    monkeypatch.setattr(Trainer, "on_evaluate", search)
    train(config("searched", 4))
    train(config("resumed", 2))
    monkeypatch.undo()
    resumed = Trainer(config("resumed", 4))
    assert resumed.schedule == searched != NoiseSchedule("clipped", t_min=0.3, t_max=0.8)
    resumed.run()
    plain, straight, again = losses(tmp_path / "plain"), losses(tmp_path / "searched"), losses(tmp_path / "resumed")
    assert again == straight
    assert plain[3] != straight[3] and plain[4] != straight[4]  # the schedule did change the objective


@pytest.mark.slow
def test_sigterm_mid_run_saves_the_current_step_exits_0_and_resumes_exactly(launch, tmp_path):
    common = ["train.steps=60", "train.save_interval=1000", "train.ema_decay=0.5"]
    run = tmp_path / "stopped"
    cmd = launch.train_cmd(1) + ["configs/demo.yaml", *launch.overrides, *common, f"run.out_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().count("\n") >= 2:
        assert proc.poll() is None and time.time() < deadline, "training ended before the signal"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = [p.name for p in (run / "checkpoints").glob("step_*")]
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].removeprefix("step_"))
    assert 2 <= stopped_at < 60, "the signal landed after training had finished"
    assert f"stopped by a signal at step {stopped_at} of 60" in out
    assert max(losses(run)) == stopped_at and (run / "preempted").read_text().strip() == str(stopped_at)

    subprocess.run(cmd, cwd=ROOT, env=launch.env, check=True, capture_output=True, timeout=600)
    straight = tmp_path / "straight"
    subprocess.run(
        launch.train_cmd(1) + ["configs/demo.yaml", *launch.overrides, *common, f"run.out_dir={straight}"],
        cwd=ROOT, env=launch.env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    assert losses(run) == losses(straight) and sorted(losses(run)) == list(range(1, 61))
    assert not (run / "preempted").exists()
    final, reference = weights(run, 60, "ema"), weights(straight, 60, "ema")
    assert all(torch.equal(final[k], reference[k]) for k in final)


def run_torchrun(launch, out: Path, overrides: list[str], nproc: int, fault: str = "") -> subprocess.CompletedProcess:
    env = {**launch.env, FAULT_ENV: fault}
    cmd = launch.train_cmd(nproc) + ["configs/demo.yaml", *launch.overrides, *overrides, f"run.out_dir={out}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def skipped_reference(launch, tmp_path_factory) -> Path:
    """One process, global batch 8 as 2 micro-batches, step 3's batch skipped by the hook."""
    out = tmp_path_factory.mktemp("skipped-reference")
    proc = run_torchrun(launch, out, ["train.steps=4", "train.grad_accum_steps=2", "train.ema_decay=0"], 1, "nan_loss:step=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nan_on_one_of_two_data_parallel_ranks_skips_the_step_on_both(launch, zero_stage, skipped_reference, tmp_path):
    """Under ZeRO-0 the guard decides (an all-reduced flag); under ZeRO-2 DeepSpeed's own global
    norm check does. Either way step 3 is skipped everywhere: its weights are step 2's, and the
    losses around it are those of a single process that skipped that batch."""
    overrides = ["train.steps=4", "train.ema_decay=0", f"parallel.zero_stage={zero_stage}", "train.save_interval=1"]
    proc = run_torchrun(launch, tmp_path, [*overrides, "train.keep_last=4"], 2, "nan_loss:step=3:rank=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, reference = losses(tmp_path), losses(skipped_reference)
    assert ours[3] is None and reference[3] is None
    for step in (1, 2, 4):
        assert ours[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-5), step
    assert [r["skipped_steps"] for r in records(tmp_path) if "loss" in r] == [0, 0, 1, 1]
    before, after = weights(tmp_path, 2), weights(tmp_path, 3)
    assert all(torch.equal(before[k], after[k]) for k in before)
    moved = weights(tmp_path, 4)
    assert any(not torch.equal(after[k], moved[k]) for k in after)


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both_at_the_same_step_and_resumes(launch, tmp_path):
    """SIGTERM reaches rank 1 only, before step 2: both ranks stop after step 2 (the flag rides on
    the step's all-reduce), save it, exit 0; the resumed run equals the uninterrupted one."""
    overrides = ["train.steps=4", "train.ema_decay=0", "parallel.zero_stage=1"]
    proc = run_torchrun(launch, tmp_path / "run", overrides, 2, "sigterm:step=2:rank=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_0000002"]
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    assert run_torchrun(launch, tmp_path / "run", overrides, 2).returncode == 0
    straight = run_torchrun(launch, tmp_path / "straight", overrides, 2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-6)

