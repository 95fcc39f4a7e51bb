"""`sad3 train CONFIG [section.key=value ...] [--stage NAME] [--dry-run] [--list-stages]`."""

from __future__ import annotations

import argparse
import os


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    p.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="section.key=value",
        help="overrides, e.g. train.steps=100 diffusion.block_size=16 (anywhere on the line)",
    )  # fmt: skip
    p.add_argument("--stage", default=None, help="a stage of the config's `stages:` (e.g. pretrain, finetune)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan (layout, batch, tokens, memory) and exit")
    p.add_argument("--world-size", type=int, default=None, help="world size for --dry-run (default: $WORLD_SIZE or 1)")
    p.add_argument("--list-stages", action="store_true",
                   help="print the config's stages in the order they run (its `curriculum:`), one per line, and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sad3_megatron.config import load_config, stage_sequence

    if args.list_stages:
        print("\n".join(stage_sequence(args.config)))
        return 0
    cfg = load_config(args.config, args.overrides, stage=args.stage)  # validate before the heavy imports
    if args.dry_run:
        from sad3_megatron.engine.plan import describe_plan

        print("\n".join(describe_plan(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))))
        return 0
    from sad3_megatron.engine.distributed import rank
    from sad3_megatron.engine.trainer import train

    result = train(cfg)
    if result.val is not None and rank() == 0:
        print(f"sad3 train: done at step {result.steps}; {result.val_line()}; run dir {result.run_dir}")
    return 0
