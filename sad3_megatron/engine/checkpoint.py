"""Checkpoints: DeepSpeed's full training state for exact resume, plus safetensors weights and the
config for standalone evaluation and sampling.

Layout of a run directory:
    checkpoints/step_000500/   DeepSpeed shards (model, optimizer, LR scheduler) + client state
                               (step, tokens, EMA), model.safetensors, ema.safetensors, config.yaml
    checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place only when complete, and
`latest` is replaced atomically after that, so a crash mid-save leaves the previous one usable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from sad3_megatron.config import Config, config_from_dict, save_config
from sad3_megatron.errors import Sad3Error

LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    engine,
    root: Path,
    step: int,
    client_state: dict,
    cfg: Config,
    weights: dict[str, torch.Tensor],
    ema_weights: dict[str, torch.Tensor] | None,
    keep_last: int,
) -> Path:
    """Save everything needed to resume at `step` (every rank calls this), plus the consolidated
    `weights` / `ema_weights` in the TP = 1 layout (written by rank 0). Returns the directory."""
    root.mkdir(parents=True, exist_ok=True)
    tag, tmp_tag = step_name(step), f".tmp-{step_name(step)}"
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    if is_writer and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)  # debris of an earlier interrupted save
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are on disk before the directory is published
    if is_writer:
        tmp = root / tmp_tag
        save_file(weights, str(tmp / "model.safetensors"))
        if ema_weights is not None:
            save_file(ema_weights, str(tmp / "ema.safetensors"))
        save_config(cfg, tmp / "config.yaml")
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, tag)
        _prune(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    marker = root / LATEST
    if marker.is_file():
        candidate = root / marker.read_text().strip()
        if (candidate / "config.yaml").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / "config.yaml").is_file())
    return complete[-1] if complete else None


def load_training_state(engine, checkpoint: Path) -> dict:
    """Restore model, optimizer and LR scheduler into `engine`; returns the client state."""
    _, client_state = engine.load_checkpoint(
        str(checkpoint.parent), tag=checkpoint.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise Sad3Error(
            f"checkpoint {str(checkpoint)!r} could not be loaded: its DeepSpeed files are missing or incomplete"
        )
    return client_state


def load_ema(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = checkpoint / "ema.safetensors"
    if not path.is_file():
        raise Sad3Error(
            f"checkpoint {str(checkpoint)!r} has no ema.safetensors but the config enables EMA: set train.ema_decay=0 or resume another checkpoint"
        )
    return load_file(str(path))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise Sad3Error(
        f"no checkpoint at {str(path)!r}: pass a run directory or one of its checkpoints/step_* directories"
    )


def read_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> tuple[Config, dict[str, torch.Tensor], Path]:
    """The config and the weights (EMA weights when saved and asked for) of a checkpoint, safely:
    safetensors never executes code."""
    ckpt = resolve_checkpoint(path)
    import yaml

    cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    weights_file = ckpt / (
        "ema.safetensors" if use_ema and (ckpt / "ema.safetensors").is_file() else "model.safetensors"
    )
    return cfg, load_file(str(weights_file)), ckpt
