"""Exponential moving average of the weights, kept in fp32 beside the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # The warmup (1 + n) / (10 + n) keeps early averages from being dominated by the random init.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into `model` (for evaluation)."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(backup[name])

    def load_state_dict(self, shadow: dict[str, torch.Tensor], updates: int) -> None:
        """Restore the averages (saved as ema.safetensors) and the update count."""
        self.updates = updates
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
