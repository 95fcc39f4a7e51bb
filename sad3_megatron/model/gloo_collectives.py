"""megatron-core's tensor- and sequence-parallel collectives on gloo, so those layouts run and are
tested on CPU.

megatron-core allocates the all-gather and reduce-scatter buffers of its mappings on CUDA, and gloo
has no reduce-scatter. On a gloo group, the two first-dimension collectives (sequence parallelism)
and the last-dimension all-gather (the vocabulary-parallel logits gathered whole) are replaced by
equivalents built from collectives gloo has: an all-gather into a list, and an all-reduce followed by
taking this rank's slice. The column-parallel linears are routed through model/tp_linear.py, whose
mappings use them. NCCL runs keep megatron-core's own code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, mappings
from torch import nn

from sad3_megatron.model.tp_linear import dense_matmul, set_forward_impl


def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    if group.size() == 1:
        return input_
    if output_split_sizes is not None:
        raise NotImplementedError("uneven sequence splits are not used by sad3")
    parts = [torch.empty_like(input_) for _ in range(group.size())]
    dist.all_gather(parts, input_.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    if group.size() == 1:
        return input_
    if input_split_sizes is not None:
        raise NotImplementedError("uneven sequence splits are not used by sad3")
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total.chunk(group.size(), dim=0)[group.rank()].contiguous()


def _gather_along_last_dim(input_, group):
    if group.size() == 1:
        return input_
    parts = [torch.empty_like(input_) for _ in range(group.size())]
    dist.all_gather(parts, input_.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def use_gloo_tensor_parallel() -> None:
    """Gather vocabulary-parallel logits whole on a gloo tensor-parallel group."""
    mappings._gather_along_last_dim = _gather_along_last_dim


def use_gloo_sequence_parallel(model: nn.Module) -> None:
    """Make `model`'s sequence-parallel layers run on a gloo tensor-parallel group."""
    use_gloo_tensor_parallel()
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
    set_forward_impl([m for m in model.modules() if isinstance(m, ColumnParallelLinear)], dense_matmul)
