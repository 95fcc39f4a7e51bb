"""The masking forward process with one noise level per block (Alg. 1, lines 2-3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedules import NoiseSchedule


@dataclass
class NoisedBatch:
    """x_t = x_{t_1}^1 ⊕ … ⊕ x_{t_B}^B and what the NELBO needs to weight it."""

    t: torch.Tensor  # [b, B] one time per block
    x_t: torch.Tensor  # [b, L] tokens with masked positions set to the mask id
    masked: torch.Tensor  # [b, L] bool
    weight: torch.Tensor  # [b, L] -α'_t / (1 - α_t) of each token's block (Eq. 7)


def per_token(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Broadcast a per-block tensor [b, B] to per-token [b, B·L']."""
    return values.repeat_interleave(block_size, dim=1)


def mask_blocks(
    x: torch.Tensor,
    block_size: int,
    schedule: NoiseSchedule,
    mask_id: int,
    generator: torch.Generator | None,
    antithetic: bool = True,
) -> NoisedBatch:
    """Draw t_b per block and mask each token independently with probability 1 - α_{t_b}.

    Draws are made on the CPU generator, so they do not depend on the device the model runs on.
    """
    batch, length = x.shape
    t = schedule.sample_t((batch, length // block_size), generator, antithetic)
    rate = per_token(schedule.mask_rate(t), block_size)
    masked = torch.rand(rate.shape, generator=generator) < rate
    masked = masked.to(x.device)
    x_t = torch.where(masked, torch.full_like(x, mask_id), x)
    weight = per_token(schedule.loss_weight(t), block_size).to(x.device)
    return NoisedBatch(t.to(x.device), x_t, masked, weight)
