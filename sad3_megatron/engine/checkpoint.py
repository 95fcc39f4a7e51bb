"""Checkpoints: a layout-free training state for exact resume on any layout, which also serves
standalone evaluation, sampling and export (docs/checkpoints.md).

Layout of a run directory:
    run.lock                   the running job's lock (engine/run_lock.py)
    checkpoints/step_000500/   model.safetensors   the fp32 weights, consolidated: TP = 1, whole model
                               ema.safetensors     their EMA (when train.ema_decay > 0)
                               optimizer.safetensors  Adam moments, named "exp_avg.<weight name>",
                                                      "exp_avg_sq.<weight name>", same layout
                               state.json          step, tokens, data position, optimizer step count,
                                                   LR schedule, EMA count, noise schedule, the layout
                                                   it was written on
                               config.yaml, manifest.json
    checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written under a temporary name (.tmp-step_*) and renamed into place only when
complete, and `latest` is replaced atomically after that, so a crash mid-save leaves the previous one
usable; the run's lock holder removes such debris at start. Before writing, the saving rank checks the
free space against the checkpoint's size (engine/disk_space.py). `manifest.json`, written last,
records every file's size and sha256; every load checks what it reads against it, and
`train.resume=auto` falls back to the newest intact checkpoint. Checkpoints written before the
layout-free state hold DeepSpeed's per-rank shards instead and resume on their own layout only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sad3_megatron.config import Config, config_from_dict, save_config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.engine.disk_space import no_space_message, plan_space, tensor_bytes
from sad3_megatron.engine.guard import injected_fault

LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.json"  # step, tokens, data position, LR schedule, EMA count, noise schedule, layout
HASHED_SUFFIXES = (".safetensors", ".yaml", ".json")  # sha256 (older checkpoints' DeepSpeed shards: size)


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


def _agree(problem: str | None) -> str | None:
    """The writer's verdict (None: all went well), the same on every rank."""
    verdict = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def save_checkpoint(
    root: Path,
    step: int,
    state: dict,
    cfg: Config,
    tensors: dict[str, dict[str, torch.Tensor] | None],
    keep_last: int,
) -> Path:
    """Save everything needed to resume at `step` on any layout: `tensors` are the consolidated
    (TP = 1, whole-model) {"model": weights, "ema": EMA or None, "optimizer": Adam moments}, `state`
    the JSON training state. Every rank calls this; rank 0 writes, and every rank raises the same
    one-line Sad3Error when the save is refused (no space) or fails (the partial files are removed)."""
    root.mkdir(parents=True, exist_ok=True)
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    problem = _write_checkpoint(root, step, state, cfg, tensors, keep_last) if is_writer else None
    problem = _agree(problem)
    if problem is not None:
        raise Sad3Error(problem)
    return root / step_name(step)


def _write_checkpoint(root: Path, step: int, state: dict, cfg: Config, tensors: dict, keep_last: int) -> str | None:
    """The writer's part of save_checkpoint: check the space, write under a temporary name, publish.
    Returns why the checkpoint was not saved, or None."""
    final, last = root / step_name(step), latest_checkpoint(root)
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of an earlier interrupted save
    needed = tensor_bytes(list(tensors.values()))
    if injected_fault("disk_full", step):  # test-only: $SAD3_FAULT_INJECT, see engine/guard.py
        needed = 1 << 60
    plan = plan_space(root, needed, _prunable(root, keep_last, final), last)
    if not plan.fits:
        return no_space_message(final, plan, keep_last, last)
    for old in plan.prune_first:
        print(f"sad3: pruning {str(old)!r} before saving {final.name} (train.keep_last={keep_last}): the disk is nearly full", file=sys.stderr)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, group in tensors.items():
            if group is not None:
                save_file(group, str(tmp / f"{name}.safetensors"))
        _write_atomic(tmp / STATE, json.dumps(state, indent=1) + "\n")
        save_config(cfg, tmp / "config.yaml")
        write_manifest(tmp)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the last checkpoint {str(last)!r} is intact" if last else "no earlier checkpoint exists"
        return (
            f"writing checkpoint {str(final)!r} failed ({_first_line(err)}): its partial files were removed "
            f"and {kept}; free space (or fix the filesystem) and rerun the same command to resume"
        )
    return _publish(root, tmp, final, keep_last)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _publish(root: Path, tmp: Path, final: Path, keep_last: int) -> str | None:
    """Move a complete checkpoint into place, point `latest` at it, prune; why not, or None."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    try:
        _write_atomic(root / LATEST, final.name)
    except OSError as err:  # the checkpoint is complete: without `latest`, resume=auto takes the newest
        (root / LATEST).unlink(missing_ok=True)
        return f"checkpoint {str(final)!r} is saved but {LATEST!r} could not be updated ({_first_line(err)}): free space and rerun the same command to resume"
    _prune(root, keep_last, final)
    return None


def _prunable(root: Path, keep_last: int, newest: Path) -> list[Path]:
    """Checkpoints before `newest` beyond the keep_last - 1 kept beside it, oldest first. Checkpoints
    numbered after it (a timeline abandoned by resuming an older one) are left alone."""
    older = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name < newest.name)
    return older[: max(len(older) - (keep_last - 1), 0)]


def _prune(root: Path, keep_last: int, newest: Path) -> None:
    """Keep `newest` (just written, hence the newest good one) and the keep_last - 1 before it."""
    for old in _prunable(root, keep_last, newest):
        shutil.rmtree(old, ignore_errors=True)


def remove_partial_saves(root: Path) -> list[Path]:
    """Delete what interrupted saves left under `root` (.tmp-* directories, a half-written `latest`);
    run at start by the run's lock holder, before anything else writes there. Returns what went."""
    if not root.is_dir():
        return []
    debris = sorted(root.glob(".tmp-*")) + sorted(root.glob(LATEST + ".tmp"))
    for path in debris:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return debris


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
    """A checkpoint of DeepSpeed's per-rank shards (written before the layout-free state): restore
    model, optimizer and LR scheduler into `engine`, on the layout it was written on only; returns
    the client state."""
    try:
        _, client_state = engine.load_checkpoint(
            str(checkpoint.parent), tag=checkpoint.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as err:  # DeepSpeed's refusals: assertions, ZeRORuntimeException, KeyError, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise Sad3Error(
            f"checkpoint {str(checkpoint)!r} holds DeepSpeed's per-rank shards (an earlier sad3's format), which load "
            f"only on the layout they were written on ({reason}): resume it once on that layout; every checkpoint "
            "saved from then on resumes on any layout"
        ) from None
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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


class TensorFile(Mapping):
    """The tensors of a safetensors file, each read from disk when asked for, with plain reads
    rather than a memory map: a resume holds one whole tensor at a time, not the file's pages. The
    format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data. An unreadable file is a one-line error naming it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            self._start = 8 + size
            self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
            if not all(v["dtype"] in _DTYPES for v in self._entries.values()):
                raise ValueError("unknown dtype")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise Sad3Error(
                f"checkpoint file {str(path)!r} is unreadable ({_first_line(err)}): use another checkpoint"
            ) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)
        with self.path.open("rb") as f:
            f.seek(self._start + begin)
            if f.readinto(data) != len(data):
                raise Sad3Error(f"checkpoint file {str(self.path)!r} is truncated at {name!r}: use another checkpoint")
        dtype = _DTYPES[entry["dtype"]]
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"]) if data else torch.empty(entry["shape"], dtype=dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def is_layout_free(checkpoint: Path) -> bool:
    """Written with the layout-free training state (state.json + optimizer.safetensors), not with
    DeepSpeed's per-rank shards as checkpoints before it were."""
    return (checkpoint / STATE).is_file() or STATE in _manifest_names(checkpoint)


def read_state(checkpoint: Path) -> dict:
    """state.json of a layout-free checkpoint."""
    where = checkpoint / STATE
    try:
        state = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise Sad3Error(f"checkpoint state {str(where)!r} is unreadable ({str(err).splitlines()[0]}): use another checkpoint") from None
    if not isinstance(state, dict) or "step" not in state:
        raise Sad3Error(f"checkpoint state {str(where)!r} is malformed: use another checkpoint")
    return state


def load_ema(checkpoint: Path) -> Mapping[str, torch.Tensor]:
    """ema.safetensors of a checkpoint, each tensor read when asked for."""
    path = checkpoint / "ema.safetensors"
    if not path.is_file():
        raise Sad3Error(
            f"checkpoint {str(checkpoint)!r} has no ema.safetensors but the config enables EMA: set train.ema_decay=0 or resume another checkpoint"
        )
    return TensorFile(path)


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
