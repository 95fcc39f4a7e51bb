"""Checkpoint writes are atomic: a save that dies midway leaves the previous checkpoint usable."""

import pytest
import torch

from sad3_megatron.config import load_config
from sad3_megatron.engine import checkpoint as ckpt_module
from sad3_megatron.engine.build import load_components
from sad3_megatron.engine.checkpoint import latest_checkpoint
from sad3_megatron.engine.trainer import train

TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64", "model.seq_len=32",
    "train.micro_batch_size=2", "train.progress_bar=false", "train.eval_interval=1000", "train.ema_decay=0.9",
]  # fmt: skip


def test_save_interrupted_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    cfg = load_config("configs/demo.yaml", TINY + [f"run.out_dir={tmp_path}", "train.steps=2", "train.save_interval=2"])
    train(cfg)
    good = latest_checkpoint(tmp_path / "checkpoints")
    assert good.name == "step_0000002"

    calls = {"n": 0}
    real_save_file = ckpt_module.save_file

    def dying_save_file(tensors, path):  # the process "dies" after writing the first weights file
        calls["n"] += 1
        real_save_file(tensors, path)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt_module, "save_file", dying_save_file)
    more = load_config(
        "configs/demo.yaml", TINY + [f"run.out_dir={tmp_path}", "train.steps=4", "train.save_interval=2"]
    )
    with pytest.raises(KeyboardInterrupt):
        train(more)
    assert calls["n"] == 1
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path / "checkpoints") == good  # the half-written step 4 is not published
    assert not (tmp_path / "checkpoints" / "step_0000004").exists()
    parts, path = load_components(tmp_path)
    assert path == good
    x = torch.randint(0, 100, (1, 32))
    assert torch.isfinite(parts.objective(parts.model, x, torch.Generator().manual_seed(0)).loss)

    train(more)  # resuming from the good checkpoint clears the debris and finishes
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000004"
