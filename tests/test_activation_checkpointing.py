"""Activation checkpointing (train.activation_checkpointing): the same gradients as the plain layers,
and the recomputation each mode promises, counted op by op during backward."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.objectives import BlockDiffusionObjective
from sad3_megatron.core.schedules import make_schedule
from sad3_megatron.model.activation_checkpointing import apply_activation_checkpointing

L = 32


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def loss_grads_and_backward_ops(tiny, mode: str, dropout: float = 0.0):
    model = tiny.model(seed=0, layers=2, hidden=64)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    model.train()
    assert apply_activation_checkpointing(model, mode) == (0 if mode == "none" else 2)
    objective = BlockDiffusionObjective(L, 4, make_schedule("linear"), tiny.mask_id)
    torch.manual_seed(123)  # the dropout masks
    loss = objective(model, tiny.tokens(4, L), torch.Generator().manual_seed(0)).loss
    counter = OpCounter()
    with counter:
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], counter.counts


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpointed_layers_give_the_plain_gradients(tiny, dropout):
    plain_loss, plain_grads, _ = loss_grads_and_backward_ops(tiny, "none", dropout)
    for mode in ("selective", "full"):
        loss, grads, _ = loss_grads_and_backward_ops(tiny, mode, dropout)
        assert torch.equal(loss, plain_loss), mode
        for a, b in zip(grads, plain_grads, strict=True):
            assert (a - b).abs().max() <= 1e-7, mode  # the recomputed forward replays the same dropout masks


def test_each_mode_recomputes_what_it_promises(tiny):
    """Full replays each layer's forward in backward (its matmuls and GELUs run again); selective
    replays only the elementwise work (GELU again, no extra matmul); none replays nothing."""
    _, _, plain = loss_grads_and_backward_ops(tiny, "none")
    _, _, selective = loss_grads_and_backward_ops(tiny, "selective")
    _, _, full = loss_grads_and_backward_ops(tiny, "full")
    forward_matmuls_per_layer = 4  # qkv, proj, fc1, fc2
    assert plain["gelu"] == 0 and selective["gelu"] == 2 and full["gelu"] == 2
    matmuls = {name: c["mm"] + c["addmm"] + c["bmm"] for name, c in (("plain", plain), ("sel", selective), ("full", full))}
    assert matmuls["sel"] == matmuls["plain"]
    assert matmuls["full"] == matmuls["plain"] + 2 * forward_matmuls_per_layer


def test_unknown_mode_is_one_clear_error(tiny):
    with pytest.raises(Sad3Error, match="activation_checkpointing"):
        apply_activation_checkpointing(tiny.model(), "sometimes")


@pytest.mark.slow
def test_compiled_layers_match_eager_on_cpu_inductor(tiny):
    """train.compile: each layer compiled by inductor (CPU here) gives the eager loss and gradients."""
    from sad3_megatron.model.compile import compile_layers

    objective = BlockDiffusionObjective(L, 4, make_schedule("linear"), tiny.mask_id)
    x = tiny.tokens(4, L)
    results = []
    for compiled in (False, True):
        model = tiny.model(seed=0, layers=2, hidden=64).train()
        if compiled:
            assert compile_layers(model) == 2
        loss = objective(model, x, torch.Generator().manual_seed(0)).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert abs(compiled_loss - eager_loss) <= 1e-5
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_training_with_checkpointed_layers_reproduces_the_plain_run(tmp_path):
    """train.activation_checkpointing through the DeepSpeed engine, with dropout: the same losses."""
    import json

    from sad3_megatron.config import load_config
    from sad3_megatron.engine.trainer import train

    common = [
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64",
        "model.seq_len=32", "model.dropout=0.2", "train.micro_batch_size=4", "train.steps=3", "train.log_interval=1",
        "train.eval_interval=1000", "train.progress_bar=false", "train.ema_decay=0",
    ]  # fmt: skip
    losses = {}
    for mode in ("none", "selective"):
        out = tmp_path / mode
        train(load_config("configs/demo.yaml", [*common, f"run.out_dir={out}", f"train.activation_checkpointing={mode}"]))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["none"]) == 3 and losses["selective"] == losses["none"]
