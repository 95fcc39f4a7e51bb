"""D3PM with T discrete steps (Eq. 3): its Monte-Carlo NELBO against the T-step sum enumerated
exactly, and its approach to the continuous-time NELBO (Eq. 7), also enumerated, as T grows."""

import math

import pytest
import torch

from sad3_megatron.core.d3pm import DiscreteTimeObjective
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.schedules import NoiseSchedule
from tests.core.stub_denoiser import TableDenoiser, mask_patterns, masked_row

L, V, MASK = 3, 4, 3
X = [2, 0, 1]


def pattern_nll(model: TableDenoiser, pattern) -> float:
    """Σ over the masked positions of −log p_θ(x^i | x_t) for the x_t that masks `pattern`."""
    logits = model.logits_of(torch.tensor(masked_row(X, pattern, MASK)))
    log_p = logits.log_softmax(-1)
    return -sum(float(log_p[i, X[i]]) for i, m in enumerate(pattern) if m)


def continuous_nelbo(model) -> float:
    """Eq. 7, linear schedule: ∫ (1/t) Σ_M t^m (1−t)^{L−m} G(M) dt = Σ_M B(m, L−m+1) G(M)."""
    beta = lambda a, b: math.gamma(a) * math.gamma(b) / math.gamma(a + b)  # noqa: E731
    return sum(beta(sum(p), L - sum(p) + 1) * pattern_nll(model, p) for p in mask_patterns(L))


def discrete_nelbo(model, steps: int) -> float:
    """Eq. 3 summed term by term: Σ_j E_{x_t ~ q(·|x, j/T)} Σ_masked (α_{j-1} − α_j)/(1 − α_j) (−log p_θ),
    with α_j = 1 − j/T, so the weight of step j is 1/j."""
    total = 0.0
    for j in range(1, steps + 1):
        t = j / steps
        for p in mask_patterns(L):
            m = sum(p)
            total += (1 / j) * t**m * (1 - t) ** (L - m) * pattern_nll(model, p)
    return total


def estimate(model, steps: int, rows: int = 20000, repeats: int = 8) -> tuple[float, float]:
    """The objective's per-sequence NELBO over `repeats` independent batches: mean and standard error."""
    objective = DiscreteTimeObjective(L, L, NoiseSchedule("linear"), MASK, steps, clean_prefix=0)
    x = torch.tensor([X]).expand(rows, L)
    values = []
    for r in range(repeats):
        terms = objective(model, x, torch.Generator().manual_seed(r))
        values.append(terms.nll_sum.item() / rows)
    mean = sum(values) / repeats
    var = sum((v - mean) ** 2 for v in values) / (repeats - 1)
    return mean, math.sqrt(var / repeats)


def test_d3pm_nelbo_approaches_the_continuous_nelbo_as_t_grows():
    model = TableDenoiser(L, V, MASK, seed=5)
    exact_continuous = continuous_nelbo(model)
    gaps = []
    for steps in (10, 100, 1000):
        mean, se = estimate(model, steps)
        exact = discrete_nelbo(model, steps)
        assert abs(mean - exact) < 4 * se + 1e-6, (steps, mean, exact, se)  # the estimator is Eq. 3
        gaps.append(abs(exact - exact_continuous))
        if steps == 10:
            assert abs(mean - exact_continuous) > 4 * se  # at T = 10 the discretisation is visible
    assert gaps[1] < gaps[0] / 5 and gaps[2] < gaps[1] / 5  # O(1/T)
    assert gaps[2] < 1e-2 * exact_continuous


def test_one_step_d3pm_masks_everything():
    """T = 1: j = 1 always, every token masked, weight 1: the NELBO is Σ −log p_θ(x^i | all masked)."""
    model = TableDenoiser(L, V, MASK, seed=6)
    mean, se = estimate(model, 1, rows=10, repeats=2)
    assert se == 0.0 and mean == pytest.approx(pattern_nll(model, (True,) * L), rel=1e-5)


def test_d3pm_needs_the_full_range_of_t():
    with pytest.raises(Sad3Error, match="whole of"):
        DiscreteTimeObjective(L, L, NoiseSchedule("clipped", 0.3, 0.8), MASK, 10)
