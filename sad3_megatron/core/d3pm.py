"""D3PM (absorbing) with T discrete steps: the NELBO of Eq. 3 (Austin et al., 2021).

For the absorbing process with the reverse model of Eq. 2 under SUBS (the model never predicts
[MASK], unmasked tokens are copied), the KL term of step j (t = j/T, s = (j − 1)/T) is, on each
masked token, (α_s − α_t) / (1 − α_t) · (−log p_θ(x | x_t)); the first and last terms of Eq. 3
vanish (nothing is masked at t = 0; everything is at t = 1 when α_1 = 0). Written as
T · E_{j ~ U{1..T}} (Suppl. A), this is Eq. 7's estimator with t drawn from the grid {1/T, …, 1}
and the weight T (α_s − α_t) / (1 − α_t) in place of −α'_t / (1 − α_t); under the linear schedule
α_t = 1 − t both weights are 1/t. As T → ∞ the sum tends to the continuous-time NELBO (Eq. 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import Sad3Error
from .noising import NoisedBatch
from .objectives import BlockDiffusionObjective
from .schedules import NoiseSchedule


@dataclass(frozen=True)
class DiscreteTimeSchedule:
    """A continuous schedule α_t observed at the T grid times j/T (the D3PM forward process)."""

    base: NoiseSchedule
    steps: int
    masking: str = "bernoulli"  # Eq. 3's forward process masks each token independently

    def sample_t(self, shape: tuple[int, ...], generator: torch.Generator | None, antithetic: bool = True):
        """j ~ U{1..T} as ceil(T·u) of the base draw u ~ U(0, 1] (stratified draws stay stratified)."""
        u = self.base.sample_t(shape, generator, antithetic).double()
        j = torch.ceil(u * self.steps).clamp(1, self.steps)
        return (j / self.steps).to(torch.float32)

    def mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.mask_rate(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """T (α_s − α_t) / (1 − α_t), s = t − 1/T: the KL weight of step j on a masked token (Suppl. A)."""
        t64 = t.double()
        rate_t = self.base.mask_rate(t64)
        rate_s = self.base.mask_rate((t64 - 1.0 / self.steps).clamp(min=0.0))
        return (self.steps * (rate_t - rate_s) / rate_t).to(t.dtype)


class DiscreteTimeObjective(BlockDiffusionObjective):
    """The SAR NELBO with T-step D3PM terms per block: Eq. 3 applied to each block of Eq. 5."""

    def __init__(self, seq_len: int, block_size: int, schedule: NoiseSchedule, mask_id: int, steps: int,
                 antithetic: bool = True, clean_prefix: int = 1):  # fmt: skip
        if steps < 1:
            raise Sad3Error(f"the number of discrete steps T must be at least 1, got {steps}")
        if not schedule.is_full_range or schedule.masking != "bernoulli":
            raise Sad3Error(
                "the D3PM bound needs t over the whole of (0, 1]: use the evaluation schedule (linear, Bernoulli masks)"
            )
        super().__init__(seq_len, block_size, schedule, mask_id, antithetic, clean_prefix)
        self.steps = steps

    def noise(self, x: torch.Tensor, generator: torch.Generator | None, schedule: NoiseSchedule | None = None,
              free: torch.Tensor | None = None) -> NoisedBatch:  # fmt: skip
        """Eq. 3's grid of times, whatever continuous schedule a caller passes (evaluation passes its own)."""
        return super().noise(x, generator, DiscreteTimeSchedule(self.schedule, self.steps), free)
