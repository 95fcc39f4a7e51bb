"""Noise schedules: the loss weight is -α'_t / (1 - α_t) of each α_t, checked by autograd."""

import math

import pytest
import torch

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.noising import mask_blocks
from sad3_megatron.core.schedules import SCHEDULES, make_schedule, parse_schedule


@pytest.mark.parametrize("name", [s for s in SCHEDULES if s != "clipped"])
def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    schedule = make_schedule(name)
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64, requires_grad=True)
    alpha = 1.0 - schedule.mask_rate(t)
    (alpha_prime,) = torch.autograd.grad(alpha.sum(), t)
    expected = -alpha_prime / (1.0 - alpha)
    assert torch.allclose(schedule.loss_weight(t.detach()), expected, rtol=1e-6)
    # α_0 ≈ 1 and α_1 ≈ 0 (Sec. 4.1): nothing masked at t = 0, everything at t = 1.
    assert schedule.mask_rate(torch.tensor([0.0])).item() == pytest.approx(0.0, abs=1e-7)
    assert schedule.mask_rate(torch.tensor([1.0])).item() == pytest.approx(1.0, abs=1e-6)


def test_clipped_schedule_draws_mask_rates_in_range():
    schedule = make_schedule("clipped", 0.3, 0.8)
    t = schedule.sample_t((64, 32), torch.Generator().manual_seed(0))
    rate = schedule.mask_rate(t)
    assert rate.min() >= 0.3 and rate.max() <= 0.8
    assert torch.allclose(schedule.loss_weight(t), 1.0 / t)  # linear α_t = 1 - t restricted to [β, ω]


def test_antithetic_draws_are_stratified_and_uniform():
    schedule = make_schedule("linear")
    n = 1000
    t = schedule.sample_t((n,), torch.Generator().manual_seed(1), antithetic=True)
    assert t.min() > 0 and t.max() <= 1
    counts = torch.histc(t, bins=10, min=0, max=1)
    assert torch.all(counts == n / 10)  # exactly one draw per stratum of width 1/n


def test_full_masking_schedule_masks_everything():
    x = torch.arange(40).reshape(2, 20)
    noised = mask_blocks(x, 1, make_schedule("clipped", 1.0, 1.0), 99, torch.Generator().manual_seed(0))
    assert noised.masked.all() and (noised.x_t == 99).all() and torch.all(noised.weight == 1.0)


def test_mask_rate_matches_schedule_empirically():
    x = torch.zeros(4, 4096, dtype=torch.long)
    noised = mask_blocks(x, 4096, make_schedule("cosine"), 7, torch.Generator().manual_seed(3))
    rates = noised.masked.float().mean(dim=1)
    expected = 1 - torch.cos(0.5 * math.pi * noised.t[:, 0])
    assert torch.allclose(rates, expected, atol=0.03)


@pytest.mark.parametrize(
    "args,message",
    [
        (("clipped", 0.8, 0.3), "beta <= omega"),
        (("clipped", -0.1, 0.5), "0 <= beta"),
        (("warp",), "unknown noise schedule"),
        (("cosine", 0.0, 1.0, 0.0, "count"), "integrates t out"),
        (("linear", 0.0, 1.0, 0.0, "stratified"), "unknown masking"),
        (("linear", 0.0, 1.0, 1.0), "t floor"),
    ],
)
def test_bad_schedules_are_rejected(args, message):
    with pytest.raises(Sad3Error, match=message):
        make_schedule(*args)


def test_training_floor_bounds_t_and_the_weight():
    schedule = make_schedule("linear", t_floor=1e-3)
    t = schedule.sample_t((100_000,), torch.Generator().manual_seed(0))
    assert t.min() > 1e-3 and schedule.loss_weight(t).max() < 1000
    assert make_schedule("clipped", 0.0, 0.5, t_floor=1e-3).t_min == 1e-3  # as the reference clamps its grid


def rejection_counts(n, beta, omega, t, rng):
    """The reference code's loop, written out for one block: redraw Bernoulli(t) masks until k/n ∈ [β, ω]."""
    while True:
        k = int((torch.rand(n, generator=rng) < t).sum())
        if beta <= k / n <= omega:
            return k


def test_resampling_draws_the_realised_rate_of_the_reference_loop():
    """One closed-form draw per block (no loop, no host sync) gives the distribution of masked counts of
    the reference code's rejection loop, with t ~ U[β, ω] and k/n kept in [β, ω]."""
    n, beta, omega, draws = 8, 0.3, 0.8, 8000
    rng = torch.Generator().manual_seed(0)
    loop = [
        rejection_counts(n, beta, omega, beta + (omega - beta) * torch.rand((), generator=rng).item(), rng)
        for _ in range(draws)
    ]
    schedule = make_schedule("clipped", beta, omega, masking="resample")
    noised = mask_blocks(torch.zeros(draws // 4, 4 * n, dtype=torch.long), n, schedule, 1, rng)
    closed = noised.masked.view(-1, n).sum(-1)
    assert closed.min() >= 3 and closed.max() <= 6  # k/n ∈ [0.3, 0.8] ⇔ k ∈ {3..6}
    want = torch.bincount(torch.tensor(loop), minlength=n + 1).double() / draws
    got = torch.bincount(closed, minlength=n + 1).double() / draws
    assert ((got - want).abs() <= 0.035).all()


def test_count_masking_draws_uniform_counts_with_weight_n_over_k():
    schedule = parse_schedule("linear@count")
    noised = mask_blocks(torch.zeros(2000, 16, dtype=torch.long), 4, schedule, 1, torch.Generator().manual_seed(0))
    k = noised.masked.view(-1, 4).sum(-1)
    assert torch.bincount(k, minlength=5)[0] == 0
    assert (torch.bincount(k, minlength=5)[1:] == 2000).all()  # stratified over the 8000 blocks: exactly uniform
    assert torch.equal(noised.weight.view(-1, 4)[:, 0], 4.0 / k)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("clipped:0.3:0.8", ("clipped", 0.3, 0.8, "bernoulli")),
        ("linear", ("linear", 0.0, 1.0, "bernoulli")),
        ("linear:0.001:1", ("linear", 0.001, 1.0, "bernoulli")),
        ("clipped:0.45:0.95@resample", ("clipped", 0.45, 0.95, "resample")),
        ("linear@count", ("linear", 0.0, 1.0, "count")),
    ],
)
def test_schedule_specs(spec, expected):
    s = parse_schedule(spec)
    assert (s.name, s.t_min, s.t_max, s.masking) == expected


@pytest.mark.parametrize("spec", ["clipped", "clipped:0.3", "linear:a:b", "cosine@count", "linear:0.1:1@count"])
def test_bad_schedule_specs_are_rejected(spec):
    with pytest.raises(Sad3Error):
        parse_schedule(spec)
