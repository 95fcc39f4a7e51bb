"""Data-parallel scaling, ZeRO memory and sequence-parallel memory, from real short runs of `sad3 train`.

1. Step time and tokens/s of the tiny config with 1, 2 and 4 processes (DP, same micro-batch per
   rank, so the global batch grows with the process count), from metrics.jsonl.
2. Peak resident memory of every rank for ZeRO stages 0-3 with 2 processes on the 110M (`small`)
   model, from the `max_rss_gib` field the trainer logs.
3. The same for TP = 2 with and without sequence parallelism, at a context long enough for
   activations to matter.

    python tools/bench_scaling.py --steps 6 --procs 1 2 4 --zero-model small --zero-seq-len 128
    python tools/bench_scaling.py --procs --skip-zero          # sequence parallelism only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(nproc: int, overrides: list[str], out: Path) -> list[dict]:
    launcher = [str(BIN / "sad3")] if nproc == 1 else [
        str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", "-m", "sad3_megatron.cli",
    ]  # fmt: skip
    cmd = [*launcher, "train", "configs/demo.yaml", *overrides, f"run.out_dir={out}", "train.progress_bar=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--procs", type=int, nargs="*", default=[1, 2, 4], help="none: skip the step times")
    parser.add_argument("--zero-model", default="small")
    parser.add_argument("--zero-seq-len", type=int, default=128)
    parser.add_argument("--skip-zero", action="store_true")
    parser.add_argument("--sp-seq-len", type=int, default=1024)
    parser.add_argument("--sp-micro-batch", type=int, default=4)
    parser.add_argument("--skip-sp", action="store_true")
    args = parser.parse_args()
    common = [
        f"train.steps={args.steps}",
        "train.log_interval=1",
        "train.eval_interval=100000",
        "train.save_interval=100000",
    ]

    with tempfile.TemporaryDirectory() as tmp:
        if args.procs:
            print(f"tiny config, micro-batch 16 per rank, L=128, {args.steps} steps (first step excluded):")
        base = None
        for n in args.procs:
            records = [r for r in run(n, common, Path(tmp) / f"dp{n}") if "loss" in r]
            steps = [b["elapsed"] - a["elapsed"] for a, b in zip(records[1:], records[2:], strict=False)]
            step = statistics.median(steps)
            tokens_per_s = 16 * 128 * n / step
            base = base or tokens_per_s
            print(
                f"  {n} process(es): median step {step:.3f} s, {tokens_per_s:,.0f} tokens/s, {tokens_per_s / base:.2f}x of 1"
            )
        if not args.skip_zero:
            zero_memory(args, Path(tmp))
        if not args.skip_sp:
            sequence_parallel_memory(args, Path(tmp))


def peak_rss(nproc: int, overrides: list[str], out: Path) -> list[float]:
    return [r for r in run(nproc, overrides, out) if "loss" in r][-1]["max_rss_gib"]


def zero_memory(args, tmp: Path) -> None:
    print(f"{args.zero_model} model, L={args.zero_seq_len}, micro-batch 1, 2 processes: peak RSS per rank (GiB)")
    zero = [f"model.preset={args.zero_model}", f"model.seq_len={args.zero_seq_len}", "train.micro_batch_size=1",
            "train.ema_decay=0", "train.steps=2", "train.log_interval=1", "train.eval_interval=100000",
            "train.save_interval=100000"]  # fmt: skip
    for stage in range(4):
        print(f"  ZeRO-{stage}: {peak_rss(2, [*zero, f'parallel.zero_stage={stage}'], tmp / f'z{stage}')}")


def sequence_parallel_memory(args, tmp: Path) -> None:
    print(
        f"{args.zero_model} model, L={args.sp_seq_len}, micro-batch {args.sp_micro_batch}, TP=2: peak RSS per rank (GiB)"
    )
    common = [f"model.preset={args.zero_model}", f"model.seq_len={args.sp_seq_len}",
              f"train.micro_batch_size={args.sp_micro_batch}", "train.ema_decay=0", "train.steps=2",
              "train.log_interval=1", "train.eval_interval=100000", "train.save_interval=100000",
              "parallel.tensor_parallel=2"]  # fmt: skip
    without = peak_rss(2, common, tmp / "tp2")
    with_sp = peak_rss(2, [*common, "parallel.sequence_parallel=true"], tmp / "tp2sp")
    print(f"  TP=2:      {without}")
    print(f"  TP=2 + SP: {with_sp}  ({max(with_sp) / max(without):.2f}x of TP=2)")


if __name__ == "__main__":
    main()
