"""The vectorized x_t ⊕ x pass against the naive per-block loop of Alg. 1, and Suppl. B's
L' = 1 identity against an AR likelihood computed position by position."""

import itertools
import math

import pytest
import torch

from sad3_megatron.core.masks import AttentionMask
from sad3_megatron.core.objectives import AutoregressiveObjective, BlockDiffusionObjective
from sad3_megatron.core.schedules import evaluation_schedule, make_schedule

L = 16


@pytest.mark.parametrize("block_size", [1, 2, 4, L])
def test_vectorized_loss_and_gradients_equal_the_naive_loop(tiny, block_size):
    model = tiny.network()
    x = tiny.tokens(3, L)
    objective = BlockDiffusionObjective(L, block_size, make_schedule("linear"), tiny.mask_id)
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


def test_per_token_nll_equals_the_naive_loop_exactly_per_position(tiny):
    model = tiny.network(seed=3)
    x = tiny.tokens(2, L, seed=5)
    objective = BlockDiffusionObjective(L, 4, make_schedule("clipped", 0.3, 0.8), tiny.mask_id)
    noised = objective.noise(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = objective.token_nll(model, x, noised)
        slow = objective.token_nll_naive(model, x, noised)
    assert (fast - slow).abs().max() <= 1e-5


def ar_nll_by_hand(tiny, model, x):
    """-Σ_{i≥1} log p(x_i | x_<i), one forward per position: x_<i followed by [MASK] at position i,
    under a causal mask; the logits at the [MASK] predict x_i. Position 0 (the row's BOS) is context."""
    total = torch.zeros(x.shape[0])
    for i in range(1, x.shape[1]):
        tokens = torch.cat([x[:, :i], torch.full((x.shape[0], 1), tiny.mask_id)], dim=1)
        logits = model(tokens, torch.arange(i + 1), AttentionMask.causal(i + 1)).logits[:, -1]
        total -= torch.log_softmax(logits, dim=-1).gather(1, x[:, i : i + 1]).squeeze(1)
    return total


@pytest.mark.parametrize("schedule", [make_schedule("clipped", 1.0, 1.0), evaluation_schedule()])
def test_block_size_one_with_full_masking_is_the_ar_nll(tiny, schedule):
    """Suppl. B, Eq. 17-19: with L' = 1 and t ~ U[1, 1] the NELBO is exactly the AR NLL; so is the
    evaluation estimator (t integrated out) at L' = 1, in one pass. Both divide by the L - 1 targets."""
    model = tiny.network(seed=1)
    x = tiny.tokens(2, L, seed=2)
    objective = BlockDiffusionObjective(L, 1, make_schedule("linear"), tiny.mask_id)
    with torch.no_grad():
        terms = objective(model, x, torch.Generator().manual_seed(0), schedule=schedule)
        nll = ar_nll_by_hand(tiny, model, x)
    assert terms.num_tokens == 2 * (L - 1)
    assert terms.loss.item() == pytest.approx(nll.sum().item() / (2 * (L - 1)), abs=1e-5)


def test_position_zero_stays_clean_and_unscored(tiny):
    x = tiny.tokens(64, L, seed=3)
    objective = BlockDiffusionObjective(L, 4, make_schedule("linear"), tiny.mask_id)
    for schedule in (
        make_schedule("linear"),
        evaluation_schedule(),
        make_schedule("clipped", 0.5, 1.0, masking="resample"),
    ):
        noised = objective.noise(x, torch.Generator().manual_seed(1), schedule)
        assert not noised.masked[:, 0].any() and noised.masked[:, 1:].any()
    assert (objective.training_pass(x, torch.Generator()).weights[:, 0] == 0).all()


def test_ar_baseline_is_next_token_nll(tiny):
    model = tiny.network(seed=4)
    x = tiny.tokens(2, L, seed=6)
    with torch.no_grad():
        terms = AutoregressiveObjective(L)(model, x)
        logits = model(x[:, :-1], torch.arange(L - 1), AttentionMask.causal(L - 1)).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    assert terms.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_nelbo_under_linear_schedule_bounds_and_is_unbiased_for_l_prime_one(tiny):
    """With L' = 1, E_t[NELBO] under the linear schedule equals the fully-masked (AR) value:
    masked positions see exactly the context of full masking, weighted by 1/t with P(mask) = t."""
    model = tiny.network(seed=2)
    x = tiny.tokens(4, L, seed=9)
    linear = BlockDiffusionObjective(L, 1, make_schedule("linear"), tiny.mask_id)
    full = BlockDiffusionObjective(L, 1, make_schedule("clipped", 1.0, 1.0), tiny.mask_id)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        exact = full(model, x, generator).loss.item()
        estimates = torch.tensor([linear(model, x, generator).loss.item() for _ in range(400)])
    stderr = estimates.std().item() / 20
    assert abs(estimates.mean().item() - exact) < 4 * stderr


def test_mask_token_is_never_predicted(tiny):
    model = tiny.network()
    x = tiny.tokens(1, 8)
    logits = model(x, torch.arange(8), AttentionMask.block_causal(8, 2)).logits
    assert logits.shape[-1] == 50 and torch.isinf(logits[..., tiny.mask_id]).all()


def block_nll_by_hand(tiny, model, x, start, block_size, subset):
    """-log p(x_i | x^b with `subset` masked, x^{<b}) for i in the block [start, start + L'), by one forward of
    the clean prefix followed by the noisy block under the block-causal mask (the M_BC window)."""
    noisy = x[:, start : start + block_size].clone()
    noisy[:, list(subset)] = tiny.mask_id
    tokens = torch.cat([x[:, :start], noisy], dim=1)
    n = tokens.shape[1]
    logits = model(tokens, torch.arange(n), AttentionMask.block_causal(n, block_size)).logits[:, start:]
    return -torch.log_softmax(logits.double(), -1).gather(-1, x[:, start : start + block_size, None]).squeeze(-1)


def exact_nelbo_by_enumeration(tiny, model, x, block_size):
    """The continuous-time NELBO of Eq. 7 under the linear schedule, per scored token: every block's
    Σ_S ∫₀¹ (1/t) t^|S| (1-t)^(n-|S|) dt · Σ_{i∈S} -log p(x_i | ...), over all subsets S of its free
    positions (position 0 is never masked), the t-integrals taken numerically (midpoint rule)."""
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[1], block_size):
        free = [j for j in range(block_size) if start + j > 0]
        n = len(free)
        for size in range(1, n + 1):
            weight = (grid ** (size - 1) * (1 - grid) ** (n - size)).mean()
            for subset in itertools.combinations(free, size):
                nll = block_nll_by_hand(tiny, model, x, start, block_size, subset)
                total += weight * nll[:, list(subset)].sum(-1)
    return total.sum().item() / (x.shape[0] * (x.shape[1] - 1))


@pytest.mark.parametrize("block_size", [2, 4])
def test_evaluation_estimator_is_unbiased_against_exact_enumeration(tiny, block_size):
    """t integrated out (k ~ U{1..n}, a uniform k-subset, weight n/k) estimates exactly the NELBO of
    t ~ U[0, 1] with Bernoulli masks: the mean of many draws matches the enumeration of all in-block
    mask subsets (blocks are conditionally independent given the clean prefix)."""
    model = tiny.network(seed=7)
    x = tiny.tokens(2, 8, seed=11)
    with torch.no_grad():
        exact = exact_nelbo_by_enumeration(tiny, model, x, block_size)
        objective = BlockDiffusionObjective(8, block_size, make_schedule("linear"), tiny.mask_id)
        generator = torch.Generator().manual_seed(0)
        draws = torch.tensor([objective(model, x, generator, evaluation_schedule()).loss.item() for _ in range(300)])
    stderr = draws.std().item() / math.sqrt(len(draws))
    assert stderr > 0 and abs(draws.mean().item() - exact) < 4 * stderr
    assert stderr < 0.02 * exact  # and the Monte-Carlo error is small: the check is sharp


def test_evaluation_estimator_variance_is_finite_and_seed_stable(tiny):
    """Weights are at most n = L', so the per-draw NELBO has finite variance: its spread over draws is the
    same for every seed (unlike 1/t with t down to 0, whose largest weight grows with the number of draws)."""
    model = tiny.network(seed=2)
    x = tiny.tokens(4, L, seed=4)
    objective = BlockDiffusionObjective(L, 4, make_schedule("linear"), tiny.mask_id)
    spreads = []
    with torch.no_grad():
        for seed in range(4):
            generator = torch.Generator().manual_seed(seed)
            noised = [objective.noise(x, generator, evaluation_schedule()) for _ in range(64)]
            assert max(n.weight.max().item() for n in noised) <= 4
            spreads.append(torch.tensor([objective.loss(model, x, n).loss.item() for n in noised]).std().item())
    assert max(spreads) / min(spreads) < 1.5
    t = make_schedule("linear").sample_t((4096,), torch.Generator().manual_seed(0))
    assert (1 / t).max() > 1000  # what the floor (training) or the integration (evaluation) avoids


def test_training_pass_mean_is_the_loss_per_scored_token(tiny):
    """The pipeline's loss is the mean of weights × NLL over all [b, L] positions: with position 0
    unscored the weights carry L / (L - 1), so it equals the objective's loss (sum / scored tokens)."""
    model = tiny.network(seed=6)
    x = tiny.tokens(3, L, seed=8)
    objective = BlockDiffusionObjective(L, 4, make_schedule("linear"), tiny.mask_id)
    with torch.no_grad():
        batch = objective.training_pass(x, torch.Generator().manual_seed(2))
        nll = model(batch.tokens, objective.positions, objective.mask, num_outputs=L, labels=x).token_nll
        terms = objective(model, x, torch.Generator().manual_seed(2))
    assert (batch.weights * nll).mean().item() == pytest.approx(terms.loss.item(), abs=1e-6)
    assert terms.num_tokens == 3 * (L - 1) and (batch.weights[:, 0] == 0).all()
    assert terms.nll_sum.item() == pytest.approx((batch.weights * nll).sum().item() * (L - 1) / L, rel=1e-6)
