"""Activation checkpointing of the transformer layers (`train.activation_checkpointing`), applied from
outside the model like the parallel layouts and fp8.

- ``full``: each layer keeps only its input for backward and recomputes its whole forward there.
  Activation memory per layer falls from the (10 + 24/TP)·sbh bytes of Korthikanti et al. (2022) to
  the 2·sbh of its input; the price is one more forward pass (~1/3 more compute).
- ``selective``: each layer keeps the outputs of its matrix multiplications and of the attention
  kernel and recomputes only the cheap elementwise work in backward: the LayerNorms, GELU, dropout
  and rotary rotations, whose outputs are the largest part of what a layer saves besides the
  matmuls. This is torch's selective activation checkpointing (the policy torchtitan's "op" mode
  uses); it costs little compute, since recomputing elementwise ops is bandwidth, not FLOPs.

Recomputation replays the forward with the RNG state it had, so dropout masks are the same, and the
gradients equal those of the plain layer exactly (tested).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from sad3_megatron.core.errors import Sad3Error

MODES = ("none", "selective", "full")

# Ops whose outputs selective checkpointing keeps: the FLOP-heavy ones.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, selective: bool):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and sampling: nothing is saved anyway
            return forward(*args, **kwargs)
        contexts = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls) if selective else None
        extra = {"context_fn": contexts} if contexts is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs, **extra)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Checkpoint every transformer layer of `model` (a SAD3Transformer or pipeline stages) in `mode`;
    returns how many layers were wrapped."""
    if mode not in MODES:
        raise Sad3Error(f"unknown train.activation_checkpointing {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return 0
    from sad3_megatron.model.transformer import TransformerLayer  # the pipeline's stages subclass it

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.forward = _checkpointed(layer.forward, selective=mode == "selective")
    return len(layers)
