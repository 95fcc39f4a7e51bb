"""`sad3 data prepare RECIPE [key=value ...]`: tokenize a data recipe into token shards."""

from __future__ import annotations

import argparse

from sad3_megatron.cli.flags import Parser


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets into token shards")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    q = data_sub.add_parser("prepare", help="tokenize a data recipe into memory-mapped shards with a manifest (resumable)")
    q.add_argument("recipe", help="a recipe YAML such as configs/data/lm1b.yaml, or a zero-shot set name")
    q.add_argument("overrides", nargs="*", help="key=value, e.g. source.path=/data/lm1b workers=8 output_dir=/data/lm1b-bert")
    q.add_argument(
        "--cache-dir", default=None,
        help="where recipes without output_dir go (default $SAD3_DATA_CACHE or ~/.cache/sad3/data)",
    )  # fmt: skip
    q.add_argument("--no-verify", action="store_true", help="check kept shards by size only, not by checksum")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from sad3_megatron.data.preparation import prepare
    from sad3_megatron.data.zero_shot import recipe_by_name

    recipe = recipe_by_name(args.recipe, args.overrides)
    result = prepare(recipe, cache_dir=args.cache_dir, verify=not args.no_verify, progress=not args.no_progress)
    print(f"sad3 data prepare: {result.summary(recipe.name)}")
    return 0
