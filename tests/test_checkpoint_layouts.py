"""Resume on any layout: a run stopped at step 2 and continued on another data-parallel size, ZeRO
stage, TP (with or without sequence parallelism) or PP repeats the uninterrupted run on its original
layout: the losses of steps 3-4 to 1e-5 and, tensor by tensor, the Adam moments, weights and EMA of
step 4 (from the consolidated checkpoint). Every run goes through the CLI (`sad3 train`'s main):
the single-process ones in this process, the two-process ones in one torchrun launch
(tests/workers/train_jobs.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sad3_megatron.cli import main
from sad3_megatron.config import load_config
from sad3_megatron.engine.checkpoint import checkpoint_problem, latest_checkpoint
from sad3_megatron.engine.run_lock import release_run
from sad3_megatron.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent

COMMON = [
    "configs/demo.yaml", "train.global_batch_size=8", "train.steps=4", "train.save_interval=2",
    "train.keep_last=2", "train.ema_decay=0.5", "train.eval_batches=1",
]  # fmt: skip
MODERN = [  # Qwen3-style: tied embeddings, grouped-query attention, strided SwiGLU fc1, QK-norm, qkv bias
    "model.norm=rmsnorm", "model.mlp=swiglu", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
    "model.qk_norm=true", "model.tie_embeddings=true", "model.mlp_bias=false", "model.qkv_bias=true",
]  # fmt: skip
LAYOUTS = {  # name: (processes, overrides)
    "zero0": (1, []),
    "zero1-dp1": (1, ["parallel.zero_stage=1"]),
    "zero2-dp1": (1, ["parallel.zero_stage=2"]),
    "zero1-dp2": (2, ["parallel.zero_stage=1"]),
    "zero2-dp2": (2, ["parallel.zero_stage=2"]),
    "zero3-dp2": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "tp2-sp": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"]),
    "modern": (1, MODERN),
    "modern-tp2-sp": (2, [*MODERN, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    "modern-pp2": (2, [*MODERN, "parallel.pipeline_parallel=2", "parallel.zero_stage=1"]),
}
SWITCHES = [  # (uninterrupted run on the original layout, layout resumed on at step 2)
    ("zero1-dp2", "zero1-dp1"),  # the first failure: ZeRO-1 DP 2 resumed in one process
    ("zero1-dp1", "zero1-dp2"),
    ("zero2-dp2", "zero2-dp1"),
    ("zero2-dp1", "zero2-dp2"),
    ("zero3-dp2", "zero1-dp1"),
    ("tp2", "zero0"),  # the second failure: TP 2 resumed at TP 1
    ("zero0", "tp2-sp"),
    ("pp2", "zero1-dp1"),
    ("modern", "modern-tp2-sp"),  # KV groups and SwiGLU's strided fc1 split by TP, the tied table by vocabulary
    ("modern", "modern-pp2"),  # the tied table as two pipeline stages' copies
]


def argv(launch, layout: str, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [COMMON[0], *launch.overrides, *COMMON[1:], *LAYOUTS[layout][1], *extra, f"run.out_dir={out}"]


def in_process(launch, layout: str, out: Path, extra: tuple[str, ...] = ()) -> None:
    assert main(["train", *argv(launch, layout, out, extra)]) == 0, (layout, out)


def two_processes(launch, jobs: list, tmp_path: Path) -> None:
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={launch.free_port()}", "tests/workers/train_jobs.py"]
    proc = subprocess.run([*cmd, str(spec)], cwd=ROOT, env=launch.env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def switched(source: Path, out: Path) -> Path:
    """A run directory holding only the source run's step-2 checkpoint (resume=auto picks it)."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000002")
    (out / "checkpoints" / "latest").write_text("step_0000002")
    return out


def resave(launch, layout: str, out: Path) -> None:
    """Load the checkpoint in `out` on `layout` and save it again at once, in this process."""
    cfg = load_config(COMMON[0], argv(launch, layout, out)[1:])
    trainer = Trainer(cfg)
    trainer.checkpoint(trainer.start_step)
    release_run(out)


def tensors(run: Path, name: str, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors"))


def assert_carried_exactly(source: Path, resaved: Path, label: str) -> None:
    """Loaded on another layout and saved again, the step-2 state is the same, bit for bit."""
    for name in ("optimizer", "model", "ema"):
        a, b = tensors(resaved, name, 2), tensors(source, name, 2)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b), (label, name)
    saved = json.loads((source / "checkpoints" / "step_0000002" / "state.json").read_text())
    again = json.loads((resaved / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert {k: v for k, v in again.items() if k != "layout"} == {k: v for k, v in saved.items() if k != "layout"}


def assert_continues(launch, reference: Path, resumed: Path, label: str, tolerance: float) -> None:
    """Steps 3-4 after the switch against the uninterrupted run: losses to 1e-5; the step-4 Adam
    moments, weights and EMA tensor by tensor, to `tolerance` of each tensor's largest value."""
    ours, theirs = launch.losses(resumed), launch.losses(reference)
    assert sorted(ours) == [3, 4], label
    for step in (3, 4):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-6), (label, step)
    for name in ("optimizer", "model", "ema"):
        a, b = tensors(resumed, name), tensors(reference, name)
        assert sorted(a) == sorted(b), (label, name)
        for key in b:
            scale = b[key].abs().max().item()
            assert (a[key] - b[key]).abs().max().item() <= tolerance * scale + 1e-12, (label, name, key)


@pytest.fixture(scope="module")
def layout_runs(launch, tmp_path_factory) -> Path:
    """The uninterrupted run of every source layout (checkpoints at steps 2 and 4), each switch's
    continuation from step 2, and the step-2 state loaded on the new layout and saved again; plus a
    two-process run whose step-4 checkpoint does not fit on the disk."""
    tmp = tmp_path_factory.mktemp("layouts")
    sources = sorted({source for source, _ in SWITCHES})
    for name in sources:
        if LAYOUTS[name][0] == 1:
            in_process(launch, name, tmp / name)
    jobs: list = [argv(launch, name, tmp / name) for name in sources if LAYOUTS[name][0] == 2]
    for source, target in SWITCHES:  # continue the single-process runs on two processes
        if LAYOUTS[target][0] == 2:
            out = switched(tmp / source, tmp / f"{source}-to-{target}")
            jobs += [argv(launch, target, out), {"resave": argv(launch, target, switched(tmp / source, resaved(out)))}]
    jobs.append({"argv": argv(launch, "zero1-dp2", tmp / "disk-full"), "fault": "disk_full:step=4:rank=0", "exit": 2})
    two_processes(launch, jobs, tmp)
    for source, target in SWITCHES:
        out = tmp / f"{source}-to-{target}"
        if LAYOUTS[target][0] == 1:
            resave(launch, target, switched(tmp / source, resaved(out)))
            if target == "zero0":  # an explicit checkpoint rather than resume=auto
                in_process(launch, target, out, (f"train.resume={tmp / source / 'checkpoints' / 'step_0000002'}",))
            else:
                in_process(launch, target, switched(tmp / source, out))
    return tmp


def resaved(out: Path) -> Path:
    return out.with_name(out.name + "-resaved")


@pytest.mark.slow
def test_resume_on_another_layout_continues_the_uninterrupted_run(launch, layout_runs):
    for source, target in SWITCHES:
        out, label = layout_runs / f"{source}-to-{target}", f"{source} -> {target}"
        assert_carried_exactly(layout_runs / source, resaved(out), label)
        # TP splits the matmuls' sums: uninterrupted TP = 2 and TP = 1 runs differ by up to 4.4e-4 of
        # a tensor's largest Adam moment (measured). So do the tied model's two pipeline stages, which add
        # their copies' gradients in another order than one process (8.5e-4, on the second moments of
        # norm weights whose gradients are ~1e-5); the other switches stay within 4e-6.
        loose = "tp" in source + target or "modern" in source
        assert_continues(launch, layout_runs / source, out, label, 2e-3 if loose else 5e-5)
    state = json.loads((layout_runs / "zero1-dp2" / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["layout"]["data_parallel"] == 2 and state["data"] == {"rows": 16, "global_batch": 8}
    assert not list((layout_runs / "zero3-dp2" / "checkpoints" / "step_0000004").glob("*.pt"))  # no per-rank shards


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_stops_both_ranks_and_keeps_the_last_one(launch, layout_runs):
    """Rank 0 finds no room for step 4 (the disk_full fault); both ranks end with exit code 2 (the
    worker checks), nothing of step 4 is written, step 2 and `latest` stay."""
    root = layout_runs / "disk-full" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    assert latest_checkpoint(root).name == "step_0000002" and checkpoint_problem(root / "step_0000002") is None
    assert sorted(launch.losses(layout_runs / "disk-full")) == [1, 2, 3, 4]


def test_data_position_follows_the_global_batch_not_the_layout():
    """Rows are entries of one training order: any DP × accumulation split of a global batch draws
    the same rows (slot = micro-batch × DP + rank), and after a change of global batch at step s the
    run goes on from the entry it had reached."""
    from sad3_megatron.data.sampler import batch_rows, rows_at
    from sad3_megatron.engine.resume import data_state, row_offset

    n, seed, mbs = 1000, 3, 4

    def global_rows(step: int, accum: int, dp: int, offset: int = 0) -> list[int]:
        out = []
        for slot in range(accum * dp):
            micro, rank = divmod(slot, dp)
            start = step * mbs * accum * dp + slot * mbs + offset
            rows = rows_at(n, start, mbs, seed)
            if offset == 0:
                assert rows.tolist() == batch_rows(n, step, micro, mbs, accum, seed, rank, dp).tolist()
            out += rows.tolist()
        return out

    assert global_rows(5, 2, 1) == global_rows(5, 1, 2)  # DP 1 × accumulation 2 = DP 2 × 1
    assert global_rows(249, 1, 2) != global_rows(250, 1, 2)  # across an epoch boundary too
    saved = data_state(step=3, global_batch=8, row_offset=0)  # 24 rows drawn
    offset = row_offset(saved, step=3, global_batch=4, seq_len=32, announce=False)
    assert global_rows(3, 1, 1, offset) == global_rows(3, 2, 1)[:4]  # step 4 starts where step 3 ended
    assert global_rows(4, 1, 1, offset) == global_rows(3, 2, 1)[4:]
    assert data_state(5, 4, offset) == {"rows": 32, "global_batch": 4}


SMALL = [
    "configs/demo.yaml", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64",
    "model.seq_len=32", "train.micro_batch_size=2", "train.progress_bar=false", "train.eval_interval=1000",
    "train.ema_decay=0.9", "train.log_interval=1", "train.eval_batches=1", "train.save_interval=2",
]  # fmt: skip


def test_a_new_global_batch_is_said_in_one_line_and_a_new_model_shape_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "train.steps=2", "train.grad_accum_steps=2", f"run.out_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["train", *SMALL, "train.steps=4", f"run.out_dir={run}"]) == 0
    out = capsys.readouterr().out
    changed = [line for line in out.splitlines() if "global batch changes" in line]
    assert len(changed) == 1 and "from 4 to 2 sequences at step 2" in changed[0] and "sequence 8 " in changed[0], out
    state = json.loads((run / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert state["data"] == {"rows": 12, "global_batch": 2} and state["step"] == 4 and state["tokens"] == 12 * 32

    assert main(["checkpoint", "info", str(run)]) == 0
    info = capsys.readouterr().out
    assert "step_0000004" in info and "format: layout-free; intact: yes" in info, info
    assert "step 4, tokens 384" in info and "data position: sequence 12 of the training order (token 384)" in info
    assert "written on: world 1 = TP 1 × PP 1 × DP 1, ZeRO-0; global batch 2" in info
    assert "resume on another layout: any DP size, ZeRO stage 0-3, TP, PP, sequence and context parallelism" in info

    code = main(["train", *SMALL, "train.steps=6", "model.hidden_size=64", f"run.out_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "model.hidden_size=32, this run has model.hidden_size=64" in err and "step_0000004" in err, err
    code = main(["train", *SMALL, "train.steps=6", "data.tokenizer=gpt2", f"run.out_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "data.tokenizer=bert-base-uncased, this run has data.tokenizer=gpt2" in err, err


def test_a_checkpoint_of_deepspeed_shards_from_an_earlier_sad3_resumes_on_its_layout(launch, tmp_path, capsys):
    """Checkpoints written before the layout-free state (DeepSpeed's save_checkpoint plus the
    consolidated weights) still resume, through engine.load_checkpoint, on their own layout."""
    from sad3_megatron.engine.checkpoint import write_manifest

    run = tmp_path / "run"
    assert main(["train", *SMALL, "train.steps=2", f"run.out_dir={run}"]) == 0
    trainer = Trainer(load_config(SMALL[0], [*SMALL[1:], "train.steps=2", f"run.out_dir={run}"]))
    old = run / "checkpoints" / "step_0000002"
    for name in ("optimizer.safetensors", "state.json", "manifest.json"):
        (old / name).unlink()
    state = {k: v for k, v in trainer.client_state(2).items() if k not in ("data", "optimizer_steps", "lr_scheduler", "layout")}
    trainer.engine.save_checkpoint(str(run / "checkpoints"), tag=old.name, client_state=state, save_latest=False)
    release_run(run)
    write_manifest(old)
    capsys.readouterr()
    assert main(["checkpoint", "info", str(old)]) == 0
    info = capsys.readouterr().out
    assert "format: deepspeed-shards" in info and "only on the layout it was written on" in info, info
    assert main(["train", *SMALL, "train.steps=3", f"run.out_dir={run}"]) == 0
    assert sorted(launch.losses(run)) == [1, 2, 3]
    assert (run / "checkpoints" / "step_0000003" / "state.json").is_file()  # saved layout-free from then on
