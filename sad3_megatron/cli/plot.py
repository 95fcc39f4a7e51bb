"""`sad3 plot RUN ... [--out PNG]`: training loss and held-out bound against tokens."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser("plot", help="PNG of training loss and held-out bound against tokens for runs")
    p.add_argument("runs", nargs="+", help="run directories (or their metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run (default: directory names)")
    p.add_argument("--title", default="", help="figure title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sad3_megatron.evaluation.plots import plot_runs

    print(f"sad3 plot: {plot_runs(args.runs, args.out, args.labels, args.title)}")
    return 0
