"""The masking forward process with one noise level per block (Alg. 1, lines 2-3).

How the masked set of a block is drawn — independent Bernoulli masks, the reference code's
realised-rate resampling, or a uniform masked count with t integrated out — is the schedule's
`masking` (see schedules.py). The first `clean_prefix` positions of every row (the row's BOS in the
paper's framing) are never masked and carry no weight: they are context, not targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedules import NoiseSchedule


@dataclass
class NoisedBatch:
    """x_t = x_{t_1}^1 ⊕ … ⊕ x_{t_B}^B and what the NELBO needs to weight it."""

    t: torch.Tensor  # [b, B] one time per block (`count` masking: the masked fraction k/n)
    x_t: torch.Tensor  # [b, L] tokens with masked positions set to the mask id
    masked: torch.Tensor  # [b, L] bool
    weight: torch.Tensor  # [b, L] -α'_t / (1 - α_t) of each token's block (Eq. 7; `count`: n/k)


def per_token(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Broadcast a per-block tensor [b, B] to per-token [b, B·L']."""
    return values.repeat_interleave(block_size, dim=1)


def free_positions(batch: int, length: int, clean_prefix: int = 0) -> torch.Tensor:
    """[b, L] bool: the positions that may be masked and scored (all but the first `clean_prefix`)."""
    free = torch.ones(batch, length, dtype=torch.bool)
    free[:, :clean_prefix] = False
    return free


def uniform_subsets(free: torch.Tensor, k: torch.Tensor, block_size: int, generator) -> torch.Tensor:
    """A uniformly random subset of k[b, B] free positions in every block: the k free positions with
    the smallest i.i.d. uniform scores (non-free positions score above every free one)."""
    batch, length = free.shape
    scores = torch.rand(free.shape, generator=generator, dtype=torch.float64).masked_fill(~free, 2.0)
    ranks = scores.view(batch, -1, block_size).argsort(-1).argsort(-1)
    return (ranks < k.unsqueeze(-1)).view(batch, length)


def truncated_binomial(n: torch.Tensor, p: torch.Tensor, lo: float, hi: float, generator) -> torch.Tensor:
    """k ~ Binomial(n, p) conditioned on lo ≤ k/n ≤ hi, per entry, by inverse CDF over k = 0..max n.
    Entries whose range holds no count keep the untruncated Binomial (no block is left unmaskable)."""
    k = torch.arange(int(n.max()) + 1, dtype=torch.float64)
    n_, p_ = n.unsqueeze(-1).double(), p.unsqueeze(-1).double()
    log_pmf = (
        torch.lgamma(n_ + 1) - torch.lgamma(k + 1) - torch.lgamma((n_ - k).clamp(min=0) + 1)
        + torch.xlogy(k, p_) + torch.xlogy(n_ - k, 1 - p_)
    )  # fmt: skip
    possible = k <= n_
    in_range = possible & (k >= torch.ceil(lo * n_ - 1e-9)) & (k <= torch.floor(hi * n_ + 1e-9))
    in_range = torch.where(in_range.any(-1, keepdim=True), in_range, possible)
    weights = torch.exp(log_pmf - log_pmf.max(-1, keepdim=True).values).masked_fill(~in_range, 0.0)
    cdf = weights.cumsum(-1) / weights.sum(-1, keepdim=True)
    u = torch.rand(n.shape, generator=generator, dtype=torch.float64).unsqueeze(-1)
    return (cdf < u).sum(-1).clamp(max=int(n.max())).minimum(n)


def mask_blocks(
    x: torch.Tensor,
    block_size: int,
    schedule: NoiseSchedule,
    mask_id: int,
    generator: torch.Generator | None,
    antithetic: bool = True,
    clean_prefix: int = 0,
    free: torch.Tensor | None = None,
) -> NoisedBatch:
    """Draw t_b per block and mask each block's free tokens as `schedule.masking` says.

    `free` [b, L] bool, when given, names the positions that may be masked and scored instead of
    "all but the first `clean_prefix`": a continuation scored after its clean context (likelihood.py).

    Draws are made on the CPU generator, so they do not depend on the device the model runs on, and
    no step waits on the device (the resampling is a closed-form draw, not a loop).
    """
    batch, length = x.shape
    free = free_positions(batch, length, clean_prefix) if free is None else free.cpu()
    t = schedule.sample_t((batch, length // block_size), generator, antithetic)
    if schedule.masking == "bernoulli":
        rate = per_token(schedule.mask_rate(t), block_size)
        masked = (torch.rand(rate.shape, generator=generator) < rate) & free
        weight = schedule.loss_weight(t)
    else:
        n = free.view(batch, -1, block_size).sum(-1)
        if schedule.masking == "count":
            # t ~ U(0, 1] (stratified) → k = ⌈t n⌉ ~ U{1..n}, weight n/k; blocks with no free token: 0.
            k = torch.ceil(t.double() * n).long().clamp(min=1).minimum(n)
            weight = torch.where(k > 0, n / k.clamp(min=1), 0.0).float()
            t = torch.where(n > 0, k / n.clamp(min=1), 0.0).float()
        else:
            lo, hi = (schedule.mask_rate(torch.tensor(v)).item() for v in (schedule.t_min, schedule.t_max))
            k = truncated_binomial(n, schedule.mask_rate(t), lo, hi, generator)
            weight = schedule.loss_weight(t)
        masked = uniform_subsets(free, k, block_size, generator)
    masked = masked.to(x.device)
    x_t = torch.where(masked, torch.full_like(x, mask_id), x)
    return NoisedBatch(t.to(x.device), x_t, masked, per_token(weight, block_size).to(x.device))


__all__ = ["NoisedBatch", "free_positions", "mask_blocks", "per_token", "truncated_binomial", "uniform_subsets"]
