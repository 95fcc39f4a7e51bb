"""Fixtures of the sampling tests: tiny random models and checkpoints, at each test module's
training context `L` and block size `BLOCK` (module constants)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module", autouse=True)
def _sampling_on_one_thread(one_thread):
    """Every sampling test runs on one thread (tests/conftest.py's one_thread)."""


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.model().eval()


@pytest.fixture(scope="module")
def sample(request, tiny):
    """generate() on a tiny model at the module's L and L'; returns the result and the logits of every call."""
    from sad3_megatron.core.generate import SamplingConfig, generate

    L, BLOCK = request.module.L, request.module.BLOCK

    def sample(model, record: bool = False, autoregressive: bool = False, prompt=(0,), eos_id=None, **settings):
        logits = []
        config = SamplingConfig(**{"num_tokens": 4 * L, "block_size": BLOCK, "batch_size": 3, "seed": 7, **settings})
        result = generate(
            model, config, seq_len=L, mask_id=tiny.mask_id, eos_id=eos_id, prompt=list(prompt),
            objective="ar" if autoregressive else "sad3",
            logits_hook=(lambda s, x: logits.append(x.clone())) if record else None,
        )  # fmt: skip
        return result, logits

    return sample


@pytest.fixture(scope="module")
def checkpoints(request, tmp_path_factory):
    """Untrained tiny checkpoints (diffusion and AR) in the layout `sad3 sample` reads."""
    from sad3_megatron.config import load_config, save_config
    from sad3_megatron.engine.build import build_components

    L, BLOCK = request.module.L, request.module.BLOCK
    paths = {}
    for objective in ("sad3", "ar"):
        cfg = load_config(
            ROOT / "configs" / "demo.yaml",
            ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64",
             f"model.seq_len={L}", f"diffusion.block_size={BLOCK}", f"diffusion.objective={objective}"],
        )  # fmt: skip
        parts = build_components(cfg, torch.device("cpu"), "sdpa")
        path = tmp_path_factory.mktemp(objective)
        weights = {k: v.contiguous() for k, v in parts.model.state_dict().items() if torch.is_tensor(v)}
        save_file(weights, str(path / "model.safetensors"))
        save_config(cfg, path / "config.yaml")
        paths[objective] = str(path)
    return paths


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random 1-layer GPT-2 with the bundled GPT-2 tokenizer, saved as a local HF directory."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(ROOT / "sad3_megatron/assets/tokenizers/gpt2"))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)
