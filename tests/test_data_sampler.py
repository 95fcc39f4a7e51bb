"""The sampler is a pure function of the step: two simulated data-parallel ranks split each global batch
disjointly, every epoch visits every row once, and a restart continues with exactly the batches an uninterrupted
run would have drawn."""

import numpy as np

from sad3_megatron.data.sampler import batch_rows, epoch_permutation

ROWS, MBS, ACCUM, DP, SEED = 53, 4, 2, 2, 7  # 53 rows: steps straddle epoch boundaries


def step_batches(step, dp_size=DP):
    """{(micro, rank): rows} for one optimizer step."""
    return {
        (m, r): batch_rows(ROWS, step, m, MBS, ACCUM, SEED, r, dp_size).tolist()
        for m in range(ACCUM)
        for r in range(dp_size)
    }


def test_ranks_are_disjoint_and_together_form_the_global_batch():
    global_batch = MBS * ACCUM * DP
    for step in range(20):
        batches = step_batches(step)
        for m in range(ACCUM):
            assert not set(batches[(m, 0)]) & set(batches[(m, 1)])
        got = sorted(row for rows in batches.values() for row in rows)
        positions = np.arange(step * global_batch, (step + 1) * global_batch)
        want = sorted(epoch_permutation(ROWS, SEED, int(p // ROWS))[p % ROWS] for p in positions)
        assert got == want


def test_every_epoch_visits_every_row_once():
    # Slots of a step in (micro, rank) order, steps one after another: the global order.
    order = [
        row
        for step in range(40)
        for m in range(ACCUM)
        for r in range(DP)
        for row in batch_rows(ROWS, step, m, MBS, ACCUM, SEED, r, DP).tolist()
    ]
    for epoch in range(len(order) // ROWS):
        assert sorted(order[epoch * ROWS : (epoch + 1) * ROWS]) == list(range(ROWS))
    assert order[:ROWS] != order[ROWS : 2 * ROWS]  # a fresh permutation each epoch


def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run():
    straight = [step_batches(step) for step in range(30)]
    epoch_permutation.cache_clear()
    first = [step_batches(step) for step in range(11)]
    epoch_permutation.cache_clear()  # a restarted process starts with nothing cached
    second = [step_batches(step) for step in range(11, 30)]
    assert first + second == straight


def test_seed_changes_the_order_and_rows_stay_in_range():
    a = batch_rows(ROWS, 3, 0, MBS, ACCUM, SEED)
    b = batch_rows(ROWS, 3, 0, MBS, ACCUM, SEED + 1)
    assert not np.array_equal(a, b)
    assert all(0 <= r < ROWS for step in range(50) for rows in step_batches(step).values() for r in rows)
