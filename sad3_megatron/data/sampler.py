"""Which rows of the training set form the micro-batch at a given step: a pure function of
(seed, step, micro-batch, data-parallel rank), so a resumed run sees exactly the batches an
uninterrupted run would have seen, with no sampler state to save.

Rows are the packed sequences of the whole split (all shards, in manifest order), so shards need no sampler of
their own. Every epoch is a fresh permutation of all rows seeded by (seed, epoch); the global batch of a step is a
run of consecutive entries of that order, and each data-parallel rank takes its own contiguous part of it, so the
ranks' rows are disjoint and together are the global batch. A step that crosses an epoch boundary takes the end of
one permutation and the start of the next.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=2)  # a step spans at most two epochs (unless the global batch exceeds the split)
def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of all rows in `epoch` (cached: computed once per epoch, not once per step)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    if num_rows < 2**31:
        order = order.astype(np.int32)  # half the memory for large splits (OWT at L = 1024: ~9M rows)
    order.flags.writeable = False
    return order


def batch_rows(
    num_rows: int,
    step: int,
    micro_batch: int,
    micro_batch_size: int,
    grad_accum: int,
    seed: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> np.ndarray:
    """Row indices for micro-batch `micro_batch` of optimizer step `step` on rank `dp_rank`.

    Each optimizer step consumes micro_batch_size × grad_accum × dp_size consecutive entries of the
    global order; within a step, micro-batch m of rank r is entries (m × dp_size + r) × micro_batch_size onwards.
    """
    global_batch = micro_batch_size * grad_accum * dp_size
    start = step * global_batch + (micro_batch * dp_size + dp_rank) * micro_batch_size
    return rows_at(num_rows, start, micro_batch_size, seed)


def rows_at(num_rows: int, start: int, count: int, seed: int) -> np.ndarray:
    """Entries start .. start + count - 1 of the training order, as row indices (epoch e of the order
    is epoch_permutation(num_rows, seed, e)). A resume with another global batch starts at an entry
    rather than at (step, micro-batch, rank) (engine/resume.py)."""
    if num_rows < 1:
        raise ValueError("the training split has no rows")
    positions = np.arange(start, start + count)
    epochs, offsets = np.divmod(positions, num_rows)
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        rows[here] = epoch_permutation(num_rows, seed, int(epoch))[offsets[here]]
    return rows
