"""Context parallelism (parallel.context_parallel): the row assignment, the trainer's step split over
CP ranks against the same step run unsplit (loss and every gradient), its composition with TP (+SP),
DP under ZeRO-2/3 and activation checkpointing, resuming across CP sizes, the balance tool."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sad3_megatron.config import load_config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.model.context_parallel import RowLayout, zigzag_rows

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-6  # fp32, relative (‖a − b‖ / ‖b‖ per tensor)


def test_each_rank_holds_two_mirrored_chunks_of_each_half_with_its_noisy_rows_first():
    """L = 16 as x_t ⊕ x (32 rows), C = 2: chunks of 4 rows; rank 0 takes chunks 0 and 3 of each half."""
    assert zigzag_rows(32, 2, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 18, 19, 28, 29, 30, 31]
    assert zigzag_rows(32, 2, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27]
    for cp in (2, 4, 8):
        layout = RowLayout(2 * 64, 64, cp, 0)
        assert sorted(layout.keys.tolist()) == list(range(128))  # every row on exactly one rank
        for rank in range(cp):
            local = RowLayout(2 * 64, 64, cp, rank).local
            assert (local[: layout.keep] < 64).all() and (local[layout.keep :] >= 64).all()


def test_the_ar_baseline_is_padded_to_a_multiple_of_2c_rows():
    layout = RowLayout(31, 31, 2, 1)  # x[:, :-1] of L = 32
    assert (layout.padded, layout.keep, layout.halves) == (32, 16, 1)
    assert layout.local.tolist() == [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["parallel.context_parallel=0"], "parallel.context_parallel must be at least 1"),
        (["parallel.context_parallel=2", "parallel.pipeline_parallel=2", "parallel.zero_stage=1"],
         "does not run with pipeline stages: set parallel.pipeline_parallel=1"),  # fmt: skip
        (["parallel.context_parallel=3"], "model.seq_len=128 must be a multiple of 6"),
        (["parallel.context_parallel=2", "diffusion.objective=sedd", "diffusion.block_size=128"],
         "sedd reads full-vocabulary logits of every row"),  # fmt: skip
        (["parallel.context_parallel=2", "diffusion.mask_embedding_noise=0.1", "diffusion.mask_embedding_noise_steps=10"],
         "set diffusion.mask_embedding_noise=0"),  # fmt: skip
        (["parallel.context_parallel=2", "parallel.tensor_parallel=4", "parallel.sequence_parallel=true",
          "model.seq_len=4"], "must be a multiple of parallel.tensor_parallel=4"),  # fmt: skip
    ],
)
def test_impossible_context_parallel_layouts_are_refused_in_one_line(overrides, needle):
    with pytest.raises(Sad3Error) as err:
        load_config("configs/demo.yaml", ["data.framing=documents", *overrides])
    assert needle in str(err.value) and "\n" not in str(err.value)


def _run_cases(launch, tmp_path: Path, cases: dict[str, list[str]], nproc: int) -> dict:
    base = ["configs/demo.yaml", *launch.overrides, "train.ema_decay=0", "train.grad_accum_steps=1"]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps({name: [*base, *extra] for name, extra in cases.items()}))
    out = tmp_path / "out.json"
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={launch.free_port()}",
           "tests/workers/context_parallel_step.py", str(spec), str(out), str(tmp_path / "runs")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=launch.env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_equal_to_unsplit(results: dict, cases: dict, cp: int) -> None:
    assert sorted(results) == sorted(cases)
    for name, r in results.items():
        assert r["cp"] == cp, name
        assert r["loss"] <= TOLERANCE, (name, r["loss"])
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] <= TOLERANCE, (name, worst, r["grads"][worst])
        # 2 layers × 10 + embedding + final norm (2) + output layer; the Qwen3-style block: 2 layers × 10
        # (RMSNorm and QK-norm weights, the MLP biases kept) + the tied embedding + the final norm
        assert len(r["grads"]) == (22 if name.startswith("qwen3-style") else 24), name


CP2 = ["parallel.context_parallel=2"]


@pytest.mark.slow
def test_context_parallel_step_equals_the_unsplit_step(launch, tmp_path):
    """CP = 2 on 2 processes, the trainer's step: L' = 4, MDLM (L' = L), the AR baseline (L - 1 rows, one
    pad row), each with rows packed by document too, L' = 4 under selective and full activation
    checkpointing, with the adaptation switches, and a Qwen3-style block (grouped-query attention,
    SwiGLU, QK-norm, tied embeddings). Loss and every gradient equal the plain network's, unsplit, to
    1e-6 (fp32)."""
    cases = {
        "block4": [*CP2],
        "mdlm": [*CP2, "diffusion.block_size=32"],
        "ar": [*CP2, "diffusion.objective=ar"],
        "block4-documents": [*CP2, "data.packing=document"],
        "mdlm-documents": [*CP2, "diffusion.block_size=32", "data.packing=document"],
        "ar-documents": [*CP2, "diffusion.objective=ar", "data.packing=document"],
        "block4-selective": [*CP2, "train.activation_checkpointing=selective"],
        "block4-full": [*CP2, "train.activation_checkpointing=full"],
        # the adaptation switches (docs/adaptation.md) and a modern decoder (docs/hf.md)
        "shift-complementary-uniform": [*CP2, "diffusion.shift=true", "diffusion.complementary_masks=true",
                                        "diffusion.loss_weighting=uniform"],  # fmt: skip
        "causal-clean-ar-loss": [*CP2, "diffusion.clean_attention=causal", "diffusion.ar_loss_weight=1.0"],
        "qwen3-style": [*CP2, "model.norm=rmsnorm", "model.mlp=swiglu", "model.num_kv_heads=2",
                        "model.qk_norm=true", "model.tie_embeddings=true"],  # fmt: skip
    }
    _assert_equal_to_unsplit(_run_cases(launch, tmp_path, cases, 2), cases, 2)


@pytest.mark.slow
def test_context_parallel_composes_with_tensor_and_data_parallel(launch, tmp_path):
    """4 processes: CP = 2 × TP = 2 (with and without sequence parallelism), CP = 2 × DP = 2 under
    ZeRO-2 and ZeRO-3 (gradients averaged, parameters partitioned over DP × CP), and CP = 4."""
    cases = {
        "cp2-tp2": [*CP2, "parallel.tensor_parallel=2"],
        "cp2-tp2-sp": [*CP2, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
        "cp2-dp2-zero2": [*CP2, "parallel.zero_stage=2"],
        "cp2-dp2-zero3-documents": [*CP2, "parallel.zero_stage=3", "data.packing=document"],
    }
    results = _run_cases(launch, tmp_path, cases, 4)
    assert {name: r["dp"] for name, r in results.items()} == {"cp2-tp2": 1, "cp2-tp2-sp": 1, "cp2-dp2-zero2": 2,
                                                                "cp2-dp2-zero3-documents": 2}  # fmt: skip
    _assert_equal_to_unsplit(results, cases, 2)


def _closed_form_pairs(rows: torch.Tensor, seq_len: int, block_size: int) -> int:
    """Keys a query of x_t ⊕ x sees: a noisy one of block b its own noisy block and b earlier clean blocks,
    a clean one the b + 1 clean blocks up to its own: (b + 1)·L' either way."""
    block = torch.where(rows >= seq_len, rows - seq_len, rows) // block_size
    return int(((block + 1) * block_size).sum())


@pytest.mark.slow
def test_the_balance_tool_finds_every_rank_within_5_percent_of_the_mean():
    """tools/cp_balance.py counts visible pairs from each rank's mask; L = 8192, L' = 4 and 16, C = 2, 4, 8.
    Its counts are the closed form's, and the zig-zag is exact: every rank does the mean work."""
    balance = runpy.run_path(str(ROOT / "tools" / "cp_balance.py"))["balance"]
    for block_size in (4, 16):
        for cp in (2, 4, 8):
            work = balance("sad3", 8192, block_size, cp)
            pairs = [w[0] for w in work]
            expected = [_closed_form_pairs(RowLayout(16384, 8192, cp, r).local, 8192, block_size) for r in range(cp)]
            assert pairs == expected, (block_size, cp)
            assert sum(pairs) == _closed_form_pairs(torch.arange(16384), 8192, block_size)
            for column in zip(*work, strict=True):  # all layers, the last layer, FlexAttention tiles
                assert max(column) / (sum(column) / cp) <= 1.05, (block_size, cp, column)


def _train_jobs(launch, jobs: list, nproc: int, tmp_path: Path) -> None:
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={launch.free_port()}",
           "tests/workers/train_jobs.py", str(spec)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=launch.env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_checkpoint_resumes_across_context_parallel_sizes_and_the_guard_skips_on_every_rank(launch, tmp_path):
    """2 processes, global batch 8: CP = 2 (one replica, 2 accumulated micro-batches) and CP = 1 (DP = 2)
    train alike step by step; each one's step-2 checkpoint resumed on the other layout gives its step-3
    loss. A NaN loss on one CP rank skips the step on both."""
    args = ["configs/demo.yaml", *launch.overrides, "train.ema_decay=0", "train.steps=3", "train.save_interval=2"]
    cp2, cp1 = ["parallel.context_parallel=2", "train.grad_accum_steps=2"], ["train.grad_accum_steps=1"]
    step2 = "checkpoints/step_0000002"
    jobs = [
        [*args, *cp2, f"run.out_dir={tmp_path / 'cp2'}"],
        [*args, *cp1, f"run.out_dir={tmp_path / 'cp1'}"],
        [*args, *cp1, f"run.out_dir={tmp_path / 'cp2-then-cp1'}", f"train.resume={tmp_path / 'cp2' / step2}"],
        [*args, *cp2, f"run.out_dir={tmp_path / 'cp1-then-cp2'}", f"train.resume={tmp_path / 'cp1' / step2}"],
        {"argv": [*args, *cp2, "train.save_interval=1", "train.keep_last=3", f"run.out_dir={tmp_path / 'nan'}"], "fault": "nan_loss:step=2:rank=1", "exit": 0},
    ]  # fmt: skip
    _train_jobs(launch, jobs, 2, tmp_path)
    for key in ("loss", "grad_norm"):
        ours, theirs = launch.losses(tmp_path / "cp2", key), launch.losses(tmp_path / "cp1", key)
        assert sorted(ours) == sorted(theirs) == [1, 2, 3]
        for step, value in theirs.items():
            assert ours[step] == pytest.approx(value, rel=1e-5, abs=1e-5), (key, step)
    for resumed, straight in (("cp2-then-cp1", "cp2"), ("cp1-then-cp2", "cp1")):
        assert sorted(launch.losses(tmp_path / resumed)) == [3]
        assert launch.losses(tmp_path / resumed)[3] == pytest.approx(launch.losses(tmp_path / straight)[3], rel=1e-5)
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped"] for r in records if "skipped" in r}
    assert skipped == {1: False, 2: True, 3: False}
    assert launch.losses(tmp_path / "nan")[1] == pytest.approx(launch.losses(tmp_path / "cp2")[1], rel=1e-6)
    weights = [load_file(str(tmp_path / "nan" / "checkpoints" / f"step_000000{s}" / "model.safetensors")) for s in (1, 2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
