"""Noise schedules: the loss weight is -α'_t / (1 - α_t) of each α_t, checked by autograd."""

import math

import pytest
import torch

from sad3_megatron.diffusion import SCHEDULES, make_schedule, mask_blocks
from sad3_megatron.errors import Sad3Error


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
    ],
)
def test_bad_schedules_are_rejected(args, message):
    with pytest.raises(Sad3Error, match=message):
        make_schedule(*args)
