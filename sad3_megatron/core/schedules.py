"""Masking noise schedules, the sampling of diffusion times, and how a block's masked set is drawn.

A schedule gives the mask rate 1 - α_t of the per-token forward process
q(x_t | x) = Cat(x_t; α_t x + (1 - α_t) m) (Sec. 4.1) and the NELBO weight of Eq. 7,
-α'_t / (1 - α_t) (written positive: the loss is weight × cross-entropy).

Times are drawn in (t_min, t_max] ⊂ (0, 1]. Training may clip that range (Sec. 5.2: mask rates
1 - α_t ~ U[β, ω] for the linear schedule) and, like MDLM and the reference code, keeps t above a
small floor (`t_floor`, 1e-3): with weight 1/t and P(a block holds a masked token) ~ L' t, the
second moment of the estimate, ∫ (1/t)² · L' t dt, diverges at t → 0.

**The clipped weight.** The paper states two weights for U[β, ω]: Sec. 5.2 reads the clipped
schedule as a continuous one with α'_t ≈ β - ω inside the range, Suppl. B uses 1/(1 - α_t) = 1/t.
sad3 uses 1/t, as the reference code does (its loss scale is -1/t for the clipped range): the loss
is then the average over mask rates r ∈ [β, ω] of the linear schedule's integrand, so clipped
losses are on the NELBO's scale, and β = ω = 1 gives weight 1, the AR NLL of Suppl. B (Eq. 17-19),
where Sec. 5.2's (ω - β)/t would give 0. (ω - β)/t differs from 1/t by the constant ω - β only,
which rescales the loss (and its variance by (ω - β)²), so the variance search compares
candidates under 1/t, the weight they train with. The reference code switches to weight 1 when
β > 0.5; that only ever matters there for its L' = 1, β = ω = 1 case (its search grid keeps β ≤ 0.5),
where 1/t = 1 as well, so sad3 has no such switch.

**Masking** (`NoiseSchedule.masking`), how the masked set of a block of n free tokens is drawn:
- `bernoulli` (Alg. 1, line 3): every token independently with probability 1 - α_{t_b}.
- `resample`: the reference code's realised-rate resampling — Bernoulli masks redrawn until the
  masked fraction k/n lies in [1 - α_{t_min}, 1 - α_{t_max}] (= [β, ω] when clipped). Drawn exactly and
  without a loop: k from Binomial(n, 1 - α_t) restricted to that range, then a uniform subset of
  size k (what rejection produces, since a Bernoulli mask given its size is a uniform subset).
- `count`: the linear schedule with t integrated out. Given |S| = k masked tokens the masked set is
  uniform among k-subsets, and ∫₀¹ (1/t) C(n, k) t^k (1 - t)^(n-k) dt = 1/k, so the continuous-time
  NELBO of a block is Σ_{k=1..n} (1/k) E_{|S|=k}[Σ_{i∈S} -log p(x_i | x_¬S, x^{<b})]
  = n · E_{k ~ U{1..n}}[(1/k) Σ_{i∈S} ...]. Drawing k uniformly (stratified over the batch × blocks)
  and weighting by n/k ≤ n estimates exactly the same bound without bias and with finite variance;
  for L' = 1 it is the AR NLL in one pass (t ≡ 1, Suppl. B). Every full-range schedule has this same
  bound (Suppl. A: the continuous-time ELBO is invariant to α_t), so `count` is defined for
  `linear` only. Evaluation uses it (`evaluation_schedule`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch

from .diffusion_config import Masking, ScheduleName
from .errors import Sad3Error

_E_MINUS_1 = math.e - 1.0
MASKINGS: tuple[str, ...] = get_args(Masking)
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
T_FLOOR = 1e-3  # MDLM's and the reference code's smallest t in training


@dataclass(frozen=True)
class NoiseSchedule:
    """One masking schedule α_t with t ∈ (0, 1], the range (t_min, t_max] that times are drawn from,
    and how a block's masked set is drawn (`masking`, see the module docstring)."""

    name: str
    t_min: float = 0.0
    t_max: float = 1.0
    masking: str = "bernoulli"

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
        """-α'_t / (1 - α_t), the per-token weight of the cross-entropy in Eq. 7/8 (1/t when clipped)."""
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

    @property
    def label(self) -> str:
        """A short name for reports: `linear`, `clipped[0.3,0.8]`, `linear[0.001,1]@count`, ..."""
        text = self.name if self.is_full_range else f"{self.name}[{self.t_min:g},{self.t_max:g}]"
        return text if self.masking == "bernoulli" else f"{text}@{self.masking}"


def make_schedule(
    name: str, beta: float = 0.0, omega: float = 1.0, t_floor: float = 0.0, masking: str = "bernoulli"
) -> NoiseSchedule:
    """Build a schedule from its config name; `clipped` draws mask rates from U[β, ω] (Sec. 5.2).

    `t_floor` raises the lower end of t's range (MDLM's 1e-3); `masking` picks how masked sets are drawn.
    `clipped` with β = ω = 1 masks every token: with L' = 1 its NELBO is the AR NLL (Suppl. B, Eq. 17-19).
    """
    if name not in SCHEDULES:
        raise Sad3Error(f"unknown noise schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if masking not in MASKINGS:
        raise Sad3Error(f"unknown masking {masking!r}: choose one of {', '.join(MASKINGS)}")
    if not 0.0 <= t_floor < 1.0:
        raise Sad3Error(f"the t floor must lie in [0, 1), got {t_floor}")
    if masking == "count":
        if name != "linear":
            raise Sad3Error(
                f"masking 'count' integrates t out of the linear schedule (the same bound for every full-range schedule), not {name!r}: use schedule linear, or masking bernoulli/resample"
            )
        return NoiseSchedule("linear", masking="count")  # no t is drawn: nothing to floor
    if name != "clipped":
        return NoiseSchedule(name, t_min=t_floor, masking=masking)
    if not 0.0 <= beta <= 1.0 or not 0.0 <= omega <= 1.0:
        raise Sad3Error(f"clipped schedule needs 0 <= beta, omega <= 1 (got beta={beta}, omega={omega})")
    if beta > omega:
        raise Sad3Error(f"clipped schedule needs beta <= omega (got beta={beta} > omega={omega}): swap them")
    if omega == 0.0:
        raise Sad3Error("clipped schedule needs omega > 0: with omega = 0 no token is ever masked")
    return NoiseSchedule("clipped", t_min=min(max(beta, t_floor), omega), t_max=omega, masking=masking)


def parse_schedule(spec: str, t_floor: float = 0.0, masking: str = "bernoulli") -> NoiseSchedule:
    """`NAME[:LO:HI][@MASKING]`, e.g. `linear`, `clipped:0.3:0.8`, `linear:0.001:1`, `linear@count`,
    `clipped:0.45:0.95@resample`. LO:HI bound t (any schedule; for `clipped` they are β, ω)."""
    body, _, how = spec.strip().partition("@")
    name, *bounds = body.split(":")
    if len(bounds) not in (0, 2):
        raise Sad3Error(f"schedule {spec!r} must look like NAME, NAME:LO:HI or NAME[:LO:HI]@MASKING")
    try:
        lo, hi = (float(b) for b in bounds) if bounds else (0.0, 1.0)
    except ValueError:
        raise Sad3Error(f"schedule {spec!r}: LO and HI must be numbers, e.g. clipped:0.3:0.8") from None
    if name == "clipped" and not bounds:
        raise Sad3Error(f"schedule {spec!r} needs its range: clipped:BETA:OMEGA, e.g. clipped:0.3:0.8")
    schedule = make_schedule(name, lo, hi, t_floor, how or masking)
    if bounds and name != "clipped":  # a range on another schedule: the same checks as clipped's
        if schedule.masking == "count":
            raise Sad3Error(f"schedule {spec!r}: masking 'count' draws no t, so it takes no range")
        ranged = make_schedule("clipped", lo, hi, t_floor)
        schedule = NoiseSchedule(name, ranged.t_min, ranged.t_max, schedule.masking)
    return schedule


def evaluation_schedule(t_floor: float | None = None) -> NoiseSchedule:
    """The schedule every bound is reported under: linear, t ~ U[0, 1] (Sec. 6, Table 7 caption).

    By default t is integrated out (`count` masking): the same bound, unbiased, finite variance, and the
    exact NLL at L' = 1. `t_floor` instead gives the paper's Monte-Carlo protocol, Bernoulli masks with
    t ~ U[t_floor, 1] (MDLM's 1e-3; 0 draws t down to 0)."""
    if t_floor is None:
        return NoiseSchedule("linear", masking="count")
    return make_schedule("linear", t_floor=t_floor)


def reference_grid(block_size: int) -> list[tuple[float, float]]:
    """The reference code's search candidates (Sec. 5.3): (1e-3, 1), then for widths 0.5, 0.6, ..., 0.9
    every start 0, 0.05, ... up to 1 - width (36 ranges); for L' = 1 only (1e-3, 1) and full masking (1, 1)."""
    if block_size == 1:
        return [(T_FLOOR, 1.0), (1.0, 1.0)]
    grid = [(T_FLOOR, 1.0)]
    for width in (0.5, 0.6, 0.7, 0.8, 0.9):
        for i in range(round((1.0 - width) / 0.05) + 1):
            beta = round(0.05 * i, 4)
            grid.append((max(beta, T_FLOOR), round(beta + width, 4)))
    return grid


def parse_grid(spec: str, block_size: int) -> list[tuple[float, float]]:
    """`reference` or `B:W,B:W,...` (each a clipped range U[B, W]): the schedule search's candidates."""
    if spec == "reference":
        return reference_grid(block_size)
    grid = []
    for item in spec.split(","):
        try:
            beta, omega = (float(v) for v in item.split(":"))
        except ValueError:
            raise Sad3Error(
                f"diffusion.search_grid item {item!r} must be BETA:OMEGA (e.g. 0.3:0.8), or the grid 'reference'"
            ) from None
        make_schedule("clipped", beta, omega)  # the same range checks as the config's
        grid.append((beta, omega))
    return grid
