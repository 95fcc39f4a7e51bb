"""Cost of the non-finite guard per optimizer step, measured in one run: the demo trainer's steps
alternate between the guard on and off (train.nonfinite_guard), and the median step times are compared.

    python tools/bench_guard.py [--rounds 10] [--steps-per-round 3] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from sad3_megatron.config import load_config
from sad3_megatron.engine.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [*args.overrides, f"run.out_dir={out}", "train.progress_bar=false"])
        trainer = Trainer(cfg)
        trainer.engine.train()
        times: dict[bool, list[float]] = {True: [], False: []}
        step = 0
        for _ in range(2):  # warm-up, untimed
            trainer.train_step(step, False)
            step += 1
        for _ in range(args.rounds):
            for enabled in (True, False):
                trainer.guard.enabled = enabled
                for _ in range(args.steps_per_round):
                    start = time.perf_counter()
                    trainer.train_step(step, False)
                    times[enabled].append(time.perf_counter() - start)
                    step += 1
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"bench_guard: median step {on * 1e3:.2f} ms with the guard, {off * 1e3:.2f} ms without "
        f"({len(times[True])} steps each, interleaved): ratio {on / off:.4f}"
    )


if __name__ == "__main__":
    main()
