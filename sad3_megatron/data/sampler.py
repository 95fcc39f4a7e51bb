"""Which rows of the training set form the micro-batch at a given step: a pure function of
(seed, step, micro-batch, data-parallel rank), so a resumed run sees exactly the batches an
uninterrupted run would have seen, with no sampler state to save."""

from __future__ import annotations

import numpy as np


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

    The global order is a fresh permutation of all rows every epoch (seeded by seed and epoch);
    each optimizer step consumes micro_batch_size × grad_accum × dp_size consecutive entries.
    """
    global_batch = micro_batch_size * grad_accum * dp_size
    start = step * global_batch + (micro_batch * dp_size + dp_rank) * micro_batch_size
    positions = np.arange(start, start + micro_batch_size)
    epochs, offsets = np.divmod(positions, num_rows)
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_rows)
        rows[epochs == epoch] = perm[offsets[epochs == epoch]]
    return rows
