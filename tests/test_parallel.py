"""Scale-out on CPU with gloo and several processes: tensor (and sequence) parallel, pipeline and ZeRO data parallel
against the single-process run, SIGKILL-and-resume, interrupted saves, the DeepSpeed launcher."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
def assert_same_steps(launch, reference: Path, parallel: Path, name: str) -> None:
    """Losses and pre-clipping gradient norms step by step: AdamW is nearly blind to a wrong gradient
    scale (e.g. a missing 1/DP), the norm is not."""
    for key in ("loss", "grad_norm"):
        ours, theirs = launch.losses(parallel, key), launch.losses(reference, key)
        assert sorted(ours) == sorted(theirs) == [1, 2, 3], (name, key)
        for step, value in theirs.items():
            assert ours[step] == pytest.approx(value, rel=1e-5, abs=1e-5), (name, key, step)


@pytest.fixture(scope="module")
def single_process(launch, tmp_path_factory) -> Path:
    """Reference: one process, global batch 8 as 2 accumulated micro-batches of 4."""
    out = tmp_path_factory.mktemp("single")
    launch.run_train(out, ["train.steps=3", "train.grad_accum_steps=2", "train.ema_decay=0"])
    return out


@pytest.fixture(scope="module")
def single_process_dropout(launch, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single-dropout")
    launch.run_train(out, ["train.steps=3", "train.grad_accum_steps=2", "train.ema_decay=0", "model.dropout=0.2"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("dp2-zero2", ["parallel.zero_stage=2"]),
        ("tp2", ["parallel.tensor_parallel=2", "train.grad_accum_steps=2"]),
    ],
)
def test_dropout_masks_follow_the_micro_batch_slot_in_every_layout(launch,
    name, overrides, single_process, single_process_dropout, tmp_path
):
    """Dropout is seeded by step_seed(seed, step, slot): a DP rank draws its slot's masks, TP ranks
    draw the same full-size masks as one process (dropout acts on replicated activations). Sequence
    parallelism is the exception: each rank drops on its own slice of the sequence with that seed,
    so its masks, and hence its numbers, differ from one process when dropout > 0."""
    launch.run_train(tmp_path, ["train.steps=3", "train.ema_decay=0", "model.dropout=0.2", *overrides], nproc=2)
    assert_same_steps(launch, single_process_dropout, tmp_path, name)
    assert launch.losses(single_process_dropout)[1] != pytest.approx(launch.losses(single_process)[1])  # dropout is on


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tp2", ["parallel.tensor_parallel=2", "train.grad_accum_steps=2"]),
        ("tp2-sp", ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "train.grad_accum_steps=2"]),
        (  # the chunked vocab-parallel loss against the single process's full logits
            "tp2-sp-chunked-loss",
            ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "model.loss_chunk_tokens=24",
             "train.grad_accum_steps=2"],
        ),  # fmt: skip
        ("pp2", ["parallel.pipeline_parallel=2", "parallel.zero_stage=1", "train.grad_accum_steps=2"]),
        ("dp2-zero1", ["parallel.zero_stage=1"]),
        ("dp2-zero2", ["parallel.zero_stage=2"]),
        ("dp2-zero3", ["parallel.zero_stage=3"]),
        # ZeRO-3 partitions over the data-parallel group only: TP ranks keep their own shards
        ("tp2-zero3", ["parallel.tensor_parallel=2", "parallel.zero_stage=3", "train.grad_accum_steps=2"]),
    ],
)
def test_two_process_layouts_match_single_process(launch, name, overrides, single_process, tmp_path):
    launch.run_train(tmp_path, ["train.steps=3", "train.ema_decay=0", *overrides], nproc=2)
    assert_same_steps(launch, single_process, tmp_path, name)
    # The consolidated weights (TP shards gathered, pipeline stages merged) are the single-process ones.
    ours = load_file(str(tmp_path / "checkpoints" / "step_0000003" / "model.safetensors"))
    single = load_file(str(single_process / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert sorted(ours) == sorted(single)
    assert all((ours[k] - single[k]).abs().max() < 1e-4 for k in ours), name
    # So are the Adam moments (the layout-free optimizer state), up to TP's reduction order (4e-4 of
    # a tensor's largest value); no per-rank DeepSpeed shards are written.
    moments, reference = (load_file(str(r / "checkpoints" / "step_0000003" / "optimizer.safetensors")) for r in (tmp_path, single_process))
    assert sorted(moments) == sorted(reference) == sorted(f"{m}.{k}" for m in ("exp_avg", "exp_avg_sq") for k in ours)
    assert all((moments[k] - reference[k]).abs().max() <= 2e-3 * reference[k].abs().max() for k in moments), name
    assert not list((tmp_path / "checkpoints" / "step_0000003").glob("*.pt")), name


@pytest.mark.slow
def test_tensor_sequence_and_pipeline_parallel_together_match_single_process(launch, single_process, tmp_path):
    """TP = 2 with sequence parallelism inside each of PP = 2 stages (4 processes): stages pass
    sequence slices to each other, and the last layer re-splits the noisy half."""
    layout = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.pipeline_parallel=2"]
    launch.run_train(
        tmp_path,
        ["train.steps=3", "train.ema_decay=0", "parallel.zero_stage=1", "train.grad_accum_steps=2", *layout],
        nproc=4,
    )
    reference, parallel = launch.losses(single_process), launch.losses(tmp_path)
    assert sorted(parallel) == sorted(reference) == [1, 2, 3]
    for step, loss in reference.items():
        assert parallel[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step


@pytest.mark.slow
def test_rows_packed_by_document_pass_their_labels_through_pipeline_stages(launch, tmp_path):
    """data.packing=document under PP = 2: the document labels travel with the hidden states and
    every stage masks across documents, as the single process does."""
    common = ["train.steps=3", "train.ema_decay=0", "data.packing=document", "train.grad_accum_steps=2"]
    launch.run_train(tmp_path / "single", common)
    launch.run_train(tmp_path / "pp2", [*common, "parallel.pipeline_parallel=2", "parallel.zero_stage=1"], nproc=2)
    reference, pipelined = launch.losses(tmp_path / "single"), launch.losses(tmp_path / "pp2")
    assert sorted(pipelined) == sorted(reference) == [1, 2, 3]
    for step, loss in reference.items():
        assert pipelined[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step


ADAPTATION = ["diffusion.shift=true", "diffusion.complementary_masks=true", "diffusion.clean_attention=causal",
              "diffusion.ar_loss_weight=1.0", "diffusion.loss_weighting=uniform", "diffusion.mask_embedding_noise=0.5",
              "diffusion.mask_embedding_noise_steps=2", "data.packing=document"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [["parallel.pipeline_parallel=2", "parallel.zero_stage=1"], ["parallel.tensor_parallel=2"]], ids=["pp2", "tp2"]
)
def test_adaptation_switches_match_single_process_in_parallel_layouts(launch, layout, tmp_path):
    """Every adaptation switch at once (docs/adaptation.md) under PP = 2 (the complementary copy doubles the
    rows the stages pass, the [MASK] noise is drawn on stage 0) and TP = 2 (the same noise on every rank)."""
    common = ["train.steps=3", "train.ema_decay=0", "train.grad_accum_steps=2", *ADAPTATION]
    launch.run_train(tmp_path / "single", common)
    launch.run_train(tmp_path / "parallel", [*common, *layout], nproc=2)
    reference, parallel = launch.losses(tmp_path / "single"), launch.losses(tmp_path / "parallel")
    assert sorted(parallel) == sorted(reference) == [1, 2, 3]
    for step, loss in reference.items():
        assert parallel[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step


@pytest.mark.slow
def test_zero3_keeps_a_partitioned_ema_equal_to_the_single_process_one_and_resumes_it(launch, tmp_path):
    """Under ZeRO-3 each rank averages its own partition; the consolidated EMA, straight or resumed
    from a mid-run checkpoint, is the single-process EMA."""
    common = ["train.ema_decay=0.5", "train.save_interval=2", "train.keep_last=3"]
    launch.run_train(tmp_path / "single", [*common, "train.steps=4", "train.grad_accum_steps=2"])
    launch.run_train(tmp_path / "zero3", [*common, "train.steps=4", "parallel.zero_stage=3"], nproc=2)
    launch.run_train(tmp_path / "resumed", [*common, "train.steps=2", "parallel.zero_stage=3"], nproc=2)
    launch.run_train(tmp_path / "resumed", [*common, "train.steps=4", "parallel.zero_stage=3"], nproc=2)
    single = load_file(str(tmp_path / "single" / "checkpoints" / "step_0000004" / "ema.safetensors"))
    for run in ("zero3", "resumed"):
        ema = load_file(str(tmp_path / run / "checkpoints" / "step_0000004" / "ema.safetensors"))
        assert sorted(ema) == sorted(single)
        assert all((ema[k] - single[k]).abs().max() < 1e-4 for k in ema), (
            run
        )  # as the weights: Adam amplifies fp32 rounding
        assert launch.losses(tmp_path / run) == pytest.approx(launch.losses(tmp_path / "single"), rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_portable_tensor_parallel_linear_equals_megatron_core_at_tp2(launch):
    """model/tp_linear.py (the forward fp8 GEMMs use) against megatron-core's own, TP = 2 on gloo."""
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node=2",
        f"--master_port={launch.free_port()}",
        "tests/workers/tp_linear_equivalence.py",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("tp_linear ok") == 2, proc.stdout + proc.stderr[-2000:]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_reproduces_the_uninterrupted_run(launch, tmp_path):
    common = ["train.steps=8", "train.save_interval=2", "train.keep_last=5"]
    launch.run_train(tmp_path / "straight", common)
    victim = tmp_path / "killed"
    cmd = launch.train_cmd(1) + ["configs/demo.yaml", *launch.overrides, *common, f"run.out_dir={victim}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (victim / "checkpoints" / "step_0000004").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before the kill"
    assert not (victim / "checkpoints" / "step_0000008").exists() and max(launch.losses(victim)) < 8
    launch.run_train(victim, common)  # resume=auto picks the newest complete checkpoint
    straight, resumed = launch.losses(tmp_path / "straight"), launch.losses(victim)
    assert sorted(resumed) == list(range(1, 9))
    assert all(resumed[s] == straight[s] for s in straight), (straight, resumed)


@pytest.mark.slow
def test_deepspeed_launcher_with_localhost_hostfile(launch, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
        "--master_port", str(launch.free_port()),
        "--module", "sad3_megatron.cli", "train", "configs/demo.yaml", *launch.overrides,
        "train.steps=2", "parallel.zero_stage=1", f"run.out_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=launch.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(launch.losses(tmp_path / "run")) == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors").is_file()
