"""The vectorized x_t ⊕ x pass against the naive per-block loop of Alg. 1, and Suppl. B's
L' = 1 identity against an AR likelihood computed position by position."""

import pytest
import torch
from conftest import MASK_ID, random_tokens, tiny_model

from sad3_megatron.attention import AttentionMask
from sad3_megatron.diffusion import AutoregressiveObjective, BlockDiffusionObjective, make_schedule

L = 16


@pytest.mark.parametrize("block_size", [1, 2, 4, L])
def test_vectorized_loss_and_gradients_equal_the_naive_loop(block_size):
    model = tiny_model()
    x = random_tokens(3, L)
    objective = BlockDiffusionObjective(L, block_size, make_schedule("linear"), MASK_ID)
    noised = objective.noise(x, torch.Generator().manual_seed(block_size))
    assert noised.masked.any() and not noised.masked.all()

    def loss_and_grads(naive):
        model.zero_grad()
        terms = objective.loss(model, x, noised, naive=naive)
        terms.loss.backward()
        return terms.loss.detach(), [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = loss_and_grads(naive=False)
    slow, slow_grads = loss_and_grads(naive=True)
    assert abs(fast - slow) <= 1e-5
    for g_fast, g_slow in zip(fast_grads, slow_grads, strict=True):
        assert (g_fast - g_slow).abs().max() <= 1e-5


def test_per_token_nll_equals_the_naive_loop_exactly_per_position():
    model = tiny_model(seed=3)
    x = random_tokens(2, L, seed=5)
    objective = BlockDiffusionObjective(L, 4, make_schedule("clipped", 0.3, 0.8), MASK_ID)
    noised = objective.noise(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = objective.token_nll(model, x, noised)
        slow = objective.token_nll_naive(model, x, noised)
    assert (fast - slow).abs().max() <= 1e-5


def ar_nll_by_hand(model, x):
    """-Σ_i log p(x_i | x_<i), one forward per position: x_<i followed by [MASK] at position i,
    under a causal mask; the logits at the [MASK] predict x_i."""
    total = torch.zeros(x.shape[0])
    for i in range(x.shape[1]):
        tokens = torch.cat([x[:, :i], torch.full((x.shape[0], 1), MASK_ID)], dim=1)
        logits = model(tokens, torch.arange(i + 1), AttentionMask.causal(i + 1)).logits[:, -1]
        total -= torch.log_softmax(logits, dim=-1).gather(1, x[:, i : i + 1]).squeeze(1)
    return total


def test_block_size_one_with_full_masking_is_the_ar_nll():
    """Suppl. B, Eq. 17-19: with L' = 1 and t ~ U[1, 1] the NELBO is exactly the AR NLL."""
    model = tiny_model(seed=1)
    x = random_tokens(2, L, seed=2)
    objective = BlockDiffusionObjective(L, 1, make_schedule("clipped", 1.0, 1.0), MASK_ID)
    with torch.no_grad():
        terms = objective(model, x, torch.Generator().manual_seed(0))
        nll = ar_nll_by_hand(model, x)
    assert terms.loss.item() == pytest.approx(nll.sum().item() / x.numel(), abs=1e-5)


def test_ar_baseline_is_next_token_nll():
    model = tiny_model(seed=4)
    x = random_tokens(2, L, seed=6)
    with torch.no_grad():
        terms = AutoregressiveObjective(L)(model, x)
        logits = model(x[:, :-1], torch.arange(L - 1), AttentionMask.causal(L - 1)).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    assert terms.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_nelbo_under_linear_schedule_bounds_and_is_unbiased_for_l_prime_one():
    """With L' = 1, E_t[NELBO] under the linear schedule equals the fully-masked (AR) value:
    masked positions see exactly the context of full masking, weighted by 1/t with P(mask) = t."""
    model = tiny_model(seed=2)
    x = random_tokens(4, L, seed=9)
    linear = BlockDiffusionObjective(L, 1, make_schedule("linear"), MASK_ID)
    full = BlockDiffusionObjective(L, 1, make_schedule("clipped", 1.0, 1.0), MASK_ID)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        exact = full(model, x, generator).loss.item()
        estimates = torch.tensor([linear(model, x, generator).loss.item() for _ in range(400)])
    stderr = estimates.std().item() / 20
    assert abs(estimates.mean().item() - exact) < 4 * stderr


def test_mask_token_is_never_predicted():
    model = tiny_model()
    x = random_tokens(1, 8)
    logits = model(x, torch.arange(8), AttentionMask.block_causal(8, 2)).logits
    assert logits.shape[-1] == 50 and torch.isinf(logits[..., MASK_ID]).all()
