"""Exponential moving average of the weights, kept in fp32 beside the model.

Under ZeRO-3 each rank averages only its partition of every parameter (`ds_tensor`), so the EMA is
sharded like the weights. Applying it for evaluation writes each parameter through DeepSpeed's
GatheredParameters, and checkpoints read it back one parameter at a time, so no rank ever holds a
whole copy of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import deepspeed
import torch
import torch.distributed as dist
from torch import nn


def _zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def _values(p: nn.Parameter) -> torch.Tensor:
    """The values this rank holds: the whole parameter, or its ZeRO-3 partition."""
    return p.ds_tensor if _zero3(p) else p


def _whole(part: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    """All-gather a ZeRO-3 partition of `p`'s shape into the whole tensor."""
    if not _zero3(p):
        return part
    pieces = [torch.empty_like(part) for _ in range(dist.get_world_size(group=p.ds_process_group))]
    dist.all_gather(pieces, part.contiguous(), group=p.ds_process_group)
    return torch.cat(pieces)[: p.ds_numel].view(p.ds_shape)


def _local_part(whole: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a whole tensor: a slice of the flattened tensor, zero-padded."""
    if not _zero3(p):
        return whole
    size = p.ds_tensor.numel()
    start = size * dist.get_rank(group=p.ds_process_group)
    part = torch.zeros(size, dtype=whole.dtype)
    chunk = whole.flatten()[start : start + size]
    part[: chunk.numel()] = chunk
    return part


@torch.no_grad()
def _assign(params: dict[str, nn.Parameter], parts: dict[str, torch.Tensor]) -> None:
    """Set each parameter from this rank's values of it (whole, or its ZeRO-3 partition)."""
    for name, p in params.items():
        if _zero3(p):
            whole = _whole(parts[name], p)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(whole)
        else:
            p.copy_(parts[name])


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: _values(p).detach().float().clone() for name, p in model.named_parameters()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # The warmup (1 + n) / (10 + n) keeps early averages from being dominated by the random init.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(_values(p).detach().float(), 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into `model` (for evaluation)."""
        params = dict(model.named_parameters())
        backup = {name: _values(p).detach().clone() for name, p in params.items()}
        _assign(params, self.shadow)
        try:
            yield
        finally:
            _assign(params, backup)

    def whole(self, name: str, p: nn.Parameter) -> torch.Tensor:
        """The average of parameter `name` as a whole tensor (gathered over ZeRO-3 partitions)."""
        return _whole(self.shadow[name], p)

    def load_state_dict(self, shadow: dict[str, torch.Tensor], model: nn.Module, updates: int) -> None:
        """Restore the averages (this rank's tensor-parallel shards of ema.safetensors) and the update count."""
        params = dict(model.named_parameters())
        self.updates = updates
        for name, value in shadow.items():
            self.shadow[name].copy_(_local_part(value, params[name]))
