"""SEDD (absorbing score entropy): the loss against Lou et al.'s DWDSE written out by hand, its
bound against the exact likelihood of the reverse CTMC it defines, and its Euler sampler against
the exact distribution of SEDD's Euler steps."""

import math

import numpy as np
import pytest
import torch

from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.noising import NoisedBatch
from sad3_megatron.core.objectives import BlockDiffusionObjective
from sad3_megatron.core.registry import build_objective, make_sampler
from sad3_megatron.core.samplers import denoise_block
from sad3_megatron.core.schedules import NoiseSchedule
from sad3_megatron.core.sedd import ScoreEntropyObjective
from tests.core.stub_denoiser import TableDenoiser, mask_patterns, masked_row

L, V, MASK = 3, 4, 3  # three real tokens and the mask
LINEAR = NoiseSchedule("linear")


def dwdse_by_hand(logits, x, x_t, t) -> float:
    """Σ over masked tokens of σ'(t) [Σ_{y≠m} s_y − r log s_x0 + r (log r − 1)] with SEDD's
    scale_by_sigma log-score h_y − log(e^σ − 1) − log(V − 1), σ = −log(1 − t) (LogLinear, ε = 0)."""
    total = 0.0
    for b in range(x.shape[0]):
        tb = float(t[b, 0])
        sigma, dsigma = -math.log(1 - tb), 1 / (1 - tb)
        r = 1 / math.expm1(sigma)
        for i in range(x.shape[1]):
            if int(x_t[b, i]) != MASK:
                continue
            log_score = [float(logits[b, i, y]) - math.log(math.expm1(sigma)) - math.log(V - 1) for y in range(V)]
            positive = sum(math.exp(log_score[y]) for y in range(V) if y != MASK)
            negative = r * log_score[int(x[b, i])]
            total += dsigma * (positive - negative + r * (math.log(r) - 1))
    return total


def test_loss_equals_the_dwdse_written_out():
    model = TableDenoiser(L, V, MASK, seed=1)
    objective = ScoreEntropyObjective(L, LINEAR, MASK, clean_prefix=0)
    x = torch.randint(0, MASK, (200, L), generator=torch.Generator().manual_seed(0))
    noised = objective.noise(x, torch.Generator().manual_seed(1))
    assert noised.t.max() < 1  # σ(1) = ∞; not drawn here
    got = objective.loss(model, x, noised).nll_sum.item()
    expected = dwdse_by_hand(model.logits_of(noised.x_t), x, noised.x_t, noised.t)
    assert got == pytest.approx(expected, rel=1e-5)


def exact_bound(objective, model, x: list[int], nodes: int = 24) -> float:
    """E_t E_{x_t} of the objective's loss on one sequence, exactly: every mask pattern, and
    Gauss-Legendre in t (the integrand is a polynomial in t for a time-agnostic denoiser)."""
    u, w = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for pattern in mask_patterns(len(x)):
        m = sum(pattern)
        for ui, wi in zip(u, w, strict=True):
            t = torch.tensor([[(ui + 1) / 2]], dtype=torch.float32)
            row = torch.tensor([masked_row(x, pattern, MASK)])
            masked = torch.tensor([pattern])
            weight = LINEAR.loss_weight(t).expand(1, len(x)) * masked
            noised = NoisedBatch(t, row, masked, weight)
            loss = objective.loss(model, torch.tensor([x]), noised).nll_sum.item()
            total += wi / 2 * float(t) ** m * (1 - float(t)) ** (len(x) - m) * loss
    return total


def exact_nll_of_reverse_ctmc(model: TableDenoiser, x: list[int]) -> float:
    """−log p(x) of the reverse process SEDD samples from. Its rate m → y at position i is
    σ'(t) s_y = exp(h_iy) / (N t): in u = −log t a time-homogeneous chain from all-[MASK] (t = 1)
    that unmasks one token per jump, so p(x) sums the jump probabilities over unmasking orders."""

    def reach(state: list[int]) -> float:
        masked = [i for i, v in enumerate(state) if v == MASK]
        if not masked:
            return 1.0
        rates = model.logits_of(torch.tensor(state)).exp()  # [L, V]; the mask column is 0
        total = sum(float(rates[i].sum()) for i in masked)
        return sum(
            float(rates[i, x[i]]) / total * reach([x[i] if k == i else v for k, v in enumerate(state)]) for i in masked
        )

    return -math.log(reach([MASK] * len(x)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_is_at_least_the_exact_nll_and_the_mdlm_bound(seed):
    model = TableDenoiser(L, V, MASK, seed=seed)
    sedd = ScoreEntropyObjective(L, LINEAR, MASK, clean_prefix=0)
    mdlm = BlockDiffusionObjective(L, L, LINEAR, MASK, clean_prefix=0)
    for x in ([0, 1, 2], [2, 2, 0], [1, 0, 1]):
        bound = exact_bound(sedd, model, x)
        assert bound == pytest.approx(exact_bound(sedd, model, x, nodes=40), rel=1e-6)  # quadrature converged
        nll = exact_nll_of_reverse_ctmc(model, x)
        assert bound >= nll - 1e-6
        assert bound > exact_bound(mdlm, model, x) + 1e-3  # SEDD's unnormalised score costs nats (Table 3)


def test_bound_equals_mdlm_when_the_score_is_normalised():
    """With mean_y exp(h_y) = 1 the score is the true-form α_t/(1−α_t)·p_θ and DWDSE is Eq. 7 exactly."""
    model = TableDenoiser(L, V, MASK, seed=3)
    model.table -= torch.logsumexp(model.table, -1, keepdim=True) - math.log(V - 1)
    sedd = ScoreEntropyObjective(L, LINEAR, MASK, clean_prefix=0)
    mdlm = BlockDiffusionObjective(L, L, LINEAR, MASK, clean_prefix=0)
    x = [2, 0, 1]
    assert exact_bound(sedd, model, x) == pytest.approx(exact_bound(mdlm, model, x), rel=1e-5)


def euler_distribution(model: TableDenoiser, steps: int) -> dict:
    """Exact law of SEDD's Euler sampler with noise removal on a block of two positions: at each
    step j = T..1 every masked position moves independently with probability min(1, Z/j) to a
    value drawn from p_θ, then the remaining masks are drawn from p_θ (written as a Markov chain)."""

    def branches(state, masked, move_prob):
        """(next state, probability) for every subset of masked positions that moves and its values."""
        logits = model.logits_of(torch.tensor(state))
        probs = logits.softmax(-1)
        out = [(list(state), 1.0)]
        for i in masked:
            q = move_prob(float(logits[i].exp().sum() / (V - 1)))
            step = []
            for s, p in out:
                step.append((s, p * (1 - q)))
                step += [
                    ([y if k == i else v for k, v in enumerate(s)], p * q * float(probs[i, y])) for y in range(MASK)
                ]
            out = step
        return out

    dist = {(MASK, MASK): 1.0}
    for j in list(range(steps, 0, -1)) + [0]:  # 0: the noise removal, every mask moves
        new = {}
        for state, p in dist.items():
            masked = [i for i, v in enumerate(state) if v == MASK]
            for s, q in branches(state, masked, lambda z, j=j: 1.0 if j == 0 else min(1.0, z / j)):
                new[tuple(s)] = new.get(tuple(s), 0.0) + p * q
        dist = new
    return dist


def test_euler_sampler_draws_from_the_euler_chain():
    model = TableDenoiser(2, V, MASK, seed=4, scale=1.0)
    model.table[:, 0] += 1.0  # position 0 has a large score mass (Z ≈ 4), position 1 a small one
    model.table[:, 1] -= 2.0
    steps, n = 4, 20000
    expected = euler_distribution(model, steps)
    assert sum(expected.values()) == pytest.approx(1.0)
    x = torch.full((n, 2), MASK)
    result = denoise_block(
        x, x == MASK, lambda index, x_t: model.logits_of(x_t).float(), make_sampler("euler", steps),
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert (result.tokens != MASK).all() and result.nfe.min() >= 1 and result.nfe.max() <= 2
    outcomes = [(a, b) for a in range(MASK) for b in range(MASK)]
    counts = {o: 0 for o in outcomes}
    for row in result.tokens.tolist():
        counts[tuple(row)] += 1
    chi2 = sum((counts[o] - n * expected[o]) ** 2 / (n * expected[o]) for o in outcomes)
    assert chi2 < 26.12  # χ²(8 dof) at p = 0.001

    # The test has power: a uniformly random unmasking order (MDLM's sampler) is rejected outright.
    p = lambda row: model.logits_of(torch.tensor(row)).softmax(-1)  # noqa: E731
    order_free = {
        (a, b): 0.5 * float(p([MASK, MASK])[0, a] * p([a, MASK])[1, b])
        + 0.5 * float(p([MASK, MASK])[1, b] * p([MASK, b])[0, a])
        for a, b in outcomes
    }
    assert sum((counts[o] - n * order_free[o]) ** 2 / (n * order_free[o]) for o in outcomes) > 100


def test_objective_trains_the_transformer(tiny):
    model = tiny.network()
    objective = build_objective(DiffusionConfig(objective="sedd", schedule="linear", block_size=16), 16, tiny.mask_id)
    assert isinstance(objective, ScoreEntropyObjective)
    terms = objective(model, tiny.tokens(4, 16), torch.Generator().manual_seed(0))
    terms.loss.backward()
    assert torch.isfinite(terms.loss) and model.embedding.embed.weight.grad.abs().sum() > 0
