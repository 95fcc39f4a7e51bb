"""Table 6's generative-perplexity protocol (Sec. 6.3; the reference code's `_sample`,
`_check_stop_conds` and `record_generative_perplexity`): samples of L tokens with BOS, documents
kept apart by the evaluator's EOS, the paper's rejection rule with reproducible redraws, and the
exact sliding window. Checked against hand-written rows, hand-framed token lists, a naive
log-softmax sum and direct batch-1 draws."""

import json
import math

import pytest
import torch

from sad3_megatron.cli import main
from sad3_megatron.core.context_window import context_window
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.generate import redraw_seed
from sad3_megatron.core.stopping import StopCriteria, unigram_entropy
from sad3_megatron.evaluation.generative import frame_documents, generative_perplexity, load_evaluator
from sad3_megatron.evaluation.samples import split_documents

L, BLOCK = 16, 4  # the tiny models' "training" context and block size (tests/sampling/conftest.py)


def _cli_json(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# --- 1. samples of exactly L tokens, BOS included -------------------------------------------------


@pytest.mark.parametrize("objective", ["sad3", "ar"])
def test_default_budget_makes_bos_plus_sample_exactly_l(checkpoints, objective, capsys):
    out = _cli_json(
        ["sample", checkpoints[objective], "--ignore-eos", "--batch-size", "2", "--steps", "2", "--json"], capsys
    )
    assert (out["num_tokens"], out["prompt_tokens"], out["sequence_length"]) == (L - 1, 1, L)
    for s in out["samples"]:
        assert s["length"] == len(s["tokens"]) == L - 1
        if objective == "ar":
            assert s["nfe"] == L - 1  # one call per generated token (the reference logs L for its L - 1 calls)
        else:
            assert 1 <= s["nfe"] <= L - 1
    prompted = _cli_json(
        ["sample", checkpoints[objective], "--ignore-eos", "--prompt", "it is a truth", "--json"], capsys
    )
    assert prompted["sequence_length"] == L and prompted["prompt_tokens"] > 2
    assert all(s["length"] == L - prompted["prompt_tokens"] for s in prompted["samples"])


def test_a_prompt_filling_the_context_needs_an_explicit_budget(sample, model):
    with pytest.raises(Sad3Error, match="pass --num-tokens"):
        sample(model, prompt=[0] * L, num_tokens=None)
    result, _ = sample(model, prompt=[0] * 5, num_tokens=None, stop_at_eos=False)
    assert all(s.length == L - 5 for s in result.samples)


# --- 2. EOS stays a document separator for the evaluator ------------------------------------------


def test_split_documents():
    eos = 7
    assert split_documents([1, 2, eos, 3, 4], eos) == [[1, 2], [3, 4]]
    assert split_documents([1, 2, eos], eos) == [[1, 2]]  # a sample that stopped at EOS
    assert split_documents([1, eos, eos, 2], eos) == [[1], [], [2]]
    assert split_documents([1, 2], None) == [[1, 2]]


class _Tokenizer:
    """Characters as ids 10, 11, ...: enough to check the framing by hand."""

    def __init__(self, bos, eos):
        self.bos_token_id, self.eos_token_id = bos, eos

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(c) - ord("a") for c in text]}


@pytest.mark.parametrize(
    "bos,eos,expected",
    [
        (1, 1, [1, 10, 11, 1, 12]),  # GPT-2: <|endoftext|> is both
        (1, 2, [1, 10, 11, 2, 1, 12]),  # BERT-like [CLS] ... [SEP] [CLS] ...
        (None, 2, [2, 10, 11, 2, 12]),
        (1, None, [1, 10, 11, 1, 12]),
    ],
)
def test_documents_are_framed_with_the_evaluators_special_tokens(bos, eos, expected):
    ids, unscored = frame_documents(["ab", "c"], _Tokenizer(bos, eos))
    assert ids == expected and unscored == {t for t in (bos, eos) if t is not None}


def test_two_document_sample_is_scored_with_eos_between_them(tiny_gpt2, tmp_path, capsys):
    """GPT-2 evaluator; the expected NLL is a log-softmax sum over the hand-built ids
    BOS ⊕ doc1 ⊕ EOS ⊕ doc2 in one forward pass, EOS targets left out."""
    model, tokenizer = load_evaluator(tiny_gpt2)
    docs = ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever."]
    eos = tokenizer.eos_token_id
    first, second = (tokenizer(d)["input_ids"] for d in docs)
    ids = [eos, *first, eos, *second]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    targets = [i for i in range(1, len(ids)) if ids[i] != eos]
    assert len(targets) == len(first) + len(second)  # every generated token, the separator not
    nll = -sum(logp[i - 1, ids[i]].item() for i in targets)
    gen = generative_perplexity([docs], model, tokenizer)
    assert gen.scored_tokens == len(targets)
    assert gen.nll_per_token == pytest.approx(nll / len(targets), rel=1e-6)
    run_together = generative_perplexity([docs[0] + docs[1]], model, tokenizer)  # what skipping EOS did
    assert run_together.nll_per_token != pytest.approx(gen.nll_per_token, rel=1e-5)

    samples = tmp_path / "samples.json"
    record = {"text": docs[0] + docs[1], "documents": docs, "tokens": [1, 2, 3], "stop_reason": "length"}
    samples.write_text(json.dumps({"samples": [record]}))
    summary = _cli_json(["eval-samples", str(samples), "--evaluator", tiny_gpt2, "--json"], capsys)
    assert summary["gen_nll_per_token"] == pytest.approx(nll / len(targets), rel=1e-6)
    assert summary["rejected_samples"] == 0


def test_sample_json_holds_the_documents_of_its_tokens(checkpoints, capsys):
    from sad3_megatron.engine.build import load_components

    out = _cli_json(["sample", checkpoints["sad3"], "--ignore-eos", "--batch-size", "3", "--json"], capsys)
    tok = load_components(checkpoints["sad3"])[0].tokenizer
    for s in out["samples"]:
        pieces, piece = [], []
        for t in [*s["tokens"], tok.eos_id]:  # a naive split, EOS dropped
            if t == tok.eos_id:
                pieces.append(tok.hf.decode(piece, skip_special_tokens=True))
                piece = []
            else:
                piece.append(t)
        if s["tokens"] and s["tokens"][-1] == tok.eos_id:
            pieces.pop()
        assert s["documents"] == pieces


# --- 3. the paper's stop rule: reject (fixed length) or truncate (variable length) ---------------


def _row(distinct: int, width: int = 256) -> list[int]:
    """`width` tokens cycling over `distinct` ids: unigram entropy ln(distinct) when it divides."""
    return [i % distinct for i in range(width)]


def test_paper_rule_on_hand_made_rows():
    """ln 32 = 3.47 < 4 < ln 64 = 4.16 nats; only the last 256 tokens count."""
    assert unigram_entropy(torch.tensor([_row(32)]))[0].item() == pytest.approx(math.log(32))
    fixed = StopCriteria(1000, None, 4.0, 256, "reject")
    rows = torch.tensor([_row(32), _row(64), _row(256)])
    reasons, lengths = fixed.check(rows, 252)
    assert reasons == ["rejected", None, None] and lengths.tolist() == [256, 256, 256]
    early = torch.tensor([_row(1, 255)])  # constant, but fewer than 256 tokens: not checked yet
    assert fixed.check(early, 252)[0] == [None]
    late = torch.tensor([[0] * 100 + [1000 + i for i in range(256)], _row(256, 100) + [5] * 256])
    assert fixed.check(late, 352)[0] == [None, "rejected"]
    at_budget = StopCriteria(256, None, 4.0, 256, "reject")  # the last block is checked too
    assert at_budget.check(torch.tensor([_row(32), _row(64)]), 252)[0] == ["rejected", "length"]

    variable = StopCriteria(1000, 999, 4.0, 256, "truncate")
    reasons, lengths = variable.check(torch.tensor([_row(256, 44) + _row(32), _row(32, 300)]), 296)
    assert reasons == ["repetition", "repetition"] and lengths.tolist() == [44, 44]  # the last 256 cut
    assert variable.check(torch.tensor([_row(32)]), 252)[0] == ["rejected"]  # nothing would be left

    keep = StopCriteria(1000, None, 4.0, 256, "keep")  # sad3's rule: stop, keep the tokens
    reasons, lengths = keep.check(torch.tensor([_row(32, 300)]), 296)
    assert reasons == ["repetition"] and lengths.tolist() == [300]


def test_rejected_samples_are_redrawn_with_seeds_of_index_and_attempt(sample, model):
    """Window 8, floor 2.0 < ln 8: a sample of 8 tokens is kept iff its tokens are all distinct,
    checked once (at 8 generated tokens). Each kept sample must equal the batch-1 draw seeded with
    redraw_seed(seed, index, rejections), or the first batch's row when it was never rejected."""
    rule = {"num_tokens": 8, "stop_rule": "paper", "min_entropy": 2.0, "entropy_window": 8, "batch_size": 6}
    result, _ = sample(model, max_redraws=10, **rule)
    first, _ = sample(model, max_redraws=0, **rule)
    assert 0 < sum(s.stop_reason == "rejected" for s in first.samples) < 6  # some, not all, rejected at first
    assert any(s.rejections > 0 for s in result.samples) and result.rejections == sum(
        s.rejections for s in result.samples
    )
    for i, (s, f) in enumerate(zip(result.samples, first.samples, strict=True)):
        assert s.stop_reason == "length" and len(set(s.tokens)) == 8 == s.length
        assert (s.rejections == 0) == (f.stop_reason == "length")
        if s.rejections == 0:
            assert s.tokens == f.tokens
        else:
            alone, _ = sample(model, max_redraws=0, **{**rule, "batch_size": 1, "seed": redraw_seed(7, i, s.rejections)})
            assert alone.samples[0].tokens == s.tokens and alone.samples[0].nfe == s.nfe
    again, _ = sample(model, max_redraws=10, **rule)
    assert [s.tokens for s in again.samples] == [s.tokens for s in result.samples]


def test_samples_still_degenerate_after_the_redraws_are_kept_and_flagged(sample, tiny, model):
    result, _ = sample(model, stop_rule="paper", min_entropy=10.0, entropy_window=8, max_redraws=2)
    assert all(s.stop_reason == "rejected" and s.rejections == 3 and s.length == 11 for s in result.samples)
    # Variable length (an EOS the model never produces): the last 8 tokens are cut instead.
    truncated, _ = sample(model, stop_rule="paper", min_entropy=10.0, entropy_window=8, eos_id=tiny.mask_id)
    assert all(s.stop_reason == "repetition" and s.length == 3 and s.rejections == 0 for s in truncated.samples)


def test_redraw_seeds_are_distinct_and_reproducible():
    seeds = {redraw_seed(s, i, a) for s in range(3) for i in range(20) for a in range(1, 11)}
    assert len(seeds) == 3 * 20 * 10 and all(0 <= x < 2**63 for x in seeds) and not seeds & set(range(1000))
    assert redraw_seed(0, 1, 2) == redraw_seed(0, 1, 2)


def test_cli_reports_the_rule_and_the_rejections(checkpoints, capsys):
    argv = ["sample", checkpoints["sad3"], "--ignore-eos", "--batch-size", "2", "--json"]
    out = _cli_json([*argv, "--min-entropy", "10", "--entropy-window", "8", "--max-redraws", "1"], capsys)
    assert (out["stop_rule"], out["entropy_window"], out["min_entropy"], out["rejections"]) == ("paper", 8, 10.0, 4)
    assert all(s["stop_reason"] == "rejected" and s["rejections"] == 2 for s in out["samples"])
    assert _cli_json([*argv, "--stop-rule", "sad3"], capsys)["entropy_window"] == 64


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--stop-rule", "mdlm"], "unknown --stop-rule"),
        (["--max-redraws", "-1"], "--max-redraws >= 0"),
        (["--sliding", "ring"], "unknown --sliding"),
        (["--sliding", "exact", "--window-keep", "4"], "drop --window-keep 4"),
    ],
)
def test_bad_protocol_options_are_one_line(checkpoints, extra, needle, capsys):
    assert main(["sample", checkpoints["sad3"], *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sad3: error:") and needle in err, err


# --- 4. the exact sliding window ------------------------------------------------------------------


def test_exact_window_starts_exactly_l_minus_block_back():
    exact = context_window(L, BLOCK, sliding="exact")
    assert (exact.size, exact.keep) == (L - BLOCK, L - BLOCK)
    for s in range(0, 20 * L, BLOCK):
        assert exact.start(s) == max(0, s - (L - BLOCK))
    assert context_window(L, BLOCK).keep == (L - BLOCK) // 2 // BLOCK * BLOCK  # the default is unchanged


def test_exact_sliding_conditions_on_exactly_the_last_window(sample, tiny, model):
    """A token at s - (L - L') changes the block at s; one just before it does not (both paths)."""
    long, _ = sample(model, batch_size=1, stop_at_eos=False)
    sequence = [0, *long.samples[0].tokens]
    s = 3 * L + BLOCK  # a block start where the halving window would begin elsewhere
    c = s - (L - BLOCK)
    assert context_window(L, BLOCK).start(s) != c

    def first_logits(prompt, kv_cache):
        _, logits = sample(model, record=True, prompt=prompt, num_tokens=BLOCK, batch_size=1, kv_cache=kv_cache,
                        sliding="exact")  # fmt: skip
        return logits[0]

    for kv_cache in (True, False):
        base = first_logits(sequence[:s], kv_cache)
        for position, matters in ((c, True), (c - 1, False), (s - 1, True)):
            changed = list(sequence[:s])
            changed[position] = (changed[position] + 1) % tiny.mask_id
            assert torch.equal(base, first_logits(changed, kv_cache)) != matters, (position, kv_cache)
