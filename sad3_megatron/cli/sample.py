"""`sad3 sample CHECKPOINT [flags]`: Alg. 2 (the AR baseline: next-token). Its flags are the fields
of `core/generate.SamplingConfig`; the output is `evaluation/samples.SampleFile`."""

from __future__ import annotations

import argparse
import json
import sys

from sad3_megatron.cli.flags import add_flags, settings
from sad3_megatron.core.generate import SamplingConfig


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="generate samples from a checkpoint (Alg. 2; AR baseline: next-token)")
    p.add_argument("checkpoint", help="a run directory, one of its checkpoints/step_*, or a `sad3 export` directory")
    add_flags(p, SamplingConfig)
    p.add_argument("--prompt", default=None, help="text to continue (default: start from BOS)")
    p.add_argument("--chat", action="store_true",
                   help="--prompt is a user message: render it with the tokenizer's chat template and answer it")
    p.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw weights instead of the EMA weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON to this file (input of eval-samples)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sad3_megatron.evaluation.samples import sample_checkpoint

    result = sample_checkpoint(args.checkpoint, settings(args, SamplingConfig), args.prompt, args.use_ema, args.chat)
    if args.out:
        result.write(args.out)
    still = sum(s.stop_reason == "rejected" for s in result.samples)
    if still:
        print(
            f"sad3 sample: warning: {still} sample(s) stayed degenerate after {result.settings['max_redraws']} redraws "
            "(stop_reason 'rejected'); raise --max-redraws or train the model longer",
            file=sys.stderr,
        )
    print(json.dumps(result.to_dict()) if args.json else "\n".join(result.lines()))
    return 0
