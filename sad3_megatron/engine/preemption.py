"""Preemption: SIGTERM or SIGUSR1 (Slurm's `--signal`) asks the run to stop after the current step.

The handler only records the request on this rank; the ranks agree through the step guard's
all-reduce (engine/guard.py), so all of them stop after the same step even when the signal reached
only some, save a checkpoint there and exit 0. A rerun with the same `run.out_dir` resumes.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sad3_megatron.engine.guard import StepGuard

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER = "preempted"  # written into the run directory when a run stopped early (read by launchers/common.sh)


@contextmanager
def stop_on_signals(guard: StepGuard) -> Iterator[None]:
    """While training, a stop signal sets `guard.stop_requested` instead of killing the process."""

    def request_stop(signum, _frame) -> None:
        if not guard.stop_requested:
            print(
                f"sad3 train: received {signal.Signals(signum).name}: stopping after the current step", file=sys.stderr
            )
        guard.stop_requested = True

    try:
        previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread (e.g. an embedding application): leave signals alone
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def clear_marker(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)


def write_marker(run_dir: Path, step: int) -> None:
    (run_dir / MARKER).write_text(f"{step}\n")
