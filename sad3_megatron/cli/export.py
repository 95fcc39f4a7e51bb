"""`sad3 export CHECKPOINT OUT_DIR` (a checkpoint as a transformers model directory) and
`sad3 import HF_DIR OUT_DIR` (a transformers directory as a sad3 checkpoint); engine/export.py and
engine/hf_import.py."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a HuggingFace transformers model directory")
    p.add_argument("checkpoint", help="a run directory, one of its checkpoints/step_* directories, or a `sad3 import`")
    p.add_argument("out_dir", help="the directory to write (new, empty, or an earlier export)")
    p.add_argument("--format", default="sad3", choices=("sad3", "transformers", "sdar"),
                   help="sad3: sad3's classes as remote code (any run); transformers: an AR run with a Llama / Qwen2 / "
                        "Qwen3 / Mistral architecture as that family's own model, no code; sdar: a Qwen3-shaped "
                        "block-diffusion run in SDAR's layout (SGLang, lmdeploy, JetEngine)")  # fmt: skip
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or auto (the checkpoint's); default fp32 for sad3, auto otherwise")
    p.add_argument("--max-shard-size", default="5GB", help="largest weights file before sharding (default 5GB)")
    p.set_defaults(func=run)

    p = sub.add_parser("import", help="write a transformers Llama / Qwen2 / Qwen3 / Mistral directory as a sad3 checkpoint")
    p.add_argument("hf_dir", help="a transformers model directory (config.json, safetensors, tokenizer)")
    p.add_argument("out_dir", help="the checkpoint directory to write (new or empty)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                   help="config of the checkpoint (default: the AR baseline, L = min(2048, the base's context))")  # fmt: skip
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's, default), fp32 or bf16")
    p.set_defaults(func=run_import)


def run(args: argparse.Namespace) -> int:
    from sad3_megatron.engine.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out_dir, not args.no_ema, args.dtype, args.max_shard_size, args.format)
    print(
        f"sad3 export: {result.checkpoint} -> {result.out_dir} ({args.format}, {result.bytes / 2**20:.1f} MiB, "
        f"{len(result.files)} files, {result.seconds:.1f} s)"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    from sad3_megatron.engine.hf_import import import_checkpoint

    result = import_checkpoint(args.hf_dir, args.out_dir, args.overrides, args.dtype)
    print(
        f"sad3 import: {args.hf_dir} -> {result.out_dir} ({result.tensors} tensors, {result.bytes / 2**20:.1f} MiB, "
        f"{result.seconds:.1f} s, peak RSS {result.peak_rss_gib:.2f} GiB)"
    )
    return 0
