"""The masking forward process with one noise level per block (Alg. 1, lines 2-3).

How the masked set of a block is drawn — independent Bernoulli masks, the reference code's
realised-rate resampling, or a uniform masked count with t integrated out — is the schedule's
`masking` (see schedules.py). The first `clean_prefix` positions of every row (the row's BOS in the
paper's framing) are never masked and carry no weight: they are context, not targets; so are the
positions a per-token `scored` mask leaves out (a chat prompt: only the answer is noised and scored).

`complementary_pair` adds Fast-dLLM v2's second estimate: the same rows with every block's free
positions masked exactly where the first draw left them clean, weighted so that the average of the
two stays an unbiased estimate of the same NELBO (derivation in `complement_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedules import T_FLOOR, NoiseSchedule


@dataclass
class NoisedBatch:
    """x_t = x_{t_1}^1 ⊕ … ⊕ x_{t_B}^B and what the NELBO needs to weight it."""

    t: torch.Tensor  # [b, B] one time per block (`count` masking: the masked fraction k/n)
    x_t: torch.Tensor  # [b, L] tokens with masked positions set to the mask id
    masked: torch.Tensor  # [b, L] bool
    weight: torch.Tensor  # [b, L] -α'_t / (1 - α_t) of each token's block (Eq. 7; `count`: n/k)
    free: torch.Tensor | None = None  # [b, L] bool: the positions that may be masked and are scored
    num_free: int | None = None  # free.sum(), counted on the CPU


def per_token(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Broadcast a per-block tensor [b, B] to per-token [b, B·L']."""
    return values.repeat_interleave(block_size, dim=1)


def free_positions(batch: int, length: int, clean_prefix: int = 0, scored: torch.Tensor | None = None) -> torch.Tensor:
    """[b, L] bool: the positions that may be masked and scored: all but the first `clean_prefix`,
    and only those `scored` marks when given (e.g. a chat row's answer tokens)."""
    free = torch.ones(batch, length, dtype=torch.bool)
    free[:, :clean_prefix] = False
    return free if scored is None else free & scored.to(device="cpu", dtype=torch.bool)


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
    scored: torch.Tensor | None = None,
) -> NoisedBatch:
    """Draw t_b per block and mask each block's free tokens as `schedule.masking` says.

    `scored` [b, L] (None: every position) restricts the free positions to those it names, beyond the
    first `clean_prefix` (free_positions): a chat row's answer after its clean prompt (data/chat.py), a
    continuation after its clean context (likelihood.py).

    Draws are made on the CPU generator, so they do not depend on the device the model runs on, and
    no step waits on the device (the resampling is a closed-form draw, not a loop).
    """
    batch, length = x.shape
    free = free_positions(batch, length, clean_prefix, scored)
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
    return NoisedBatch(t.to(x.device), x_t, masked, per_token(weight, block_size).to(x.device), free.to(x.device),
                       int(free.sum()))  # fmt: skip


def complement_weights(
    noised: NoisedBatch, block_size: int, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block weights [b, B] of (the first draw, its complement) that make their average unbiased.

    Bernoulli / resample: the complement of a mask drawn at rate m = 1 - α_t is a mask at rate 1 - m.
    Eq. 7 in terms of the rate, ∫₀¹ dm E_{rate m}[Σ_masked ℓ_i] / m, is unchanged by m → 1 - m, so the
    complement alone is unbiased with weight (dm/dt) / (1 - m) = loss_weight(t) · m / (1 - m) (linear:
    1/(1 - t)), capped like the first draw's weight by the t floor (1 - m ≥ T_FLOOR); each of the two
    keeps its own weight. `count` (k ~ U{1..n}, weight n/k): the complement has n - k ~ U{0..n-1} masked
    positions and never all n, so weighting both by n/k' leaves the k = n term half-counted; the first
    draw's weight doubles (2n/n = 2) exactly when its complement is empty, and then
    E[(A + C)/2] = Σ_k (1/k) E_{|S|=k}[Σ_{i∈S} ℓ_i], the NELBO. Blocks without free positions weigh 0."""
    batch = noised.t.shape[0]
    free = noised.free.view(batch, -1, block_size)
    first = noised.weight.view(batch, -1, block_size)[..., 0]
    if schedule.masking == "count":
        n = free.sum(-1)
        k = (noised.masked.view(batch, -1, block_size) & free).sum(-1)
        left = n - k
        second = torch.where(left > 0, n / left.clamp(min=1), 0.0).to(first.dtype)
        first = torch.where((left == 0) & (n > 0), 2.0 * first, first)
        return first, second
    rate = schedule.mask_rate(noised.t)
    second = schedule.loss_weight(noised.t) * rate / (1.0 - rate).clamp(min=T_FLOOR)
    return first, second.to(first.dtype)


def complementary_pair(
    noised: NoisedBatch, x: torch.Tensor, block_size: int, schedule: NoiseSchedule, mask_id: int
) -> NoisedBatch:
    """[first draw; its complement]: 2b rows, the complement masking every free position the first
    draw left clean and nothing else (the clean prefix and unscored positions stay clean)."""
    first_w, second_w = complement_weights(noised, block_size, schedule)
    masked = noised.free & ~noised.masked
    x_t = torch.where(masked, torch.full_like(x, mask_id), x)
    if schedule.masking == "count":  # the complement's realised masked fraction
        n = noised.free.view(x.shape[0], -1, block_size).sum(-1)
        second_t = torch.where(n > 0, 1.0 - noised.t, 0.0)
    else:
        second_t = noised.t
    return NoisedBatch(
        torch.cat([noised.t, second_t]),
        torch.cat([noised.x_t, x_t]),
        torch.cat([noised.masked, masked]),
        torch.cat([per_token(first_w, block_size), per_token(second_w, block_size)]).to(noised.weight.dtype),
        torch.cat([noised.free, noised.free]),
        None if noised.num_free is None else 2 * noised.num_free,
    )


__all__ = [
    "NoisedBatch", "complement_weights", "complementary_pair", "free_positions", "mask_blocks", "per_token",
    "truncated_binomial", "uniform_subsets",
]  # fmt: skip
