"""Tensor-parallel shards → one state dict in the TP = 1 layout (what evaluation, sampling and the
HuggingFace export load). Called collectively by every rank of a tensor-parallel group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn


def gather_tensor_parallel(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Concatenate each sharded tensor over the TP group along its partition dimension.

    `tensors` is keyed like model.named_parameters() (the model weights or their EMA); the layout
    of q/k/v per head makes the concatenation the TP = 1 layout exactly.
    """
    params = dict(model.named_parameters())
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, value in tensors.items():
        value = value.detach().to("cpu", torch.float32, copy=True).contiguous()  # a copy: never a live view
        param = params.get(name)
        if tp > 1 and param is not None and getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(pieces, value, group=parallel_state.get_tensor_model_parallel_group())
            value = torch.cat(pieces, dim=param.partition_dim)
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
        param = params.get(name)
        if tp > 1 and param is not None and getattr(param, "tensor_model_parallel", False):
            value = value.chunk(tp, dim=param.partition_dim)[rank]
        out[name] = value
    return out
