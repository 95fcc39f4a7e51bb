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
from megatron.core import tensor_parallel

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [..., in], W [out, in]) -> x Wᵀ


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, weight.t())


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
            input = tensor_parallel.gather_from_sequence_parallel_region(input, True, group=tp_group)
        elif allreduce_dgrad:  # identity forward, all-reduce of the input gradient backward
            input = tensor_parallel.copy_to_tensor_model_parallel_region(input, group=tp_group)
        out = matmul(input, weight)
        return out + bias.to(out.dtype) if bias is not None else out

    return impl


def set_forward_impl(linears: list[torch.nn.Module], matmul: Matmul) -> None:
    impl = forward_impl(matmul)
    for linear in linears:
        linear._forward_impl = impl
