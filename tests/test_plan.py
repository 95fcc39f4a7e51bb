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


def test_context_parallel_splits_the_rows_but_not_the_gathered_keys_and_values():
    """CP = 2 on 16 GPUs is DP = 8; ZeRO-3 partitions over all 16 as with DP = 16; a layer keeps
    (30/C + 4)·sbh of its 34·sbh (the keys/values attention keeps are those of all rows); the logits
    are of this rank's scored rows."""
    base = ["model.preset=small", "model.seq_len=4096", "train.micro_batch_size=1", "parallel.zero_stage=3"]
    one = make_plan(load_config("configs/owt.yaml", base, stage="finetune"), 16, 50258)
    two = make_plan(load_config("configs/owt.yaml", [*base, "parallel.context_parallel=2"], stage="finetune"), 16, 50258)
    assert (one.dp, two.dp, two.cp) == (16, 8, 2)
    assert "world size 16 = TP 1 × CP 2 × PP 1 × DP 8" in two.lines()[0]
    for part in ("weights", "grads", "adam", "ema"):
        assert two.memory_gib[part] == pytest.approx(one.memory_gib[part])
    assert two.memory_gib["activations"] / one.memory_gib["activations"] == pytest.approx((30 / 2 + 4) / 34)
    assert two.memory_gib["logits"] == pytest.approx(one.memory_gib["logits"] / 2)


def test_the_longest_context_doubles_about_with_context_parallelism_under_full_checkpointing():
    from sad3_megatron.engine.plan import longest_context, memory_estimate, parameter_count

    longest = {}
    for cp in (1, 2):
        overrides = ["model.preset=small", "train.activation_checkpointing=full", "parallel.zero_stage=3",
                     "model.loss_chunk_tokens=4096", f"parallel.context_parallel={cp}"]  # fmt: skip
        cfg = load_config("configs/owt.yaml", overrides, stage="finetune")
        longest[cp] = longest_context(cfg, 80.0, 50258)
        for seq_len, fits in ((longest[cp], True), (longest[cp] + 1024, False)):  # the boundary of the estimate
            trial = load_config("configs/owt.yaml", [*overrides, f"model.seq_len={seq_len}", "train.micro_batch_size=1"],
                                stage="finetune")  # fmt: skip
            total = memory_estimate(trial, parameter_count(trial, 50258), 1, vocab_size=50258)["total"]
            assert (total <= 80.0) == fits, (cp, seq_len)
    assert 1.7 < longest[2] / longest[1] <= 2.0
