"""`sad3 export CHECKPOINT OUT_DIR`: a checkpoint as a transformers model directory (engine/export.py)."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a HuggingFace transformers model directory")
    p.add_argument("checkpoint", help="a run directory or one of its checkpoints/step_* directories")
    p.add_argument("out_dir", help="the directory to write (new, empty, or an earlier export)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16")
    p.add_argument("--max-shard-size", default="5GB", help="largest weights file before sharding (default 5GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sad3_megatron.engine.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out_dir, not args.no_ema, args.dtype, args.max_shard_size)
    print(
        f"sad3 export: {result.checkpoint} -> {result.out_dir} ({result.bytes / 2**20:.1f} MiB, "
        f"{len(result.files)} files, {result.seconds:.1f} s)"
    )
    return 0
