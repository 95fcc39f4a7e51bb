"""Masking noise schedules and the sampling of diffusion times.

A schedule gives the mask rate 1 - α_t of the per-token forward process
q(x_t | x) = Cat(x_t; α_t x + (1 - α_t) m) (Sec. 4.1) and the NELBO weight of Eq. 7,
-α'_t / (1 - α_t) (written positive: the loss is weight × cross-entropy).

Times are drawn in (t_min, t_max] ⊂ (0, 1]. Training may clip that range
(Sec. 5.2: mask rates 1 - α_t ~ U[β, ω] for the linear schedule); evaluation always
uses the full range (0, 1], for which Eq. 7 is a bound on -log p(x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import Sad3Error

_E_MINUS_1 = math.e - 1.0


@dataclass(frozen=True)
class NoiseSchedule:
    """One masking schedule α_t with t ∈ (0, 1] and the range (t_min, t_max] that times are drawn from."""

    name: str
    t_min: float = 0.0
    t_max: float = 1.0

    def mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        """1 - α_t: the probability that a token is masked at time t."""
        if self.name in ("linear", "clipped"):
            return t
        if self.name == "cosine":
            return 1.0 - torch.cos(0.5 * math.pi * t)
        if self.name == "square":
            return t * t
        if self.name == "sqrt":
            return torch.sqrt(t)
        if self.name == "log":
            return torch.log1p(_E_MINUS_1 * t)
        raise AssertionError(self.name)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-α'_t / (1 - α_t), the per-token weight of the cross-entropy in Eq. 7/8."""
        if self.name in ("linear", "clipped"):
            return 1.0 / t  # α_t = 1 - t, α'_t = -1 (Suppl. B, Eq. 11)
        if self.name == "cosine":
            half_pi = 0.5 * math.pi
            return half_pi * torch.sin(half_pi * t) / (1.0 - torch.cos(half_pi * t))
        if self.name == "square":
            return 2.0 / t
        if self.name == "sqrt":
            return 0.5 / t
        if self.name == "log":
            u = 1.0 + _E_MINUS_1 * t
            return _E_MINUS_1 / (u * torch.log(u))
        raise AssertionError(self.name)

    def sample_t(
        self, shape: tuple[int, ...], generator: torch.Generator | None, antithetic: bool = True
    ) -> torch.Tensor:
        """Draw times in (t_min, t_max], one per entry of `shape` (one per block in Alg. 1).

        Antithetic (stratified) sampling spreads the n = prod(shape) draws over n equal strata
        of [0, 1) with one shared uniform offset, which lowers the variance of the NELBO
        estimate of Eq. 8 without biasing it (each draw is still marginally uniform).
        """
        n = math.prod(shape)
        if antithetic:
            offset = torch.rand((), generator=generator)
            u = (torch.arange(n, dtype=torch.float64) / n + offset) % 1.0
            u = u[torch.randperm(n, generator=generator)]
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        # 1 - u lies in (0, 1], so t never reaches t_min: with t_min = 0 the weight stays finite.
        t = self.t_min + (self.t_max - self.t_min) * (1.0 - u)
        return t.to(torch.float32).reshape(shape)

    @property
    def is_full_range(self) -> bool:
        return self.t_min == 0.0 and self.t_max == 1.0


SCHEDULES = ("linear", "cosine", "log", "sqrt", "square", "clipped")


def make_schedule(name: str, beta: float = 0.0, omega: float = 1.0) -> NoiseSchedule:
    """Build a schedule from its config name; `clipped` draws mask rates from U[β, ω] (Sec. 5.2).

    `clipped` with β = ω = 1 masks every token: with L' = 1 its NELBO is the AR NLL (Suppl. B, Eq. 17-19).
    """
    if name not in SCHEDULES:
        raise Sad3Error(f"unknown noise schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if name != "clipped":
        return NoiseSchedule(name)
    if not 0.0 <= beta <= 1.0 or not 0.0 <= omega <= 1.0:
        raise Sad3Error(f"clipped schedule needs 0 <= beta, omega <= 1 (got beta={beta}, omega={omega})")
    if beta > omega:
        raise Sad3Error(f"clipped schedule needs beta <= omega (got beta={beta} > omega={omega}): swap them")
    if omega == 0.0:
        raise Sad3Error("clipped schedule needs omega > 0: with omega = 0 no token is ever masked")
    return NoiseSchedule("clipped", t_min=beta, t_max=omega)


def evaluation_schedule() -> NoiseSchedule:
    """The schedule every bound is reported under: linear, t ~ U[0, 1] (Sec. 6, Table 7 caption)."""
    return NoiseSchedule("linear")
