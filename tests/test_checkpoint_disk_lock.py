"""A full disk and a shared run directory: a checkpoint that cannot fit is refused before a byte is
written (or fits by pruning first what keep_last would prune after), a save that fails midway leaves
nothing behind, debris of a crash is removed at start; a second job on a running job's directory is
refused in one line, and the lock of a dead job is taken over."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sad3_megatron.cli import main
from sad3_megatron.engine import checkpoint as ckpt_module
from sad3_megatron.engine import disk_space
from sad3_megatron.engine.checkpoint import checkpoint_problem, latest_checkpoint
from sad3_megatron.engine.run_lock import LOCK, STALE_ENV, RunLock, stale_reason

ROOT = Path(__file__).resolve().parent.parent

SMALL = [
    "configs/demo.yaml", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64",
    "model.seq_len=32", "train.micro_batch_size=2", "train.progress_bar=false", "train.eval_interval=1000",
    "train.ema_decay=0.9", "train.log_interval=1", "train.eval_batches=1", "train.save_interval=1",
]  # fmt: skip


def train(run: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["train", *SMALL, *extra, f"run.out_dir={run}"])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def report(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("sad3: error:")]


def saved(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name != "latest")


def free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: disk_space.shutil._ntuple_diskusage(free, 0, free))


def test_a_save_that_cannot_fit_is_refused_before_writing_and_the_run_goes_on_once_space_is_freed(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    assert train(run, capsys, "train.steps=2", "train.keep_last=3")[0] == 0
    debris = run / "checkpoints" / ".tmp-step_0000003"  # a save killed midway, by a crash or a full disk
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"\0" * 100)
    free_space(monkeypatch, 4096)
    code, _, err = train(run, capsys, "train.steps=4", "train.keep_last=3")
    assert code == 2 and len(report(err)) == 1, err
    line = report(err)[0]
    assert "step_0000003" in line and "bytes but 4,096 are free" in line and "train.keep_last (now 3)" in line, line
    assert "step_0000002' is intact" in line, line
    assert f"removed {str(debris)!r}" in err  # at start, before anything else was written
    assert saved(run) == ["step_0000001", "step_0000002"] and latest_checkpoint(run / "checkpoints").name == "step_0000002"
    assert checkpoint_problem(run / "checkpoints" / "step_0000002") is None

    monkeypatch.undo()  # space freed: the same command resumes from step 2 and completes
    code, out, err = train(run, capsys, "train.steps=4", "train.keep_last=3")
    assert code == 0 and "resuming from step_0000002" in out, err
    assert saved(run) == ["step_0000002", "step_0000003", "step_0000004"]

    # Not enough space for step 5 beside three checkpoints, but enough once step 2 (which
    # keep_last=2 drops after saving step 5 anyway) is gone: it is pruned first; step 4 never is.
    size = disk_space.directory_bytes(run / "checkpoints" / "step_0000004")
    free_space(monkeypatch, size // 2)
    code, _, err = train(run, capsys, "train.steps=5", "train.keep_last=2")
    assert code == 0, err
    assert "pruning" in err and "step_0000002" in err and "before saving step_0000005" in err, err
    assert saved(run) == ["step_0000004", "step_0000005"]


def test_a_save_that_fails_midway_leaves_no_partial_directory(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert train(run, capsys, "train.steps=1")[0] == 0
    real = ckpt_module.save_file

    def disk_full(tensors, path):
        if path.endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckpt_module, "save_file", disk_full)
    code, _, err = train(run, capsys, "train.steps=2")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "writing checkpoint" in err and "step_0000002" in err and "No space left on device" in err, err
    assert "partial files were removed" in err and "step_0000001' is intact" in err, err
    assert saved(run) == ["step_0000001"] and checkpoint_problem(run / "checkpoints" / "step_0000001") is None


def test_the_lock_names_its_holder_and_is_stale_only_when_its_holder_is_gone(tmp_path, monkeypatch):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "job": None, "restart": 0}
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert stale_reason({**me, "pid": dead.pid}, 0, me, 600) == "that process is gone"
    assert stale_reason({**me, "pid": os.getppid()}, 10**6, me, 600) is None  # alive here: never stale
    other = {"host": "node17", "pid": 4242}
    assert stale_reason(other, 30, me, 600) is None
    assert stale_reason(other, 700, me, 600).startswith("no heartbeat for 700 s")
    requeued = {**me, "job": "99", "restart": 1}
    assert stale_reason({**other, "job": "99", "restart": 0}, 0, requeued, 600) == "an earlier run of this requeued Slurm job"

    monkeypatch.setenv(STALE_ENV, "0.5")  # heartbeat every 0.05 s
    lock = RunLock(tmp_path)
    lock.acquire()
    holder = json.loads((tmp_path / LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    os.utime(tmp_path / LOCK, (0, 0))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 1  # the heartbeat touched it
    lock.release()
    assert not (tmp_path / LOCK).exists()


@pytest.mark.slow
def test_a_second_train_on_a_running_jobs_directory_is_refused_and_a_dead_jobs_lock_taken_over(launch, tmp_path, capsys):
    run = tmp_path / "run"
    cmd = launch.train_cmd(1) + ["configs/demo.yaml", *launch.overrides, "train.steps=100000", "train.save_interval=100000", f"run.out_dir={run}"]
    holder = subprocess.Popen(cmd, cwd=ROOT, env=launch.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run / LOCK).is_file():
            assert holder.poll() is None and time.time() < deadline, "the first job did not start"
            time.sleep(0.1)
        started = time.perf_counter()
        code, _, err = train(run, capsys, "train.steps=2")
        assert time.perf_counter() - started < 10
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"is in use by another sad3 train (pid {holder.pid} on {socket.gethostname()}" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    assert (run / LOCK).is_file()
    code, _, err = train(run, capsys, "train.steps=2")
    assert code == 0, err
    assert f"taking over the stale lock {str(run / LOCK)!r} (pid {holder.pid}" in err and "that process is gone" in err
    assert not (run / LOCK).exists()  # released at the end
