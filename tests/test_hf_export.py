"""`sad3 export`: the transformers model computes what the trainer's model computes, samples what
`sad3 sample` samples, loads from its directory alone (no sad3, DeepSpeed or megatron), refuses
tampered weights, and the AR baseline scores text through transformers' own API as `sad3 eval` does.

References: the megatron-core model of the checkpoint (loaded by `sad3 sample` / `sad3 eval`), and a
single-process run for the parallel layouts."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sad3_megatron.cli import main
from sad3_megatron.config import load_config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.masks import AttentionMask, doubled_positions
from sad3_megatron.data.corpus import load_corpus
from sad3_megatron.engine.build import load_components
from sad3_megatron.engine.export import SHIPPED_CORE_FILES, SHIPPED_HF_FILES, export_checkpoint
from sad3_megatron.engine.trainer import train
from sad3_megatron.evaluation.generative import generative_perplexity, load_evaluator
from sad3_megatron.hf.modeling_sad3 import Sad3ForCausalLM, Sad3ForMaskedLM

ROOT = Path(__file__).resolve().parent.parent
L, BLOCK = 32, 4
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.ffn_hidden_size=64",
    f"model.seq_len={L}", f"diffusion.block_size={BLOCK}", "train.micro_batch_size=2", "train.progress_bar=false",
    "train.eval_interval=2", "train.eval_batches=1", "train.steps=2", "train.lr=1e-2", "train.warmup_steps=1",
]  # fmt: skip


def _train_and_export(root: Path, *overrides: str) -> tuple[Path, Path]:
    run = root / "run"
    train(load_config("configs/demo.yaml", [*TINY, *overrides, f"run.out_dir={run}"]))
    export_checkpoint(run, root / "hf")
    return run, root / "hf"


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory):
    return _train_and_export(tmp_path_factory.mktemp("bd"))


@pytest.fixture(scope="module")
def autoregressive(tmp_path_factory):
    return _train_and_export(tmp_path_factory.mktemp("ar"), "diffusion.objective=ar")


def _cli_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return json.loads(out.getvalue())


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(a)
    assert (a[finite] - b[finite]).abs().max().item() <= 1e-5


def test_export_directory_holds_a_standard_transformers_model(diffusion):
    from transformers import AutoTokenizer

    run, export = diffusion
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "sad3" and config["architectures"] == ["Sad3ForMaskedLM"]
    expected = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                "max_position_embeddings": L, "block_size": BLOCK, "objective": "sad3", "noise_schedule": "clipped",
                "noise_beta": 0.3, "noise_omega": 0.8, "rope_theta": 10000.0, "vocab_size": 30522}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_sad3.Sad3ForMaskedLM"
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=False)  # a standard tokenizer: no custom code
    assert not {"is_local", "local_files_only"} & set(json.loads((export / "tokenizer_config.json").read_text()))
    assert (tok.mask_token_id, tok.bos_token_id, tok.eos_token_id) == (
        config["mask_token_id"], config["bos_token_id"], config["eos_token_id"]) == (103, 101, 102)  # fmt: skip
    for name in SHIPPED_CORE_FILES:  # the package's own files, verbatim
        assert (export / name).read_bytes() == (ROOT / "sad3_megatron/core" / name).read_bytes()
    for name in SHIPPED_HF_FILES:  # the same, with the imports of core made flat
        assert (export / name).read_text() == (ROOT / "sad3_megatron/hf" / name).read_text().replace("..core.", ".")
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["sad3_sampling"]["block_size"] == BLOCK and generation["eos_token_id"] == 102
    last_val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_nelbo" in line][-1]
    card = (export / "README.md").read_text()
    assert f"{last_val['val_nelbo']:.4f}" in card and "2 steps" in card
    assert json.dumps(json.loads((run / "data_stats.json").read_text()), indent=1) in card


def test_gpt2_tokenizer_gets_its_mask_token_at_sad3s_id(tmp_path):
    from transformers import AutoTokenizer

    from sad3_megatron.data.tokenizers import load_tokenizer
    from sad3_megatron.engine.export import export_tokenizer

    sad3_tok = load_tokenizer("gpt2")
    export_tokenizer(sad3_tok, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.mask_token_id == sad3_tok.mask_id == 50257 == len(tok) - 1
    assert load_tokenizer("gpt2").hf.mask_token_id is None  # the bundled tokenizer is left as it was


def test_exported_logits_equal_the_trainers_model(diffusion):
    run, export = diffusion
    parts, _ = load_components(run)
    sad3, objective = parts.model, parts.objective
    hf = Sad3ForMaskedLM.from_pretrained(export).eval()
    x = torch.randint(0, 1000, (2, L), generator=torch.Generator().manual_seed(0))
    noised = objective.noise(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        # The vectorized x_t ⊕ x pass of Alg. 1.
        tokens, positions, mask = torch.cat([noised.x_t, x], 1), doubled_positions(L), AttentionMask.doubled(L, BLOCK)
        ref = sad3(tokens, positions, mask, num_outputs=L).logits
        out = hf(tokens, position_ids=positions, sad3_mask=mask, num_outputs=L).logits
        masked = noised.masked
        _assert_close(out[masked], ref[masked])
        assert torch.isinf(ref[masked][:, 103]).all()  # SUBS: never [MASK]
        # SUBS inside the model: an unmasked position predicts its own token with probability 1.
        assert torch.equal(out[~masked].argmax(-1), x[~masked]) and (out[~masked].logsumexp(-1) == 0).all()
        # Cached block steps: the clean prefix is encoded once, then a noisy block is denoised against it.
        s = 3 * BLOCK
        ref_kv = sad3(x[:, :s], torch.arange(s), AttentionMask.block_causal(s, BLOCK), return_kv=True).kv
        cache = hf(x[:, :s], use_cache=True).past_key_values
        block = noised.x_t[:, s : s + BLOCK]
        ref = sad3(block, torch.arange(s, s + BLOCK), None, past_kv=ref_kv).logits
        out = hf(block, past_key_values=cache).logits
        is_masked = block == 103
        _assert_close(out[is_masked], ref[is_masked])
        assert cache.get_seq_length() == s  # denoising steps leave the cache alone
        # Legacy per-layer (K, V) tuples work as past_key_values too.
        _assert_close(hf(block, past_key_values=[(k, v) for k, v in ref_kv]).logits[is_masked], ref[is_masked])


@pytest.mark.parametrize("cached", [True, False])
def test_exported_samples_equal_sad3_sample(diffusion, cached):
    run, export = diffusion
    hf = Sad3ForMaskedLM.from_pretrained(export)
    settings = {"num_tokens": 3 * L, "steps": 3, "batch_size": 2, "seed": 5, "stop_at_eos": False, "min_entropy": 0.0}
    result = hf.generate_blocks(None, kv_cache=cached, **settings)  # 3 L tokens: the window slides
    argv = ["sample", str(run), "--json", "--num-tokens", str(3 * L), "--steps", "3", "--batch-size", "2",
            "--seed", "5", "--ignore-eos", "--min-entropy", "0", *([] if cached else ["--no-kv-cache"])]  # fmt: skip
    reference = _cli_json(*argv)
    assert [s.tokens for s in result.samples] == [s["tokens"] for s in reference["samples"]]
    assert all(len(s.tokens) == 3 * L for s in result.samples)
    from_export = _cli_json("sample", str(export), *argv[2:])  # `sad3 sample` of the exported directory
    assert [s["tokens"] for s in from_export["samples"]] == [s["tokens"] for s in reference["samples"]]


def test_confident_sampling_with_a_prompt_matches_too(diffusion):
    run, export = diffusion
    hf = Sad3ForMaskedLM.from_pretrained(export)
    parts, _ = load_components(run)
    prompt = [101, *parts.tokenizer.encode("it is a truth universally acknowledged")]
    result = hf.generate_blocks(prompt, num_tokens=40, sampler="confident", threshold=0.3, steps=8, top_p=0.9,
                                temperature=0.8, seed=3, batch_size=3)  # fmt: skip
    argv = ["sample", str(run), "--json", "--num-tokens", "40", "--sampler", "confident", "--threshold", "0.3",
            "--steps", "8", "--top-p", "0.9", "--temperature", "0.8", "--seed", "3", "--batch-size", "3",
            "--prompt", "it is a truth universally acknowledged"]  # fmt: skip
    reference = _cli_json(*argv)
    assert [(s.tokens, s.stop_reason) for s in result.samples] == [
        (s["tokens"], s["stop_reason"]) for s in reference["samples"]
    ]


def test_exported_sample_defaults_and_protocol_options_match_sad3_sample(diffusion):
    """Default budget L - 1 (BOS + sample = L), the paper's stop rule with redraws, exact sliding."""
    run, export = diffusion
    hf = Sad3ForMaskedLM.from_pretrained(export)
    rule = {"min_entropy": 10.0, "entropy_window": 8, "max_redraws": 1}  # every draw is rejected
    result = hf.generate_blocks(None, steps=2, batch_size=2, seed=1, stop_at_eos=False, sliding="exact", **rule)
    argv = ["sample", str(run), "--json", "--steps", "2", "--batch-size", "2", "--seed", "1", "--ignore-eos",
            "--sliding", "exact", "--min-entropy", "10", "--entropy-window", "8", "--max-redraws", "1"]  # fmt: skip
    reference = _cli_json(*argv)
    assert [(s.tokens, s.rejections) for s in result.samples] == [
        (s["tokens"], s["rejections"]) for s in reference["samples"]
    ]
    assert all(s.rejections == 2 and s.stop_reason == "rejected" for s in result.samples)
    plain = hf.generate_blocks(None, steps=2, seed=1, stop_at_eos=False)
    assert plain.samples[0].length == L - 1 and reference["sequence_length"] == L


def test_export_bound_equals_sad3_eval(diffusion):
    run, export = diffusion
    parts, _ = load_components(run)
    val = torch.as_tensor(load_corpus(parts.cfg.data, parts.tokenizer, L).val[:3])
    ref = _cli_json("eval", str(run), "--split", "val", "--max-sequences", "3", "--batch-size", "3", "--draws", "4",
                    "--json")  # fmt: skip
    out = Sad3ForMaskedLM.from_pretrained(export).nelbo(val, draws=4)
    assert out["tokens"] == ref["tokens"]
    assert out["nelbo_per_token"] == pytest.approx(ref["nelbo_per_token"], rel=1e-5)
    from_export = _cli_json("eval", str(export), *["--split", "val", "--max-sequences", "3", "--batch-size", "3",
                                                  "--draws", "4", "--json"])  # fmt: skip
    assert from_export["nelbo_per_token"] == pytest.approx(ref["nelbo_per_token"], rel=1e-5)


def _exact_bound(hf, x: list[int], block: int, term) -> float:
    """The continuous-time NELBO per scored token of one row, written out from the export's forward:
    for every block b and every non-empty set S of its free positions (position 0 is context), the
    model sees x^{<b} clean and block b with S masked (transformers' own forward: the clean prefix
    and the block, block-causally); t integrated out weights each |S| = k by 1/k over C(n_b, k) sets
    (core/schedules.py, `count`). `term(logits, x)` is a masked position's loss: -log p_θ, or SEDD's
    score-entropy bracket. The mask is M_BC at `block` (Suppl. D), given explicitly: the export's
    forward defaults to its own L'."""
    import itertools
    import math

    mask, total = hf.config.mask_token_id, 0.0
    for start in range(0, len(x), block):
        free = [i for i in range(start, start + block) if i > 0]
        for k in range(1, len(free) + 1):
            for subset in itertools.combinations(free, k):
                row = [mask if i in subset else v for i, v in enumerate(x[: start + block])]
                visible = AttentionMask.clean_window(0, len(row), block)  # M_BC at this L': the prefix, then the block
                with torch.no_grad():
                    logits = hf(torch.tensor([row]), sad3_mask=visible).logits[0].double()
                loss = sum(term(logits[i], x[i]) for i in subset)
                total += loss / k / math.comb(len(free), k)
    return total / (len(x) - 1)


def _nll(logits: torch.Tensor, target: int) -> float:
    return -logits.log_softmax(-1)[target].item()


def test_export_bound_equals_an_exact_enumeration(diffusion):
    """The export's nelbo against the bound written out over every mask (not estimate_bound again):
    exact in one pass at L' = 1, unbiased at L' = 4 (within 4 standard errors of 400 draws)."""
    _, export = diffusion
    hf = Sad3ForMaskedLM.from_pretrained(export).eval()
    x = [101, *torch.randint(1000, 5000, (7,), generator=torch.Generator().manual_seed(3)).tolist()]
    one = hf.nelbo(torch.tensor([x]), block_size=1)
    assert one["exact"] and one["nelbo_per_token"] == pytest.approx(_exact_bound(hf, x, 1, _nll), rel=1e-5)
    exact = _exact_bound(hf, x, BLOCK, _nll)
    out = hf.nelbo(torch.tensor([x]), draws=400, seed=1)
    assert abs(out["nelbo_per_token"] - exact) < 4 * out["std_err"] and out["std_err"] < 0.05 * exact


@pytest.fixture(scope="module")
def sedd(tmp_path_factory):
    return _train_and_export(tmp_path_factory.mktemp("sedd"), "diffusion.objective=sedd", "model.seq_len=8",
                             "diffusion.block_size=8")  # fmt: skip


def test_sedd_export_scores_sedds_bound_as_its_run_does(sedd):
    """A SEDD export's nelbo is the score-entropy bound (Lou et al.; core/sedd.py): the enumeration
    with SEDD's bracket, above the MDLM bound of the same logits, and what `sad3 eval` says of the run."""
    import math

    run, export = sedd
    hf = Sad3ForMaskedLM.from_pretrained(export).eval()
    assert hf.config.objective == "sedd" and hf.generation_config.sad3_sampling["sampler"] == "euler"

    def score_entropy(logits: torch.Tensor, target: int) -> float:  # expm1(log Z) - (h_x0 - log N), N = V - 1
        log_n = math.log(logits.shape[-1] - 1)
        return math.expm1(torch.logsumexp(logits, -1).item() - log_n) - (logits[target].item() - log_n)

    parts, _ = load_components(run)
    val = torch.as_tensor(load_corpus(parts.cfg.data, parts.tokenizer, 8).val[:3])
    x = val[0].tolist()
    exact, mdlm = _exact_bound(hf, x, 8, score_entropy), _exact_bound(hf, x, 8, _nll)
    out = hf.nelbo(torch.tensor([x]), draws=400, seed=1)
    assert abs(out["nelbo_per_token"] - exact) < 4 * out["std_err"] and exact > mdlm
    ref = _cli_json("eval", str(run), "--split", "val", "--max-sequences", "3", "--batch-size", "3", "--draws", "4",
                    "--json")  # fmt: skip
    assert hf.nelbo(val, draws=4)["nelbo_per_token"] == pytest.approx(ref["nelbo_per_token"], rel=1e-5)


def test_export_greedy_samples_equal_a_hand_written_loop(diffusion):
    """Alg. 2 of the export (KV cache, a prompt that ends inside a block, past L with the sliding
    window) against a loop over transformers' forward that recomputes the window from the tokens:
    with a vanishing nucleus every masked position of a block takes its argmax in one step."""
    _, export = diffusion
    hf = Sad3ForMaskedLM.from_pretrained(export).eval()
    prompt = [101, 2009, 2003, 1037, 3606, 6315]  # 6 tokens: the second block starts filled
    result = hf.generate_blocks(prompt, num_tokens=2 * L, sampler="confident", threshold=1.0, top_p=1e-9, steps=1,
                                stop_at_eos=False, min_entropy=0.0)  # fmt: skip
    window = L - BLOCK  # the default window: at most L - L' context tokens, halved when it slides
    tokens, mask = list(prompt), hf.config.mask_token_id
    for start in range(len(prompt) // BLOCK * BLOCK, len(prompt) + 2 * L, BLOCK):
        first = 0 if start <= window else start - window + _slide_offset(start, window)
        block = tokens[start : start + BLOCK] + [mask] * (start + BLOCK - len(tokens))
        with torch.no_grad():
            logits = hf(torch.tensor([tokens[first:start] + block]), position_ids=torch.arange(first, start + BLOCK)).logits
        argmax = logits[0, -BLOCK:].argmax(-1).tolist()
        tokens = tokens[:start] + [t if t != mask else a for t, a in zip(block, argmax, strict=True)]
    assert result.samples[0].tokens == tokens[len(prompt) : len(prompt) + 2 * L]


def _slide_offset(start: int, window: int) -> int:
    """core/context_window.py's halving rule written out: after the window fills, it restarts from its
    newest half and grows again, so the context of block s begins (s - window) + offset."""
    keep, first = window // 2 // BLOCK * BLOCK, 0
    for s in range(0, start + 1, BLOCK):
        if s - first > window:
            first = s - keep
    return first - (start - window)


@pytest.mark.parametrize("tamper", ["missing", "unexpected", "mis-shaped"])
def test_tampered_export_is_refused_naming_the_tensor(diffusion, tmp_path, tamper):
    import shutil

    _, export = diffusion
    copy = tmp_path / "hf"
    shutil.copytree(export, copy)
    tensors = load_file(copy / "model.safetensors")
    name = "model.layers.1.mlp.fc1.bias"
    if tamper == "missing":
        del tensors[name]
    elif tamper == "unexpected":
        tensors["model.layers.2.mlp.fc1.bias"] = tensors[name].clone()
        name = "model.layers.2.mlp.fc1.bias"
    else:
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Sad3Error, match=f"{tamper}: {name.replace('.', '[.]')}"):
        Sad3ForMaskedLM.from_pretrained(copy)
    assert main(["sample", str(copy), "--num-tokens", "4"]) == 2  # the CLI: one line, exit 2


def test_sharded_export_loads_the_same_weights(diffusion, tmp_path):
    run, export = diffusion
    export_checkpoint(run, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = Sad3ForMaskedLM.from_pretrained(export), Sad3ForMaskedLM.from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


BLOCKER = """
import sys
# As if not installed: importing them fails, and importlib.util.find_spec (transformers probes for deepspeed
# when accelerate is installed) answers None.
for name in ("deepspeed", "megatron", "sad3_megatron"):
    sys.modules[name] = None
import json, torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
bd_dir, ar_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(bd_dir, trust_remote_code=False)  # a standard tokenizer: no custom code
bd = AutoModelForMaskedLM.from_pretrained(bd_dir, trust_remote_code=True)
ids = [bd.config.bos_token_id] + tok("it is a truth", add_special_tokens=False).input_ids
result = bd.generate_blocks(ids, num_tokens=20, steps=4, batch_size=2, seed=1)
x = torch.tensor([tok("she was the youngest of the two daughters of a most affectionate indulgent father",
                      add_special_tokens=False).input_ids[:16]])
ar = AutoModelForCausalLM.from_pretrained(ar_dir, trust_remote_code=True)
greedy = ar.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
blocked = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("deepspeed", "megatron", "sad3_megatron")]
print(json.dumps({"samples": [s.tokens for s in result.samples], "nelbo": bd.nelbo(x, draws=2)["nelbo_per_token"],
                  "greedy": greedy[0].tolist(), "ar_loss": ar(x, labels=x).loss.item(), "loaded": blocked,
                  "module": type(bd).__module__}))
"""


def test_export_loads_samples_and_scores_without_sad3_deepspeed_or_megatron(diffusion, autoregressive, tmp_path):
    bd_dir, ar_dir = diffusion[1], autoregressive[1]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(bd_dir), str(ar_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["module"].startswith("transformers_modules.")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bd_dir, trust_remote_code=False)
    bd = Sad3ForMaskedLM.from_pretrained(bd_dir)
    ids = [101] + tok("it is a truth", add_special_tokens=False).input_ids
    assert out["samples"] == [s.tokens for s in bd.generate_blocks(ids, num_tokens=20, steps=4, batch_size=2, seed=1).samples]
    x = torch.tensor([tok("she was the youngest of the two daughters of a most affectionate indulgent father",
                          add_special_tokens=False).input_ids[:16]])  # fmt: skip
    assert out["nelbo"] == pytest.approx(bd.nelbo(x, draws=2)["nelbo_per_token"], rel=1e-6)
    ar = Sad3ForCausalLM.from_pretrained(ar_dir)
    assert out["ar_loss"] == pytest.approx(ar(x, labels=x).loss.item(), rel=1e-6)
    assert out["greedy"] == _greedy_reference(ar_dir, ids, 8)


def _greedy_reference(ar_dir: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding written out: the whole sequence recomputed under the causal mask every step,
    with the trainer's model of the run the export came from."""
    parts, _ = load_components(ar_dir.parent / "run")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            n = len(ids)
            logits = parts.model(torch.tensor([ids]), torch.arange(n), AttentionMask.causal(n)).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids


def test_ar_export_nll_through_transformers_equals_sad3_eval(autoregressive):
    run, export = autoregressive
    parts, _ = load_components(run)
    val = torch.as_tensor(load_corpus(parts.cfg.data, parts.tokenizer, L).val[:4])
    ref = _cli_json("eval", str(run), "--split", "val", "--max-sequences", "4", "--json")
    model = Sad3ForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        loss = model(val, labels=val).loss.item()  # transformers' API: mean NLL of tokens 2..L
        logits = model(val).logits[:, :-1]
        by_hand = -logits.log_softmax(-1).gather(-1, val[:, 1:, None]).mean().item()
    assert ref["exact"] and ref["tokens"] == 4 * (L - 1)
    assert loss == pytest.approx(ref["nelbo_per_token"], rel=1e-5) and by_hand == pytest.approx(loss, rel=1e-6)
    # transformers' generate() with its cache equals the recomputed greedy loop.
    prompt = val[:1, :5]
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert cached[0].tolist() == _greedy_reference(export, prompt[0].tolist(), 10)
    # sad3's own loop (Alg. 2's cache, one token per step) greedy too, through a vanishing nucleus.
    ours = model.generate_blocks(prompt[0].tolist(), num_tokens=10, top_p=1e-9, stop_at_eos=False, min_entropy=0.0)
    assert ours.samples[0].tokens == cached[0, 5:].tolist()
    # By default transformers' generate() stops at the training context L (past it, generate_blocks slides).
    assert model.generate(prompt, do_sample=False).shape[1] == L


def test_ar_export_and_ar_checkpoint_are_evaluators_with_one_scoring_path(autoregressive, diffusion):
    run, export = autoregressive
    text = "it is a truth universally acknowledged, that a single man in possession of a good fortune"
    scores = []
    for source in (export, run):  # the checkpoint is exported on the fly
        model, tokenizer = load_evaluator(source)
        assert isinstance(model, Sad3ForCausalLM)
        scores.append(generative_perplexity([text], model, tokenizer).ppl)
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)
    with pytest.raises(Sad3Error, match="diffusion model export"):
        load_evaluator(diffusion[1])


@pytest.mark.slow
def test_tensor_parallel_and_zero3_checkpoints_export_the_single_process_tensors(launch, tmp_path):
    common = ["train.steps=2", "train.ema_decay=0.9"]  # global batch 8 in every layout, as in test_parallel
    layouts = {
        "single": (["train.grad_accum_steps=2"], 1),
        "tp2": (["parallel.tensor_parallel=2", "train.grad_accum_steps=2"], 2),
        "zero3": (["parallel.zero_stage=3"], 2),
    }
    exported = {}
    for name, (overrides, nproc) in layouts.items():
        launch.run_train(tmp_path / name, [*common, *overrides], nproc=nproc)
        export_checkpoint(tmp_path / name, tmp_path / f"{name}-hf")
        exported[name] = load_file(tmp_path / f"{name}-hf" / "model.safetensors")
    for name in ("tp2", "zero3"):
        assert exported[name].keys() == exported["single"].keys()
        for key, tensor in exported["single"].items():
            assert torch.allclose(exported[name][key], tensor, atol=1e-5, rtol=0), (name, key)
