"""A `_forward_impl` for megatron-core's ColumnParallelLinear and RowParallelLinear, built on
megatron-core's public region mappings with the matmul passed in.

megatron-core's own implementation overlaps communication with compute, but it allocates its
sequence-parallel buffers on CUDA. This one keeps the same tensor- and sequence-parallel contract
and serves two cases:
- fp8 matmuls (model/fp8.py);
- sequence parallelism over gloo on CPU, where it is tested against the single-process run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import mappings

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [..., in], W [out, in]) -> x Wᵀ


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, weight.t())


def _saved_as_slice(whole: torch.Tensor, local: torch.Tensor, group) -> torch.autograd.graph.saved_tensors_hooks:
    """Keep only this rank's slice of the all-gathered input for backward and gather it again there,
    as megatron-core does: otherwise sequence parallelism would save the whole sequence per linear."""
    group = group or parallel_state.get_tensor_model_parallel_group()

    def pack(t: torch.Tensor):
        if t.data_ptr() == whole.data_ptr() and t.numel() == whole.numel():
            return (local.detach(), t.shape)
        return t

    def unpack(saved):
        if isinstance(saved, tuple):
            slice_, shape = saved
            return mappings._gather_along_first_dim(slice_, group).view(shape)
        return saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def forward_impl(matmul: Matmul) -> Callable[..., torch.Tensor]:
    def impl(
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gradient_accumulation_fusion: bool = False,
        allreduce_dgrad: bool = False,
        sequence_parallel: bool = False,
        tp_group=None,
        **_: object,
    ) -> torch.Tensor:
        if sequence_parallel:  # all-gather the sequence forward, reduce-scatter its gradient backward
            whole = tensor_parallel.gather_from_sequence_parallel_region(input, True, group=tp_group)
            with _saved_as_slice(whole, input, tp_group):
                out = matmul(whole, weight)
        else:
            if allreduce_dgrad:  # identity forward, all-reduce of the input gradient backward
                input = tensor_parallel.copy_to_tensor_model_parallel_region(input, group=tp_group)
            out = matmul(input, weight)
        return out + bias.to(out.dtype) if bias is not None else out

    return impl


def set_forward_impl(linears: list[torch.nn.Module], matmul: Matmul) -> None:
    impl = forward_impl(matmul)
    for linear in linears:
        linear._forward_impl = impl
