"""`sad3 train | eval`: the command line. User mistakes end as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from sad3_megatron.errors import Sad3Error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise Sad3Error(f"{self.prog}: {message} (see {self.prog} --help)")


def _cmd_train(args: argparse.Namespace) -> int:
    from sad3_megatron.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before the heavy imports
    from sad3_megatron.engine.trainer import train

    result = train(cfg)
    if result.val is not None:
        v = result.val
        print(
            f"sad3 train: done at step {result.steps}; held-out NELBO {v['nelbo_per_token']:.4f}/token, PPL <= {v['ppl']:.2f}; run dir {result.run_dir}"
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from sad3_megatron.config import resolve_data_files
    from sad3_megatron.data import pack_files
    from sad3_megatron.diffusion import BlockDiffusionObjective
    from sad3_megatron.engine.build import load_components
    from sad3_megatron.evaluation import estimate_bound

    if args.draws < 1:
        raise Sad3Error(f"--draws must be at least 1, got {args.draws}")
    if args.batch_size < 1:
        raise Sad3Error(f"--batch-size must be at least 1, got {args.batch_size}")
    parts, ckpt = load_components(args.checkpoint, use_ema=not args.no_ema)
    cfg, objective = parts.cfg, parts.objective
    seq_len = cfg.model.seq_len
    if args.block_size is not None:
        if cfg.diffusion.objective == "ar":
            raise Sad3Error("--block-size applies to diffusion checkpoints; this one is the AR baseline")
        if args.block_size < 1 or seq_len % args.block_size:
            raise Sad3Error(
                f"--block-size {args.block_size} does not divide the model's context length {seq_len}: pick a divisor"
            )
        objective = BlockDiffusionObjective(
            seq_len, args.block_size, objective.schedule, parts.tokenizer.mask_id, objective.antithetic
        )
    if args.data:
        sequences, _ = pack_files(resolve_data_files(args.data), parts.tokenizer, seq_len)
    else:  # the checkpoint's own held-out split
        from sad3_megatron.data import load_corpus

        sequences = load_corpus(
            resolve_data_files(cfg.data.train_files), parts.tokenizer, seq_len, cfg.data.val_fraction
        ).val
    if args.max_sequences:
        sequences = sequences[: args.max_sequences]
    torch.manual_seed(args.seed)
    bound = estimate_bound(parts.model, objective, sequences, parts.device, args.batch_size, args.draws, args.seed)
    result = {"checkpoint": str(ckpt), "data": args.data or "held-out split", **bound.to_dict()}
    if args.json:
        print(json.dumps(result))
    else:
        kind = "NLL (exact, AR)" if bound.exact else f"NELBO (L'={bound.block_size}, {bound.draws} draws of t ~ U[0,1])"
        relation = "=" if bound.exact else "<="
        print(
            f"{kind}: {bound.nelbo_per_token:.4f} ± {bound.std_err:.4f} nats/token; "
            f"PPL {relation} {bound.ppl:.2f} ± {bound.ppl_std_err:.2f}; {bound.tokens} tokens in {bound.sequences} sequences"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sad3", description="Train, evaluate and sample semi-autoregressive discrete diffusion LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    p.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 diffusion.block_size=16")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="NELBO / PPL bound of a checkpoint on text files")
    p.add_argument("checkpoint", help="a run directory or one of its checkpoints/step_* directories")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="text files or globs to evaluate on")
    source.add_argument("--split", choices=["val"], help="the held-out split of the checkpoint's own training data")
    p.add_argument("--block-size", type=int, default=None, help="L' to evaluate with (default: the checkpoint's)")
    p.add_argument("--draws", type=int, default=8, help="Monte-Carlo draws of t per sequence (default 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-sequences", type=int, default=0, help="evaluate only the first N sequences (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)
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
        args = build_parser().parse_args(argv)
        return args.func(args)
    except Sad3Error as err:
        print(f"sad3: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sad3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
