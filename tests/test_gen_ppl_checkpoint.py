"""A sad3 AR-baseline checkpoint as the Gen. PPL evaluator: its score of a text equals the AR
objective's NLL of the same tokens after BOS (one window, so every token of the text is scored once)."""

import math

import pytest
import torch

from sad3_megatron.config import load_config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.masks import AttentionMask
from sad3_megatron.engine.build import load_components
from sad3_megatron.engine.trainer import train
from sad3_megatron.evaluation.generative import generative_perplexity, load_evaluator

TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64", "model.seq_len=32",
    "train.micro_batch_size=2", "train.progress_bar=false", "train.eval_interval=1000", "train.steps=1",
]  # fmt: skip


def test_ar_checkpoint_scores_text_like_its_own_objective(tmp_path):
    train(load_config("configs/demo.yaml", TINY + [f"run.out_dir={tmp_path / 'ar'}", "diffusion.objective=ar"]))
    model, tokenizer = load_evaluator(tmp_path / "ar")
    text = "it is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]  # a document from BOS
    assert 2 <= len(ids) <= 31
    gen = generative_perplexity([text], model, tokenizer)

    parts, _ = load_components(tmp_path / "ar")
    x = torch.tensor([ids])
    with torch.no_grad():
        causal = torch.tril(torch.ones(len(ids) - 1, len(ids) - 1, dtype=torch.bool))
        assert torch.equal(AttentionMask.causal(len(ids) - 1).dense(), causal)
        logits = parts.model(x[:, :-1], torch.arange(len(ids) - 1), AttentionMask.causal(len(ids) - 1)).logits
        nll = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
    assert gen.scored_tokens == len(ids) - 1
    assert gen.ppl == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_diffusion_checkpoint_is_refused_as_evaluator(tmp_path):
    train(load_config("configs/demo.yaml", TINY + [f"run.out_dir={tmp_path / 'bd'}"]))
    with pytest.raises(Sad3Error, match="diffusion checkpoint"):
        load_evaluator(tmp_path / "bd")
