"""The adaptation switches of the one block-diffusion objective (docs/adaptation.md), each against an
independent computation: the naive per-block loop of Alg. 1, the AR baseline on the same weights, a
hand-written mask, and exact enumeration with the stub denoiser."""

import itertools
import math

import pytest
import torch

from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.likelihood import estimate_bound
from sad3_megatron.core.masks import AttentionMask, RowsMask
from sad3_megatron.core.noising import NoisedBatch, complementary_pair
from sad3_megatron.core.objectives import AutoregressiveObjective, BlockDiffusionObjective, Switches
from sad3_megatron.core.registry import build_objective
from sad3_megatron.core.schedules import evaluation_schedule, make_schedule

from .stub_denoiser import TableDenoiser

L = 16
LINEAR = make_schedule("linear")


def objective(block_size, seq_len=L, schedule=LINEAR, mask_id=49, **switches):
    return BlockDiffusionObjective(seq_len, block_size, schedule, mask_id, switches=Switches(**switches))


VARIANTS = [
    {"shift": True},
    {"clean_attention": "causal"},
    {"shift": True, "clean_attention": "causal", "ar_loss_weight": 0.5, "diffusion_loss_weight": 0.3},
    {"complementary": True, "shift": True},
    {"loss_weighting": "uniform", "complementary": True},
]


@pytest.mark.parametrize("switches", VARIANTS)
@pytest.mark.parametrize("block_size", [1, 4, L])
def test_vectorized_pass_equals_the_naive_per_block_loop(tiny, switches, block_size):
    """Loss and gradients of the one x_t ⊕ x pass against Alg. 1 as a loop (clean K/V first, then one call
    per block), for every switch: the rows the shift reads and the clean half's attention are the loop's."""
    model = tiny.network(seed=block_size)
    x = tiny.tokens(3, L, seed=1)
    obj = objective(block_size, **switches)
    noised = obj.noise(x, torch.Generator().manual_seed(block_size))
    assert noised.masked.any()

    def loss_and_grads(naive):
        model.zero_grad()
        terms = obj.loss(model, x, noised, naive=naive)
        terms.loss.backward()
        return terms.loss.detach(), [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = loss_and_grads(False)
    slow, slow_grads = loss_and_grads(True)
    assert abs(fast - slow) <= 1e-5
    for a, b in zip(fast_grads, slow_grads, strict=True):
        assert (a - b).abs().max() <= 1e-5


def shifted_nll_by_hand(model, x, noised_x_t, block_size):
    """-log p(x_i) with the shift, one forward per block: the clean prefix then the noisy block under
    M_BC ⊕ full-block attention, reading position i - 1 (the prefix's last token for a block's first)."""
    rows = []
    n = x.shape[1]
    for start in range(0, n, block_size):
        tokens = torch.cat([x[:, :start], noised_x_t[:, start : start + block_size]], dim=1)
        length = tokens.shape[1]
        logits = model(tokens, torch.arange(length), AttentionMask.block_causal(length, block_size)).logits
        for i in range(start, start + block_size):
            if i == 0:
                rows.append(torch.zeros(x.shape[0]))
                continue
            logp = torch.log_softmax(logits[:, i - 1].double(), -1)
            rows.append(-logp.gather(1, x[:, i : i + 1]).squeeze(1).float())
    return torch.stack(rows, dim=1)


def test_shift_reads_row_i_minus_one_as_written_out_by_hand(tiny):
    """Each token's shifted NLL against a hand-built pass per block: clean prefix ⊕ noisy block, whose
    row i - 1 predicts token i (for a block's first token, the prefix's last, clean token)."""
    model = tiny.network(seed=5)
    x = tiny.tokens(2, L, seed=3)
    obj = objective(4, shift=True)
    noised = obj.noise(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = obj.token_nll(model, x, noised)
        slow = shifted_nll_by_hand(model, x, noised.x_t, 4)
    assert (fast[:, 1:] - slow[:, 1:]).abs().max() <= 1e-5


def test_shift_at_block_size_one_is_the_ar_nll_of_the_same_weights(tiny):
    """Token shift with L' = 1: token i comes from the clean row i - 1 under the causal mask, i.e. the
    AR model's next-token row, so the bound is the AR NLL exactly, in one pass, before any training."""
    model = tiny.network(seed=2)
    x = tiny.tokens(4, L, seed=7)
    with torch.no_grad():
        bound = estimate_bound(model, objective(1, shift=True), x, torch.device("cpu"), batch_size=2, draws=3)
        ar = estimate_bound(model, AutoregressiveObjective(L), x, torch.device("cpu"), batch_size=2)
        logits = model(x[:, :-1], torch.arange(L - 1), AttentionMask.causal(L - 1)).logits
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
    assert bound.exact and bound.draws == 1 and bound.tokens == ar.tokens == 4 * (L - 1)
    assert bound.nelbo_per_token == pytest.approx(ar.nelbo_per_token, abs=1e-6)
    assert bound.nelbo_per_token == pytest.approx(by_hand, abs=1e-6)
    # and under Bernoulli masks with t ~ U(0, 1] the 1/t-weighted estimate is unbiased for it (400 draws, one per row)
    shift = objective(1, shift=True)
    rows = x[:1].repeat(400, 1)
    with torch.no_grad():
        draws = shift.diffusion_terms(model, rows, shift.noise(rows, torch.Generator().manual_seed(0))).sum(-1)
        first = model(x[:1, :-1], torch.arange(L - 1), AttentionMask.causal(L - 1)).logits
    exact = torch.nn.functional.cross_entropy(first[0], x[0, 1:], reduction="sum").item()
    err = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - exact) < 4 * err and err < 0.05 * exact


def test_causal_clean_attention_mask_equals_a_hand_written_one():
    """L = 6, L' = 2: the noisy half keeps M_BD and M_OBC, the clean half is token-causal."""
    visible = {  # query -> keys (doubled indices; 0-5 noisy, 6-11 clean)
        0: {0, 1}, 1: {0, 1}, 2: {2, 3, 6, 7}, 3: {2, 3, 6, 7}, 4: {4, 5, 6, 7, 8, 9}, 5: {4, 5, 6, 7, 8, 9},
        6: {6}, 7: {6, 7}, 8: {6, 7, 8}, 9: {6, 7, 8, 9}, 10: {6, 7, 8, 9, 10}, 11: {6, 7, 8, 9, 10, 11},
    }  # fmt: skip
    expected = torch.zeros(12, 12, dtype=torch.bool)
    for q, keys in visible.items():
        expected[q, sorted(keys)] = True
    assert torch.equal(AttentionMask.doubled(6, 2, clean_block_size=1).dense(), expected)
    assert torch.equal(objective(2, seq_len=6, clean_attention="causal").mask.dense(), expected)
    # context parallelism's window of it: queries and keys at arbitrary rows, in any order
    q_rows, kv_rows = torch.tensor([9, 0, 11, 4, 7]), torch.randperm(12, generator=torch.Generator().manual_seed(0))
    rows = RowsMask(AttentionMask.doubled(6, 2, clean_block_size=1), q_rows, kv_rows)
    assert torch.equal(rows.dense(), expected[q_rows][:, kv_rows])
    assert torch.equal(rows.mask_mod()(0, 0, torch.arange(5)[:, None], torch.arange(12)[None, :]), expected[q_rows][:, kv_rows])
    assert torch.equal(objective(2, seq_len=6).mask.dense()[6:, 6:], torch.tensor(
        [[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2, dtype=torch.bool))  # M_BC untouched


@pytest.mark.parametrize("block_size", [4, L])
def test_ar_loss_on_the_clean_half_equals_the_ar_baseline_on_the_same_weights(tiny, block_size):
    """With the clean half token-causal, its rows are the AR model's: the AR term the loss adds (same
    noise, weight w) is w × the AR baseline's loss on the same weights."""
    model = tiny.network(seed=4)
    x = tiny.tokens(3, L, seed=6)
    base = objective(block_size, clean_attention="causal", shift=True)
    with_ar = objective(block_size, clean_attention="causal", shift=True, ar_loss_weight=0.7)
    noised = base.noise(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ar = AutoregressiveObjective(L)(model, x).loss.item()
        added = with_ar.loss(model, x, noised).loss.item() - base.loss(model, x, noised).loss.item()
    assert added == pytest.approx(0.7 * ar, abs=2e-6)


def test_loss_weighting_uniform_trains_without_1_over_t_and_the_bound_keeps_it(tiny):
    model = tiny.network(seed=8)
    x = tiny.tokens(2, L, seed=2)
    uniform = objective(4, loss_weighting="uniform")
    noised = uniform.noise(x, torch.Generator().manual_seed(3))
    with torch.no_grad():
        nll = objective(4).token_nll(model, x, noised)
        loss = uniform.loss(model, x, noised).loss.item()
        bound = uniform.bound().loss(model, x, noised).loss.item()
    assert loss == pytest.approx((nll * noised.masked).sum().item() / (2 * (L - 1)), abs=1e-6)
    assert bound == pytest.approx((nll * noised.masked * noised.weight).sum().item() / (2 * (L - 1)), abs=1e-6)
    assert uniform.bound().switches.loss_weighting == "elbo"


# ---- complementary masks: exact enumeration with the stub denoiser -------------------------------------------

N, V, MASK = 5, 4, 3  # one block (L' = L = 5, position 0 clean), vocabulary {0, 1, 2} + [MASK]


def stub_terms(stub, x, subset):
    """Σ_{i ∈ S} -log p(x_i | x with S masked), by table lookup."""
    row = [MASK if i in subset else v for i, v in enumerate(x)]
    logp = torch.log_softmax(stub.logits_of(torch.tensor([row]))[0], -1)
    return -sum(logp[i, x[i]].item() for i in subset)


def exact_nelbo(stub, x):
    """Σ_k (1/k) E_{|S| = k}[Σ_{i∈S} ℓ_i] over the free positions 1..N-1 (Eq. 7 with t integrated out)."""
    free = range(1, N)
    n = len(free)
    return sum(stub_terms(stub, x, set(s)) / (len(s) * math.comb(n, len(s)))
               for k in range(1, n + 1) for s in itertools.combinations(free, k))  # fmt: skip


def count_draws(x):
    """Every (S, P(S)) of `count` masking: k ~ U{1..n}, then a uniform k-subset of the free positions."""
    n = N - 1
    for k in range(1, n + 1):
        for s in itertools.combinations(range(1, N), k):
            yield set(s), 1.0 / (n * math.comb(n, k))


def noised_for(x, subset):
    """The NoisedBatch `count` masking draws for the masked set `subset` (weight n/k, t = k/n)."""
    n, k = N - 1, len(subset)
    masked = torch.tensor([[i in subset for i in range(N)]])
    x_t = torch.where(masked, torch.full_like(x, MASK), x)
    free = torch.tensor([[i > 0 for i in range(N)]])
    return NoisedBatch(torch.tensor([[k / n]]), x_t, masked, torch.full((1, N), n / k), free, n)


def test_complementary_pair_is_unbiased_and_has_less_variance_by_exact_enumeration():
    """Under `count` masking (the evaluation estimator), the average of a draw and its complement, with
    complement_weights, has exactly the NELBO as its mean over every possible draw, and a smaller variance
    than the draw alone (the complement is masked where the draw is clean)."""
    stub = TableDenoiser(N, V, MASK, seed=3)
    schedule = evaluation_schedule()
    single = BlockDiffusionObjective(N, N, schedule, MASK)
    paired = BlockDiffusionObjective(N, N, schedule, MASK, switches=Switches(complementary=True))
    for seed in range(3):
        x_list = torch.randint(0, MASK, (N,), generator=torch.Generator().manual_seed(seed)).tolist()
        x = torch.tensor([x_list])
        exact = exact_nelbo(stub, x_list) / (N - 1)
        moments = {"single": [0.0, 0.0], "pair": [0.0, 0.0]}
        for subset, p in count_draws(x_list):
            noised = noised_for(x, subset)
            pair = complementary_pair(noised, x, N, schedule, MASK)
            for name, obj, batch in (("single", single, noised), ("pair", paired, pair)):
                value = obj.loss(stub, x, batch).loss.item()
                moments[name][0] += p * value
                moments[name][1] += p * value * value
        mean_single, mean_pair = moments["single"][0], moments["pair"][0]
        var_single = moments["single"][1] - mean_single**2
        var_pair = moments["pair"][1] - mean_pair**2
        assert mean_single == pytest.approx(exact, rel=1e-6)  # float32 weights
        assert mean_pair == pytest.approx(exact, rel=1e-6)
        assert var_pair < var_single


def test_complementary_pair_is_unbiased_under_bernoulli_masks():
    """t ~ U(0, 1] with Bernoulli masks: the first draw weighs 1/t, its complement 1/(1 - t); the mean of
    many pairs drawn by the objective matches the enumeration."""
    stub = TableDenoiser(N, V, MASK, seed=5)
    obj = BlockDiffusionObjective(N, N, LINEAR, MASK, switches=Switches(complementary=True))
    x_list = [0, 2, 1, 1, 0]
    x = torch.tensor([x_list] * 64)
    exact = exact_nelbo(stub, x_list) / (N - 1)
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([obj(stub, x, generator).loss.item() for _ in range(100)])
    err = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - exact) < 4 * err and err < 0.03 * exact


def test_complementary_masks_lower_the_variance_of_the_network_estimate(tiny):
    """Measured on the tiny network at L' = 4 (Bernoulli masks, t ~ U(0, 1]): the spread of one sequence's
    estimate over 300 draws, one mask per row against the complementary pair (tools/bench_adaptation.py
    prints the ratio, and the step-time cost)."""
    model = tiny.network(seed=1)
    rows = tiny.tokens(1, L, seed=4).repeat(300, 1)  # one sequence, a fresh draw of the noise per row
    spreads = {}
    with torch.no_grad():
        for complementary in (False, True):
            obj = objective(4, complementary=complementary)
            noised = obj.noise(rows, torch.Generator().manual_seed(0))
            spreads[complementary] = obj.diffusion_terms(model, rows, noised).sum(-1).var().item()
    assert spreads[True] < spreads[False]


def test_registry_builds_every_switch_from_the_config():
    d = DiffusionConfig(block_size=4, shift=True, complementary_masks=True, clean_attention="causal",
                        ar_loss_weight=1.0, diffusion_loss_weight=0.3, loss_weighting="uniform")  # fmt: skip
    obj = build_objective(d, L, mask_id=49)
    assert obj.switches == Switches(True, True, "causal", "uniform", 1.0, 0.3)
    assert obj.copies == 2 and obj.num_outputs == 2 * L and obj.mask.clean_block == 1
    assert obj.bound().switches == Switches(True, True, "causal", "elbo", 0.0, 1.0)
