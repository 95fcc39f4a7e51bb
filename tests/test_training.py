"""End-to-end training through the DeepSpeed engine on the bundled corpus (CPU)."""

import json

import numpy as np
import pytest

from sad3_megatron.config import load_config
from sad3_megatron.data.corpus import load_corpus
from sad3_megatron.data.tokenizers import load_tokenizer
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


EVAL = SMALL[:5] + ["model.seq_len=32", "train.micro_batch_size=2", "train.progress_bar=false", "train.steps=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step diffusion run (L' = 4) and a 2-step AR run, to evaluate and build on."""
    runs = {}
    for name, extra in (("sad3", []), ("ar", ["diffusion.objective=ar"])):
        out = tmp_path_factory.mktemp(name)
        train(load_config("configs/demo.yaml", EVAL + extra + [f"run.out_dir={out}", "train.eval_batches=1"]))
        runs[name] = out
    return runs


def test_eval_reports_the_bound_as_text_and_json(trained, capsys):
    from sad3_megatron.cli import main

    run = str(trained["sad3"])
    common = ["eval", run, "--split", "val", "--draws", "2", "--max-sequences", "4", "--batch-size", "2"]
    assert main(common) == 0
    text = capsys.readouterr().out.strip().splitlines()[-1]
    assert text.startswith("NELBO (L'=4, 2 draws") and text.endswith(" in 4 sequences")
    assert main([*common, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["sequences"], result["draws"], result["block_size"]) == (4, 2, 4)
    assert f"; {result['tokens']} tokens in 4 sequences" in text
    assert f"{result['nelbo_per_token']:.4f} ± {result['std_err']:.4f}" in text
    assert result["ppl"] == pytest.approx(np.exp(result["nelbo_per_token"]), rel=1e-9) and not result["exact"]
    assert main([*common, "--json", "--block-size", "32"]) == 0  # MDLM's bound for the same weights
    mdlm = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mdlm["block_size"] == 32 and mdlm["nelbo_per_token"] != result["nelbo_per_token"]


def test_eval_of_the_ar_baseline_is_the_exact_nll(trained, capsys):
    from sad3_megatron.cli import main

    assert main(["eval", str(trained["ar"]), "--split", "val", "--max-sequences", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["exact"] and result["std_err"] == 0.0 and result["sequences"] == 3
    assert result["draws"] == 1 and result["ppl"] == pytest.approx(np.exp(result["nelbo_per_token"]), rel=1e-9)
    assert main(["eval", str(trained["ar"]), "--split", "val", "--max-sequences", "3"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("NLL (exact, AR): ")


def test_init_from_starts_stage_two_from_exactly_the_stage_one_weights(trained, tmp_path):
    import torch
    from safetensors.torch import load_file

    from sad3_megatron.engine.trainer import Trainer

    stage1 = load_file(str(trained["sad3"] / "checkpoints" / "step_0000002" / "model.safetensors"))
    cfg = load_config(
        "configs/demo.yaml", EVAL + [f"run.out_dir={tmp_path}", f"train.init_from={trained['sad3']}", "diffusion.block_size=8"]
    )
    state = {k: v for k, v in Trainer(cfg).engine.module.state_dict().items() if not k.endswith("_extra_state")}
    assert sorted(state) == sorted(stage1)
    assert all(torch.equal(state[k], stage1[k]) for k in stage1)


def test_consolidate_tool_writes_the_checkpoint_weights(trained, tmp_path, capsys):
    import runpy
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "consolidate_checkpoint.py"))["main"]

    ckpt = trained["sad3"] / "checkpoints" / "step_0000002"
    for flag, name in ((), "model"), (("--ema",), "ema"):
        out = tmp_path / f"{name}.safetensors"
        assert main([str(trained["sad3"]), str(out), *flag]) == 0
        ours, saved = load_file(str(out)), load_file(str(ckpt / f"{name}.safetensors"))
        assert sorted(ours) == sorted(saved) and all(torch.equal(ours[k], saved[k]) for k in saved)
    assert f"from {ckpt}" in capsys.readouterr().out
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("consolidate: error: no checkpoint")


def test_gpu_checks_exits_nonzero_when_a_check_fails(tmp_path):
    """tools/gpu_checks.sh with a stub python: pytest fails, the other checks pass."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\ncase "$*" in *"-m pytest"*) echo "1 failed"; exit 3;; esac\necho ok\n')
    stub.chmod(0o755)
    for failing, expected in ((True, 1), (False, 0)):
        if not failing:
            stub.write_text("#!/bin/sh\necho ok\n")
        out = tmp_path / f"out-{failing}"
        proc = subprocess.run(
            ["bash", "tools/gpu_checks.sh", str(out)], cwd=root, capture_output=True, text=True, timeout=120,
            env={"PATH": "/usr/bin:/bin", "PYTHON": str(stub)},
        )  # fmt: skip
        assert proc.returncode == expected, proc.stdout + proc.stderr
        status = (out / "status.txt").read_text().splitlines()
        assert len(status) == 8
        failed = [line for line in status if "FAILED" in line]
        assert failed == (["GPU-only paths against their references: FAILED (exit 3)"] if failing else [])
