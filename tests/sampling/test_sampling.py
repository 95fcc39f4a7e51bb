"""Sampling (Alg. 2 with a KV cache, any length), within-block samplers, stopping, the CLI, and
generative perplexity. Random tiny models: these are equivalence and accounting tests."""

import json
import math
from pathlib import Path

import pytest
import torch

from sad3_megatron.cli import main
from sad3_megatron.core.block_context import CachedContext, RecomputeContext
from sad3_megatron.core.context_window import context_window
from sad3_megatron.core.distributions import draw_categorical, shape_probs
from sad3_megatron.core.masks import AttentionMask
from sad3_megatron.core.stopping import unigram_entropy

ROOT = Path(__file__).resolve().parents[2]
L, BLOCK = 16, 4  # the tiny models' "training" context and block size


def assert_logits_agree(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(torch.isinf(x), torch.isinf(y))  # the mask token, and nothing else, is -inf
        finite = torch.isfinite(x)
        assert (x[finite] - y[finite]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "settings",
    [
        {"sampler": "ancestral", "steps": 3},
        {"sampler": "first_hitting", "top_p": 0.9, "temperature": 0.7},
        {"sampler": "confident", "threshold": 0.04, "steps": 2},
    ],
)
def test_kv_cache_and_recompute_give_the_same_samples(sample, model, settings):
    """4×L tokens, so the window slides and is re-encoded several times on the cached path."""
    cached, cached_logits = sample(model, record=True, kv_cache=True, **settings)
    recomputed, recomputed_logits = sample(model, record=True, kv_cache=False, **settings)
    assert [s.tokens for s in cached.samples] == [s.tokens for s in recomputed.samples]
    assert [s.nfe for s in cached.samples] == [s.nfe for s in recomputed.samples]
    assert all(s.length == 4 * L and s.stop_reason == "length" for s in cached.samples)
    assert_logits_agree(cached_logits, recomputed_logits)
    assert cached.clean_passes > 0 and recomputed.clean_passes == 0


def test_autoregressive_kv_cache_matches_recompute(sample, model):
    cached, cached_logits = sample(model, record=True, autoregressive=True, kv_cache=True)
    recomputed, recomputed_logits = sample(model, record=True, autoregressive=True, kv_cache=False)
    assert [s.tokens for s in cached.samples] == [s.tokens for s in recomputed.samples]
    assert all(s.nfe == s.length == 4 * L for s in cached.samples)  # one NFE per token
    assert_logits_agree(cached_logits, recomputed_logits)


def test_reference_layout_is_the_block_causal_pass_and_the_cached_pass(tiny, model):
    """The no-cache reference (x_t ⊕ prefix under the training mask's window) equals running
    prefix ⊕ x_t under M_BC and reading the last block, and the KV-cache pass (Eq. 6)."""
    prefix, x_t = tiny.tokens(2, 3 * BLOCK, seed=1), tiny.tokens(2, BLOCK, seed=2)
    x_t[:, 1:3] = tiny.mask_id
    start, end = 5 * BLOCK, 8 * BLOCK  # absolute positions past a short context, as after a slide
    tokens = torch.zeros(2, end + BLOCK, dtype=torch.long)
    tokens[:, start:end] = prefix
    with torch.no_grad():
        joint = torch.cat([prefix, x_t], dim=1)
        mask = AttentionMask.block_causal(joint.shape[1], BLOCK)
        expected = model(joint, torch.arange(start, end + BLOCK), mask).logits[:, -BLOCK:]
        outputs = []
        for context in (RecomputeContext(model, BLOCK), CachedContext(model, BLOCK)):
            context.prepare(tokens, start, end)
            outputs.append(context.denoise(None, x_t, end))
    for out in outputs:
        assert_logits_agree([out], [expected])


def test_samples_beyond_the_context_condition_on_the_window_only(sample, tiny, model):
    long, _ = sample(model, batch_size=1)
    sequence = [0] + long.samples[0].tokens  # BOS + 4×L generated tokens
    assert len(sequence) == 4 * L + 1
    s = 3 * L  # a block far beyond the training context
    window = context_window(L, BLOCK)
    c = window.start(s)
    assert (window.size, window.keep, c) == (L - BLOCK, 4, 36)
    inside, outside = c + 2, c - 3

    def first_logits(prompt, kv_cache):
        _, logits = sample(model, record=True, prompt=prompt, num_tokens=BLOCK, batch_size=1, kv_cache=kv_cache)
        return logits[0]

    for kv_cache in (True, False):
        base = first_logits(sequence[:s], kv_cache)
        for position, matters in ((inside, True), (outside, False)):
            changed = list(sequence[:s])
            changed[position] = (changed[position] + 1) % tiny.mask_id
            other = first_logits(changed, kv_cache)
            assert torch.equal(base, other) != matters, (position, kv_cache)


def test_nfes_never_exceed_the_generated_tokens(sample, model):
    """T ≫ L': the cached x-prediction spends an NFE only when the block changed (Table 6)."""
    budget = 30  # not a multiple of L': the last block is partly beyond the budget
    ancestral, _ = sample(model, steps=10_000, num_tokens=budget)
    for s in ancestral.samples:
        assert s.length == budget and s.nfe <= s.length
    first_hitting, _ = sample(model, sampler="first_hitting", num_tokens=budget)
    assert all(s.nfe == s.length for s in first_hitting.samples)  # one token per NFE
    confident, _ = sample(model, sampler="confident", threshold=0.03, num_tokens=budget)
    assert all(s.nfe <= s.length for s in confident.samples)
    one_step, _ = sample(model, steps=1, num_tokens=budget)  # T = 1: the whole block at once
    blocks = math.ceil((budget + 1) / BLOCK)
    assert all(s.nfe == blocks for s in one_step.samples)


def test_stopping_at_eos_and_on_repetition(sample, model):
    eos = 5
    result, _ = sample(model, eos_id=eos, batch_size=6, num_tokens=40)
    reasons = {s.stop_reason for s in result.samples}
    assert "eos" in reasons  # with 49 tokens, most samples meet token 5 within 40 tokens
    for s in result.samples:
        assert len(s.tokens) == s.length
        if s.stop_reason == "eos":
            assert s.tokens[-1] == eos and eos not in s.tokens[:-1]
        else:
            assert s.stop_reason == "length" and s.length == 40 and eos not in s.tokens
    # An unreachable entropy floor: every sample stops at the first check with 8 recent tokens,
    # after the block ending at position 12 (BOS + 11 generated tokens).
    repetitive, _ = sample(model, stop_rule="sad3", min_entropy=10.0, entropy_window=8)
    assert all(s.stop_reason == "repetition" and s.length == 11 for s in repetitive.samples)


def test_nucleus_temperature_and_categorical_draws():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(shape_probs(logits, top_p=0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(shape_probs(logits, top_p=0.5), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    cold = shape_probs(logits, temperature=0.5)  # p^2, renormalised
    assert torch.allclose(cold, torch.tensor([[0.25, 0.09, 0.0225, 0.0025]]) / 0.365)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2]).expand(40_000, 4)
    draws = draw_categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert freq[1] == 0 and torch.allclose(freq, probs[0].double(), atol=0.01)


def test_unigram_entropy():
    h = unigram_entropy(torch.tensor([[1, 2, 1, 2], [3, 3, 3, 3], [4, 1, 2, 3]]))
    assert torch.allclose(h, torch.tensor([math.log(2), 0.0, math.log(4)], dtype=h.dtype))


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--block-size", "5"], "does not divide"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--sampler", "greedy"], "unknown sampler"),
        (["--window", "13"], "--window 13 must be between 0 and 12"),
        (["--window", "6"], "multiple of the block size"),
        (["--num-tokens", "0"], "--num-tokens must be at least 1"),
    ],
)
def test_bad_sample_arguments_are_one_line(checkpoints, extra, needle, capsys):
    assert main(["sample", checkpoints["sad3"], *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sad3: error:") and needle in err, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["sample", "/no/such/run"], "no checkpoint"),
        (["eval-samples", "/no/such/samples.json"], "not found"),
        (["eval-samples", __file__], "is not JSON"),
    ],
)
def test_bad_paths_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sad3: error:") and needle in err, err


def test_block_size_is_refused_for_the_ar_baseline(checkpoints, capsys):
    assert main(["sample", checkpoints["ar"], "--block-size", "4"]) == 2
    assert "AR baseline" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["sad3", "ar"])
def test_sample_cli_writes_json_that_eval_samples_reads(checkpoints, objective, tmp_path, capsys):
    out = tmp_path / "samples.json"
    argv = ["sample", checkpoints[objective], "--num-tokens", "40", "--batch-size", "2", "--json", "--out", str(out)]
    assert main([*argv, "--ignore-eos"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["window"] == (L - 2 if objective == "ar" else L - BLOCK)
    for s in printed["samples"]:
        assert s["length"] == len(s["tokens"]) == 40 and s["stop_reason"] == "length"
        assert isinstance(s["text"], str) and s["nfe"] >= 1 and s["tokens_per_s"] > 0
    assert main(["eval-samples", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 2 and summary["mean_length"] == 40 and summary["mean_unigram_entropy"] > 0


def test_generative_perplexity_matches_a_direct_computation(tiny_gpt2, tmp_path, capsys):
    from sad3_megatron.evaluation.generative import generative_perplexity, load_evaluator

    model, tokenizer = load_evaluator(tiny_gpt2)
    texts = ["It is a truth universally acknowledged.<|endoftext|>A single man", "Emma Woodhouse, handsome, clever."]
    gen = generative_perplexity(texts, model, tokenizer)
    assert gen.max_length == 64  # clipped to the evaluator's context
    total, count = 0.0, 0
    eos = tokenizer.eos_token_id
    for text in texts:  # one window each, from BOS (GPT-2: EOS): a log-softmax sum, EOS targets left out
        ids = tokenizer("<|endoftext|>" + text)["input_ids"]
        assert ids[0] == eos and (eos in ids[1:] or text == texts[1])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for i in range(1, len(ids)):
            if ids[i] != eos:
                total -= logp[i - 1, ids[i]].item()
                count += 1
    assert gen.scored_tokens == count
    assert gen.ppl == pytest.approx(math.exp(total / count), rel=1e-5)

    # The CLI on a samples file gives the same number.
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps({"samples": [{"text": t, "tokens": [1, 2, 3]} for t in texts]}))
    assert main(["eval-samples", str(samples), "--evaluator", tiny_gpt2, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gen_ppl"] == pytest.approx(gen.ppl, rel=1e-6)


def test_generative_perplexity_windows_score_each_token_once(tiny_gpt2):
    """Past one window, each token is scored once, with the context its sliding window gives it."""
    from sad3_megatron.evaluation.generative import load_evaluator, sequence_nll

    model, tokenizer = load_evaluator(tiny_gpt2)
    text = (ROOT / "sad3_megatron/assets/corpora/austen/persuasion.txt").read_text()[:600]
    ids = tokenizer(text)["input_ids"][:100]
    max_length, stride = 32, 12
    nll, count = sequence_nll(model, ids, (), max_length, stride)
    assert count == len(ids) - 1
    expected = 0.0
    for i in range(1, len(ids)):  # the first window (start k·stride) that reaches token i scores it
        begin = 0
        while begin + max_length <= i:
            begin += stride
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin : i + 1]])).logits[0, -2].double()
        expected -= torch.log_softmax(logits, dim=-1)[ids[i]].item()
    assert nll == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("autoregressive", [False, True])
def test_one_prompt_per_sample_continues_each_as_if_alone(sample, model, autoregressive):
    """Prompts of one length, one per sample (how `sad3 lm-eval` batches requests): with greedy values
    and a deterministic order (confident decoding; AR argmax) each row is what its prompt gives alone,
    on the cached path across window slides."""
    prompts = [[0, 5, 9], [0, 17, 3], [0, 22, 40]]
    greedy = {"sampler": "confident", "threshold": 1.0, "steps": BLOCK, "top_p": 1e-9, "num_tokens": 2 * L}
    together, _ = sample(model, autoregressive=autoregressive, prompt=prompts, **greedy)
    for prompt, row in zip(prompts, together.samples, strict=True):
        alone, _ = sample(model, autoregressive=autoregressive, prompt=prompt, batch_size=1, **greedy)
        assert row.tokens == alone.samples[0].tokens and len(row.tokens) == 2 * L
