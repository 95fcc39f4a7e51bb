"""Free space before a checkpoint is written: a save that cannot fit is refused before the first byte,
or made to fit by pruning first the checkpoints `train.keep_last` would delete after it anyway.

The size of a checkpoint is known before it is written: it is the bytes of the tensors about to be
saved (weights, EMA, Adam moments; safetensors adds a small header) plus a few small text files.
The newest published checkpoint is never pruned before the new one is complete, so whatever
happens to the save, the last saved step survives.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

SLACK_BYTES = 1 << 20  # safetensors headers, config.yaml, state.json, manifest.json


def tensor_bytes(groups: list[dict[str, torch.Tensor] | None]) -> int:
    """What the safetensors files of `groups` take on disk, within SLACK_BYTES."""
    return sum(v.numel() * v.element_size() for g in groups if g for v in g.values()) + SLACK_BYTES


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_bytes(root: Path) -> int:
    """Free bytes on the filesystem holding `root` (for an unprivileged writer)."""
    return shutil.disk_usage(root).free


@dataclass
class SpacePlan:
    needed: int
    free: int
    prune_first: list[Path]  # to delete before writing (keep_last would delete them after)

    @property
    def fits(self) -> bool:
        return self.needed <= self.free + sum(directory_bytes(p) for p in self.prune_first)


def plan_space(root: Path, needed: int, doomed: list[Path], newest: Path | None) -> SpacePlan:
    """Whether `needed` bytes fit under `root`; if not, which of `doomed` (what keep_last removes
    after this save, oldest first) to delete first. `newest`, the last complete checkpoint, is kept."""
    free = free_bytes(root)
    if needed <= free:
        return SpacePlan(needed, free, [])
    first, gained = [], 0
    for path in (p for p in doomed if p != newest):
        if needed <= free + gained:
            break
        first.append(path)
        gained += directory_bytes(path)
    return SpacePlan(needed, free, first)


def no_space_message(target: Path, plan: SpacePlan, keep_last: int, last: Path | None) -> str:
    """The one line a refused save ends with."""
    kept = f"the last checkpoint {str(last)!r} is intact" if last else "no earlier checkpoint exists"
    return (
        f"checkpoint {str(target)!r} needs {plan.needed:,} bytes but {plan.free:,} are free there: "
        f"free space, lower train.keep_last (now {keep_last}) so older checkpoints are pruned before saving, "
        f"or remove old checkpoints; nothing was written and {kept}; rerun the same command to resume"
    )
