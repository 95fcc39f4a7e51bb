"""`sad3 eval` (the likelihood bound), `sad3 eval-samples` (Gen. PPL, entropy, NFEs of samples) and
`sad3 variance` (Var. ELBO and Eq. 9's gradient variance per schedule and L')."""

from __future__ import annotations

import argparse
import json

from sad3_megatron.cli.flags import add_flags, settings
from sad3_megatron.evaluation.bound import EvalSettings, EvalSource
from sad3_megatron.evaluation.variance_report import VarianceSettings

CHECKPOINT_HELP = "a run directory, one of its checkpoints/step_*, or a `sad3 export` directory"


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="NELBO / PPL bound of a checkpoint on text files or a zero-shot set")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="text files or globs to evaluate on")
    source.add_argument("--split", choices=["val"], help="the held-out split of the checkpoint's own training data")
    source.add_argument(
        "--zero-shot", metavar="NAME", help="a zero-shot set: ptb, wikitext2, wikitext103, lambada, ag_news, pubmed, arxiv, lm1b"
    )
    p.add_argument("--zero-shot-path", metavar="PATH", help="local copy of the --zero-shot set (saved dataset directory or files): no hub access")
    add_flags(p, EvalSettings)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("eval-samples", help="Gen. PPL, entropy, NFEs and speed of `sad3 sample` output")
    p.add_argument("samples", help="a JSON file written by `sad3 sample --out` (or its --json output)")
    p.add_argument("--evaluator", default=None, help="local HuggingFace causal-LM directory, or a sad3 AR-baseline checkpoint, for Gen. PPL")
    p.add_argument("--max-length", type=int, default=1024, help="evaluator window (default 1024)")
    p.add_argument("--stride", type=int, default=512, help="evaluator window stride (default 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval_samples)

    p = sub.add_parser("variance", help="Var. ELBO and gradient variance (Eq. 9) per noise schedule and L' (Table 7)")
    p.add_argument("checkpoint", help="a run directory or one of its checkpoints/step_* directories")
    add_flags(p, VarianceSettings)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the variances by clip range and L' to this PNG")
    p.set_defaults(func=run_variance)


def run_eval(args: argparse.Namespace) -> int:
    from sad3_megatron.evaluation.bound import describe, evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, settings(args, EvalSource), settings(args, EvalSettings))
    print(json.dumps(result) if args.json else describe(result))
    return 0


def run_eval_samples(args: argparse.Namespace) -> int:
    from sad3_megatron.evaluation.generative import score_samples, summary_line

    summary = score_samples(args.samples, args.evaluator, args.max_length, args.stride)
    print(json.dumps(summary) if args.json else summary_line(summary))
    return 0


def run_variance(args: argparse.Namespace) -> int:
    from sad3_megatron.evaluation.variance_report import as_json, measure, plot, table

    rows = measure(args.checkpoint, settings(args, VarianceSettings))
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps(as_json(args.checkpoint, rows)) if args.json else table(rows))
    return 0
