"""`sad3 checkpoint info CKPT`: what a checkpoint holds and what a resume on another layout does."""

from __future__ import annotations

import argparse
import json

from sad3_megatron.cli.flags import Parser


def add_commands(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect training checkpoints")
    commands = p.add_subparsers(dest="checkpoint_command", required=True, parser_class=Parser)
    q = commands.add_parser("info", help="layout, step, tokens, data position, size, and what a resume on another layout does")
    q.add_argument("checkpoint", help="a run directory or one of its checkpoints/step_* directories")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from sad3_megatron.engine.checkpoint_info import checkpoint_info, info_lines

    info = checkpoint_info(args.checkpoint)
    print(json.dumps(info, indent=1) if args.json else "\n".join(info_lines(info)))
    return 0
