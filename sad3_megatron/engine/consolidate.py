"""Tensor-parallel shards → one state dict in the TP = 1 layout (what evaluation, sampling and the
HuggingFace export load). Called collectively by every rank of a tensor-parallel group.

A shard is a contiguous block of its tensor's partition dimension, except for strided parameters
(megatron-core's `partition_stride`; SwiGLU's fc1 = [gate; up] has stride 2): there rank r holds
block r of each of the `stride` equal parts, [gate_r; up_r], so the TP = 1 tensor is every rank's
first part, then every rank's second part.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn


def _layout(param: nn.Parameter | None) -> tuple[int, int] | None:
    """(partition dim, stride) of a tensor-parallel parameter, or None for a replicated one."""
    if param is None or not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def merge_shards(pieces: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The whole tensor from its TP shards, in rank order."""
    parts = [piece.chunk(stride, dim=dim) for piece in pieces]
    return torch.cat([part[s] for s in range(stride) for part in parts], dim=dim)


def shard_range(size: int, rank: int, tp: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) ranges along the partition dimension that TP rank `rank` of `tp` holds."""
    part = size // stride
    block = part // tp
    return [(s * part + rank * block, s * part + (rank + 1) * block) for s in range(stride)]


def take_shard(value: torch.Tensor, dim: int, stride: int, rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of a whole tensor (the inverse of `merge_shards`)."""
    ranges = shard_range(value.shape[dim], rank, tp, stride)
    return torch.cat([value.narrow(dim, start, end - start) for start, end in ranges], dim=dim)


def gather_tensor_parallel(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Concatenate each sharded tensor over the TP group along its partition dimension.

    `tensors` is keyed like model.named_parameters() (the model weights or their EMA); the layout
    of q/k/v per key/value group makes the concatenation the TP = 1 layout exactly, and strided
    parameters are interleaved back (`merge_shards`).
    """
    params = dict(model.named_parameters())
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, value in tensors.items():
        value = value.detach().to("cpu", torch.float32, copy=True).contiguous()  # a copy: never a live view
        layout = _layout(params.get(name))
        if tp > 1 and layout is not None:
            pieces = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(pieces, value, group=parallel_state.get_tensor_model_parallel_group())
            value = merge_shards(pieces, *layout)
        out[name] = value
    return out


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent tensors of the model's state dict (megatron adds non-tensor extra state)."""
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def shard_tensor_parallel(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `gather_tensor_parallel`: this rank's slice of each consolidated tensor."""
    params = dict(model.named_parameters())
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    out = {}
    for name, value in tensors.items():
        layout = _layout(params.get(name))
        if tp > 1 and layout is not None:
            value = take_shard(value, *layout, rank, tp)
        out[name] = value
    return out
