"""End-to-end training through the DeepSpeed engine on the bundled corpus (CPU)."""

import json

import numpy as np
import pytest

from sad3_megatron.config import load_config
from sad3_megatron.data import load_corpus, load_tokenizer
from sad3_megatron.engine.trainer import train

SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.ffn_hidden_size=256",
    "model.seq_len=64",
    "train.micro_batch_size=16",
    "train.progress_bar=false",
    "train.eval_batches=4",
]


def metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    common = SMALL + [
        "train.lr_schedule=constant",
        "train.warmup_steps=2",
        "train.log_interval=1",
        "train.save_interval=3",
        "train.eval_interval=100",
    ]
    straight = load_config("configs/demo.yaml", common + [f"run.out_dir={tmp_path / 'a'}", "train.steps=6"])
    train(straight)
    first = load_config("configs/demo.yaml", common + [f"run.out_dir={tmp_path / 'b'}", "train.steps=3"])
    train(first)
    second = load_config(
        "configs/demo.yaml", common + [f"run.out_dir={tmp_path / 'b'}", "train.steps=6", "train.resume=auto"]
    )
    train(second)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in a), (a, b)  # bit-identical, not merely close


@pytest.mark.slow
def test_tiny_model_learns_well_below_unigram_entropy(tmp_path):
    """The vectorized x_t ⊕ x path with L' = 1 and the fully-masking schedule (the paper's tuned
    L' = 1 recipe, Sec. 4.2); its bound under t ~ U[0, 1] on held-out text is what is compared."""
    cfg = load_config(
        "configs/demo.yaml",
        [
            f"run.out_dir={tmp_path}", "model.seq_len=64", "train.steps=300", "train.lr=2e-3", "train.warmup_steps=20",
            "train.eval_interval=300", "train.save_interval=300", "train.ema_decay=0", "train.log_interval=50",
            "train.progress_bar=false", "diffusion.block_size=1", "diffusion.beta=1.0", "diffusion.omega=1.0",
        ],
    )  # fmt: skip
    result = train(cfg)
    corpus = load_corpus(cfg.data, load_tokenizer(cfg.data.tokenizer), 64)
    counts = np.bincount(np.asarray(corpus.train[: len(corpus.train)]).ravel()).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    assert result.val["nelbo_per_token"] < unigram_entropy - 0.5, (result.val, unigram_entropy)


def test_training_with_document_packing_runs(tmp_path):
    cfg = load_config(
        "configs/demo.yaml",
        SMALL + [f"run.out_dir={tmp_path}", "train.steps=2", "train.eval_interval=2", "data.packing=document"],
    )
    result = train(cfg)
    assert np.isfinite(result.final_loss) and np.isfinite(result.val["nelbo_per_token"])


def test_bf16_autocast_is_kept_inside_the_deepspeed_engine():
    """DeepSpeed switches off an outer autocast around its forward unless its config has a
    torch_autocast section: without it, train.precision=bf16 would silently run in fp32."""
    import torch
    from deepspeed.runtime.config import get_torch_autocast_dtype, get_torch_autocast_enabled

    from sad3_megatron.engine.trainer import deepspeed_config

    cfg = load_config("configs/demo.yaml", [])
    bf16 = deepspeed_config(cfg, torch.bfloat16)
    assert get_torch_autocast_enabled(bf16) and get_torch_autocast_dtype(bf16) == torch.bfloat16
    assert not get_torch_autocast_enabled(deepspeed_config(cfg, None))
