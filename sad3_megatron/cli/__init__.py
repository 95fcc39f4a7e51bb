"""`sad3`: the command line. Each command parses its flags into the library's typed settings, calls
one library function and prints; user mistakes end as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from sad3_megatron.cli import checkpoint, data, evaluate, export, harness, plot, sample, train
from sad3_megatron.cli.flags import Parser
from sad3_megatron.core.errors import Sad3Error

COMMANDS = (train, evaluate, sample, export, data, plot, checkpoint, harness)  # each adds its subcommands
OVERRIDE_COMMANDS = ("train", "data", "import")  # `key=value` overrides may sit anywhere among their options


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sad3", description="Train, evaluate and sample semi-autoregressive discrete diffusion LMs.")
    # The DeepSpeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_commands(sub)
    return parser


def _quiet_imports() -> None:
    """Silence import-time notices that are not the user's concern (optional extras absent)."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than let DeepSpeed warn that it guessed


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        if extra and not (args.command in OVERRIDE_COMMANDS and all("=" in a and not a.startswith("-") for a in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*getattr(args, "overrides", []), *extra]
        return args.func(args)
    except Sad3Error as err:
        print(f"sad3: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sad3: interrupted", file=sys.stderr)
        return 130
