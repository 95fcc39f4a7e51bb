"""The bound of a continuation given a clean context (core/likelihood.py `estimate_continuations`,
the objectives' `scored_nll`), which `sad3 lm-eval` reports as a loglikelihood: against exact
enumeration of the mask patterns (the stub denoiser, and the tiny network block by block), exact
at L' = 1 against the AR log-probability written position by position, and the greedy rule
against a hand-written left-to-right greedy decoder."""

import itertools
import math

import pytest
import torch

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.likelihood import continuation_rows, estimate_continuations, greedy_continuations
from sad3_megatron.core.masks import AttentionMask
from sad3_megatron.core.objectives import AutoregressiveObjective, BlockDiffusionObjective, Switches
from sad3_megatron.core.schedules import NoiseSchedule
from tests.core.stub_denoiser import TableDenoiser

LINEAR = NoiseSchedule("linear")


def beta(a: int, b: int) -> float:
    return math.gamma(a) * math.gamma(b) / math.gamma(a + b)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def test_stub_estimate_is_unbiased_for_the_exact_conditional_nelbo():
    """One block (L' = L = 5) holding two clean context tokens, two continuation tokens and one
    position past the row's end ([MASK], never revealed, never scored). The continuous-time NELBO
    of Eq. 7 under the linear schedule, Bernoulli masks on the continuation only, is
    Σ_S ∫ (1/t) t^|S| (1-t)^(2-|S|) dt Σ_{i∈S} -log p(x_i | x_t) = Σ_S B(|S|, 3-|S|) Σ_{i∈S} ...,
    enumerated over the three non-empty S; the estimator (t integrated out) must average to it."""
    V, MASK = 4, 3
    model = TableDenoiser(5, V, MASK, seed=3)
    context, continuation = [2, 0], [1, 2]
    exact = 0.0
    for pattern in [(True, False), (False, True), (True, True)]:
        row = torch.tensor([*context, *(MASK if m else v for v, m in zip(continuation, pattern, strict=True)), MASK])
        log_p = model.logits_of(row).log_softmax(-1)
        nll = -sum(float(log_p[2 + i, v]) for i, (v, m) in enumerate(zip(continuation, pattern, strict=True)) if m)
        exact += beta(sum(pattern), 2 - sum(pattern) + 1) * nll
    x, scored = continuation_rows([(context, continuation)] * 4000, multiple=5, pad_id=MASK)
    assert x[0].tolist() == [2, 0, 1, 2, MASK] and scored[0].tolist() == [False, False, True, True, False]
    objective = BlockDiffusionObjective(5, 5, LINEAR, MASK)
    estimate = estimate_continuations(model, objective, x, scored, draws=4, seed=1)
    mean, stderr = mean_and_stderr(estimate.nll)
    assert not estimate.exact and estimate.draws == 4
    assert abs(mean - exact) < 4 * stderr and stderr < 0.01 * exact


def block_log_probs(model, x: torch.Tensor, start: int, block: int, masked: list[int], mask_id: int) -> torch.Tensor:
    """log p(· | block [start, start + L') with `masked` positions set to [MASK], clean x[:start]) [L', V]:
    one forward of the clean prefix then the noisy block under the block-causal mask (M_BC window)."""
    noisy = x[start : start + block].clone()
    noisy[[i - start for i in masked]] = mask_id
    tokens = torch.cat([x[:start], noisy])[None]
    n = tokens.shape[1]
    logits = model(tokens, torch.arange(n), AttentionMask.block_causal(n, block)).logits[0, start:]
    return torch.log_softmax(logits.double(), -1)


def exact_conditional_nelbo(model, x: torch.Tensor, scored: torch.Tensor, block: int, mask_id: int) -> float:
    """Σ over blocks, over the non-empty subsets S of the block's continuation positions F, of
    B(|S|, |F| - |S| + 1) Σ_{i∈S} -log p(x_i | ...): every other position clean (context, earlier
    blocks) or, past the row's end, [MASK] throughout."""
    total = 0.0
    for start in range(0, len(x), block):
        free = [i for i in range(start, start + block) if scored[i]]
        pads = [i for i in range(start, start + block) if x[i] == mask_id]
        for size in range(1, len(free) + 1):
            for subset in itertools.combinations(free, size):
                log_p = block_log_probs(model, x, start, block, [*subset, *pads], mask_id)
                total -= beta(size, len(free) - size + 1) * sum(float(log_p[i - start, x[i]]) for i in subset)
    return total


@pytest.mark.parametrize("block_size", [2, 4])
def test_estimate_over_clean_prefix_blocks_is_unbiased_against_enumeration(tiny, block_size):
    """The tiny network, a row of 7 tokens (3 context, 4 continuation) in 8 positions: clean prefix
    blocks, context inside the block where the continuation starts, and the last block completed
    with [MASK]; each block's subsets enumerated through the block-causal window by hand."""
    model = tiny.network(seed=5).eval()
    context, continuation = [7, 3, 11], [5, 20, 2, 9]
    x, scored = continuation_rows([(context, continuation)] * 600, multiple=block_size, pad_id=tiny.mask_id)
    assert x.shape[1] == 8 and x[0, 7] == tiny.mask_id
    with torch.no_grad():
        exact = exact_conditional_nelbo(model, x[0], scored[0], block_size, tiny.mask_id)
        estimate = estimate_continuations(model, BlockDiffusionObjective(8, block_size, LINEAR, tiny.mask_id), x, scored, 4)
    mean, stderr = mean_and_stderr(estimate.nll)
    assert abs(mean - exact) < 4 * stderr and stderr < 0.02 * exact


def ar_logprob_by_hand(model, tokens: list[int], first: int, mask_id: int) -> float:
    """Σ_{i ≥ first} log p(x_i | x_<i): one forward per position, x_<i then [MASK] at i, causal."""
    total = 0.0
    for i in range(first, len(tokens)):
        row = torch.tensor([[*tokens[:i], mask_id]])
        logits = model(row, torch.arange(i + 1), AttentionMask.causal(i + 1)).logits[0, -1]
        total += float(torch.log_softmax(logits.double(), -1)[tokens[i]])
    return total


def test_block_size_one_is_exact_and_equals_the_ar_log_probability(tiny):
    """L' = 1 (Suppl. B): one draw, no Monte-Carlo error, minus the AR log-probability of the
    continuation, for rows of several lengths in one padded batch."""
    model = tiny.network(seed=2).eval()
    requests = [([4], [9, 1, 30]), ([8, 8, 2, 17], [6]), ([1, 2], [3, 4, 5, 6, 7, 8])]
    x, scored = continuation_rows(requests, multiple=1, pad_id=tiny.mask_id)
    with torch.no_grad():
        estimate = estimate_continuations(model, BlockDiffusionObjective(8, 1, LINEAR, tiny.mask_id), x, scored, 8)
        expected = [-ar_logprob_by_hand(model, [*c, *t], len(c), tiny.mask_id) for c, t in requests]
    assert estimate.exact and estimate.draws == 1 and (estimate.std_err == 0).all()
    assert estimate.nll.tolist() == pytest.approx(expected, abs=1e-5)


def test_with_the_token_shift_block_size_one_is_the_ar_baseline_on_the_same_weights(tiny):
    """The token shift (docs/adaptation.md) at L' = 1 reads each token's prediction from the clean row
    before it: the continuation's bound is exact and equals the AR baseline's next-token log-probability
    of the same network (another pass: x[:, :-1] under the causal mask), with complementary masks too."""
    model = tiny.network(seed=5).eval()
    requests = [([4, 7], [9, 1, 30]), ([8], [6, 2])]
    x, scored = continuation_rows(requests, multiple=1, pad_id=tiny.mask_id)
    with torch.no_grad():
        reference = estimate_continuations(model, AutoregressiveObjective(x.shape[1]), x, scored).nll
        for switches in (Switches(shift=True), Switches(shift=True, complementary=True)):
            objective = BlockDiffusionObjective(x.shape[1], 1, LINEAR, tiny.mask_id, clean_prefix=1, switches=switches)
            estimate = estimate_continuations(model, objective, x, scored, 4)
            assert estimate.exact and estimate.nll.tolist() == pytest.approx(reference.tolist(), abs=1e-5), switches


def test_ar_baseline_scores_the_next_token_log_probability(tiny):
    model = tiny.network(seed=4).eval()
    requests = [([4, 5], [9, 1]), ([8], [6, 6, 6, 12])]
    x, scored = continuation_rows(requests, multiple=1, pad_id=tiny.mask_id)
    with torch.no_grad():
        estimate = estimate_continuations(model, AutoregressiveObjective(x.shape[1]), x, scored)
        for row, (context, continuation) in enumerate(requests):
            tokens = torch.tensor([[*context, *continuation]])
            n = tokens.shape[1]
            logits = model(tokens[:, :-1], torch.arange(n - 1), AttentionMask.causal(n - 1)).logits[0]
            log_p = torch.log_softmax(logits.double(), -1)[len(context) - 1 :]
            targets = torch.tensor(continuation)
            assert estimate.nll[row].item() == pytest.approx(-log_p.gather(1, targets[:, None]).sum().item(), abs=1e-5)
            assert bool(estimate.greedy[row]) == bool((log_p.argmax(-1) == targets).all())
    assert estimate.exact and estimate.draws == 1


def greedy_decode_by_hand(model, context: list[int], length: int, block: int, mask_id: int) -> list[int]:
    """Left-to-right greedy decoding: each position the argmax given everything before it, the
    positions after it in its block masked (a hand-written loop, one forward per token)."""
    tokens = list(context)
    for i in range(len(context), len(context) + length):
        start = i // block * block
        row = torch.tensor([*tokens, *[mask_id] * (start + block - i)])  # i and the rest of its block masked
        tokens.append(int(block_log_probs(model, row, start, block, [], mask_id)[i - start].argmax()))
    return tokens[len(context) :]


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_greedy_rule_is_left_to_right_greedy_decoding(tiny, block_size):
    """A continuation decoded greedily by hand is greedy; change one of its tokens and it is not."""
    model = tiny.network(seed=9).eval()
    context = [3, 14, 15]
    with torch.no_grad():
        greedy = greedy_decode_by_hand(model, context, 4, block_size, tiny.mask_id)
        other = [greedy[0], greedy[1], (greedy[2] + 1) % 40, greedy[3]]
        x, scored = continuation_rows([(context, greedy), (context, other)], block_size, tiny.mask_id)
        objective = BlockDiffusionObjective(x.shape[1], block_size, LINEAR, tiny.mask_id)
        assert greedy_continuations(model, objective, x, scored).tolist() == [True, False]


def test_greedy_rule_on_the_stub_over_every_continuation():
    """Every continuation of two tokens after two context tokens in one block of 4 (the stub reads the
    whole row, so a rule that let a position see the tokens after it would disagree): greedy iff the
    argmax with both continuation positions masked is the first token, and with only the second
    masked the second."""
    V, MASK = 4, 3
    model = TableDenoiser(4, V, MASK, seed=8)
    context = [1, 2]
    rows = [list(pair) for pair in itertools.product(range(MASK), repeat=2)]
    expected = []
    for first, second in rows:
        step_one = int(model.logits_of(torch.tensor([*context, MASK, MASK]))[2].argmax())
        step_two = int(model.logits_of(torch.tensor([*context, first, MASK]))[3].argmax())
        expected.append(step_one == first and step_two == second)
    x, scored = continuation_rows([(context, row) for row in rows], multiple=4, pad_id=MASK)
    got = greedy_continuations(model, BlockDiffusionObjective(4, 4, LINEAR, MASK), x, scored).tolist()
    assert got == expected and sum(expected) == 1


def test_a_continuation_needs_a_context_token():
    with pytest.raises(Sad3Error, match="empty context"):
        continuation_rows([([], [1, 2])], multiple=1, pad_id=0)
