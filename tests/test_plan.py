"""The dry-run plan: parameter count against a built model, batch arithmetic, memory by ZeRO stage."""

import pytest
import torch

from sad3_megatron.cli import main
from sad3_megatron.config import load_config
from sad3_megatron.engine.plan import make_plan, parameter_count
from sad3_megatron.model.build import build_model
from sad3_megatron.model.transformer import make_spec


def test_parameter_count_matches_the_built_model():
    cfg = load_config("configs/demo.yaml", ["model.num_layers=2"])
    spec = make_spec(cfg.model, 30522, 103, "sdpa")
    model = build_model(spec, torch.device("cpu"))
    assert parameter_count(cfg, 30522) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["small", "llama3.2-1b", "llama3-8b", "qwen2.5-0.5b", "qwen3-0.6b", "qwen3-8b"])
def test_parameter_count_is_exact_for_every_architecture(preset):
    """Grouped-query q/k/v rows, SwiGLU's three matrices, QK-norm, biases, tied and imported tables: the
    plan's count against the trainer's model of two layers of the preset's shape, built on the meta device."""
    cfg = load_config("configs/demo.yaml", [f"model.preset={preset}", "model.num_layers=2"])
    with torch.device("meta"):
        model = build_model(make_spec(cfg.model, 30522, 103, "sdpa"), torch.device("meta"))
    assert parameter_count(cfg, 30522) == sum(p.numel() for p in model.parameters())


def test_plan_batch_arithmetic_and_zero_memory_ordering():
    base = ["model.preset=small", "model.seq_len=1024", "train.global_batch_size=512", "train.micro_batch_size=8"]
    totals = []
    for stage in range(4):
        cfg = load_config("configs/demo.yaml", [*base, f"parallel.zero_stage={stage}", "train.ema_decay=0"])
        plan = make_plan(cfg, world_size=16, vocab_size=50258)
        assert (plan.dp, plan.grad_accum, plan.global_batch) == (16, 4, 512)
        totals.append(plan.memory_gib["weights"] + plan.memory_gib["grads"] + plan.memory_gib["adam"])
    assert totals[0] > totals[1] > totals[2] > totals[3]


def test_dry_run_prints_the_plan(capsys):
    assert main(["train", "configs/owt.yaml", "--dry-run", "--world-size", "64", "train.micro_batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "world size 64 = TP 1 × PP 1 × DP 64" in out and "global 512 sequences" in out and "memory per GPU" in out


def test_dry_run_rejects_an_impossible_global_batch(capsys):
    assert main(["train", "configs/owt.yaml", "--dry-run", "--world-size", "64"]) == 2
    assert "not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_recipe_stages_resolve(stage):
    cfg = load_config("configs/owt.yaml", stage=stage)
    assert cfg.diffusion.block_size == (1024 if stage == "pretrain" else 4)
    assert (cfg.train.steps, bool(cfg.train.init_from)) == (
        (850_000, False) if stage == "pretrain" else (150_000, True)
    )


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_largest_micro_batch_is_the_boundary_of_the_memory_estimate(checkpointing):
    """The dry run's "largest micro-batch within 80 GiB" is the last size whose estimate fits."""
    from dataclasses import replace

    from sad3_megatron.engine.plan import memory_estimate

    cfg = load_config("configs/owt.yaml", ["model.preset=xl", f"train.activation_checkpointing={checkpointing}"])
    plan = make_plan(cfg, world_size=8, vocab_size=50258, gpu_memory_gib=80.0)
    for stage, largest in plan.fits.items():
        assert largest > 0
        for micro, fits in ((largest, True), (largest + 1, False)):
            trial = replace(cfg, train=replace(cfg.train, micro_batch_size=micro), parallel=replace(cfg.parallel, zero_stage=stage))
            total = memory_estimate(trial, plan.parameters, plan.dp, vocab_size=50258)["total"]
            assert (total <= 80.0) == fits, (stage, micro)
    assert plan.fits[3] >= plan.fits[1]


def test_activation_checkpointing_shrinks_the_activation_estimate():
    activations = {}
    for mode in ("none", "selective", "full"):
        cfg = load_config("configs/owt.yaml", ["model.preset=xl", f"train.activation_checkpointing={mode}"])
        activations[mode] = make_plan(cfg, 8, 50258).memory_gib["activations"]
    assert activations["none"] > activations["selective"] > activations["full"] > 0
    assert activations["selective"] / activations["none"] == pytest.approx(20 / 34)
