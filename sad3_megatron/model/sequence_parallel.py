"""Sequence parallelism (Korthikanti et al., 2022) for x_θ, on megatron-core's region mappings.

With tensor parallelism, the LayerNorms, dropout and residual adds are replicated on every TP rank.
Sequence parallelism splits them along the sequence instead, so each rank holds 1/TP of their
activations. megatron-core's linears do the layout changes when built with `sequence_parallel`:
- a column-parallel linear all-gathers the sequence going in;
- a row-parallel linear reduce-scatters it coming out.
So attention always sees the whole doubled sequence x_t ⊕ x and the block mask is unchanged.

This module holds the three things the model adds:
- splitting the embeddings along the sequence;
- re-splitting when the last layer keeps only the noisy half;
- summing over TP ranks the gradients of parameters used on sequence slices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch import nn


def split_sequence(h: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[s, b, h] → this rank's [s/TP, b, h] slice (all-gather of the gradient backward)."""
    return tensor_parallel.scatter_to_sequence_parallel_region(h) if sequence_parallel else h


def first_rows(h: torch.Tensor, n: int, sequence_parallel: bool) -> torch.Tensor:
    """The first n rows of the sequence. Under sequence parallelism h is this rank's slice, and the
    result is this rank's slice of those n rows."""
    if not sequence_parallel:
        return h[:n]
    if n == h.shape[0] * parallel_state.get_tensor_model_parallel_world_size():
        return h
    whole = tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
    return tensor_parallel.scatter_to_sequence_parallel_region(whole[:n])


def sum_grads_over_tensor_parallel(params: list[nn.Parameter]) -> int:
    """Hook each parameter so that its gradient is summed over the TP group inside backward (gradient
    accumulation and ZeRO then see finished gradients). Returns how many parameters are hooked."""
    group = parallel_state.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in params:
        p.register_hook(all_reduce)
    return len(params)


def sum_sequence_parallel_grads(model: nn.Module) -> int:
    """Sum over the TP group the gradients of parameters that are replicated across TP ranks but see only
    this rank's sequence slice: the norms and the row-parallel biases (and QK-norm's weights, which see
    only this rank's heads). Returns how many parameters are hooked."""
    replicated = [p for p in model.parameters() if p.requires_grad and not getattr(p, "tensor_model_parallel", False)]
    return sum_grads_over_tensor_parallel(replicated)


def sum_head_sharded_grads(model: nn.Module) -> int:
    """Without sequence parallelism: sum over the TP group the gradients of the parameters applied to
    this rank's heads only (QK-norm's weights, shared by all heads), as megatron-core does for its
    q/k layernorms. Returns how many parameters are hooked."""
    return sum_grads_over_tensor_parallel([p for p in model.parameters() if getattr(p, "sums_over_heads", False)])
