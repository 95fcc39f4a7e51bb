"""Checkpoints: DeepSpeed's full training state for exact resume, plus safetensors weights and the
config for standalone evaluation and sampling.

Layout of a run directory:
    checkpoints/step_000500/   DeepSpeed shards (model, optimizer, LR scheduler) + client state
                               (step, tokens, EMA, noise schedule), model.safetensors,
                               ema.safetensors, config.yaml, manifest.json
    checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place only when complete, and
`latest` is replaced atomically after that, so a crash mid-save leaves the previous one usable.
`manifest.json`, written last, records every file's size and the sha256 of the config and the
safetensors weights (DeepSpeed's shards, the bulk of a checkpoint, by size only); every load checks
what it reads against it, and `train.resume=auto` falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sad3_megatron.config import Config, config_from_dict, save_config
from sad3_megatron.core.errors import Sad3Error

LATEST = "latest"
MANIFEST = "manifest.json"
HASHED_SUFFIXES = (".safetensors", ".yaml")  # sha256: cheap next to the save; DeepSpeed shards: size


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record every file of a finished checkpoint: size, and sha256 where cheap. Written last, it
    also marks the checkpoint complete."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry: dict = {"size": path.stat().st_size}
        if path.suffix in HASHED_SUFFIXES:
            entry["sha256"] = _sha256(path)
        files[path.relative_to(directory).as_posix()] = entry
    _write_atomic(directory / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def checkpoint_problem(directory: Path, only: tuple[str, ...] | None = None) -> str | None:
    """Why `directory` is not an intact checkpoint (checking `only` these files, or all), or None.
    Checkpoints written before manifests existed are accepted as they are."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None if (directory / "config.yaml").is_file() else "config.yaml is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name in only if only is not None else tuple(files):
        entry, path = files.get(name), directory / name
        if entry is None:
            continue  # not part of this checkpoint (e.g. no EMA)
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['size']} were written"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def _manifest_names(directory: Path) -> set[str]:
    try:
        return set(json.loads((directory / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


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
        write_manifest(tmp)
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, tag)
        _prune(root, keep_last, final)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int, newest: Path) -> None:
    """Keep `newest` (just written, hence the newest good one) and the keep_last - 1 before it.
    Checkpoints numbered after it (a timeline abandoned by resuming an older one) are left alone."""
    older = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name < newest.name)
    for old in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _candidates(root: Path) -> list[Path]:
    """Published checkpoints, the one `latest` names first, then the others newest first."""
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    marker = root / LATEST
    named = root / marker.read_text().strip() if marker.is_file() else None
    return ([named] if named in found else []) + [p for p in found if p != named]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None (not verified: see latest_intact_checkpoint)."""
    complete = [p for p in _candidates(root) if (p / "config.yaml").is_file() or (p / MANIFEST).is_file()]
    return complete[0] if complete else None


def latest_intact_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under `root` whose files all match its manifest, warning on stderr
    about each damaged one skipped over; None if there is none."""
    for candidate in _candidates(root):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        print(f"sad3: warning: checkpoint {str(candidate)!r} is damaged ({problem}): skipping it", file=sys.stderr)
    return None


def resume_checkpoint(root: Path) -> Path | None:
    """`train.resume=auto`: rank 0 picks the newest intact checkpoint, every rank gets its choice."""
    choice = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        found = latest_intact_checkpoint(root) if root.is_dir() else None
        choice = [None if found is None else str(found)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def require_intact(checkpoint: Path, only: tuple[str, ...] | None = None) -> None:
    """A one-line error naming the damaged checkpoint, and an intact one to use instead."""
    problem = checkpoint_problem(checkpoint, only)
    if problem is None:
        return
    others = [p for p in _candidates(checkpoint.parent) if p != checkpoint and checkpoint_problem(p, only) is None]
    hint = f"use an intact one such as {str(others[0])!r}" if others else "no intact checkpoint is left beside it"
    raise Sad3Error(f"checkpoint {str(checkpoint)!r} is damaged ({problem}): {hint}")


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


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise Sad3Error(
            f"checkpoint file {str(path)!r} is unreadable ({str(err).splitlines()[0]}): use another checkpoint"
        ) from None


def load_ema(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = checkpoint / "ema.safetensors"
    if not path.is_file():
        raise Sad3Error(
            f"checkpoint {str(checkpoint)!r} has no ema.safetensors but the config enables EMA: set train.ema_decay=0 or resume another checkpoint"
        )
    return _load_weights_file(path)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file():
        return path
    if (path / MANIFEST).is_file():
        return path  # a checkpoint with files missing: read_checkpoint says which
    for root in (path / "checkpoints", path):
        if root.is_dir():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise Sad3Error(
        f"no checkpoint at {str(path)!r}: pass a run directory or one of its checkpoints/step_* directories"
    )


def read_config(checkpoint: Path) -> Config:
    """The config saved with a checkpoint; a malformed one is a one-line error."""
    where = checkpoint / "config.yaml"
    try:
        raw = yaml.safe_load(where.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise Sad3Error(f"checkpoint config {str(where)!r} is unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise Sad3Error(f"checkpoint config {str(where)!r} is malformed: expected a mapping of sections")
    try:
        return config_from_dict(raw)
    except Sad3Error as err:
        raise Sad3Error(f"checkpoint config {str(where)!r} is invalid: {err}") from None


def read_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> tuple[Config, dict[str, torch.Tensor], Path]:
    """The config and the weights (EMA weights when saved and asked for) of a checkpoint, checked
    against its manifest, safely: safetensors never executes code."""
    ckpt = resolve_checkpoint(path)
    has_ema = (ckpt / "ema.safetensors").is_file() or "ema.safetensors" in _manifest_names(ckpt)
    weights_name = "ema.safetensors" if use_ema and has_ema else "model.safetensors"
    require_intact(ckpt, ("config.yaml", weights_name))
    cfg = read_config(ckpt)
    return cfg, _load_weights_file(ckpt / weights_name), ckpt
