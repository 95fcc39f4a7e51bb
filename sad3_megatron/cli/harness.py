"""`sad3 lm-eval DIR [lm-eval flags]`: a sad3 run, checkpoint or export evaluated by EleutherAI's
lm-evaluation-harness (the `eval` extra) as the model `sad3`; every flag after DIR is the harness's."""

from __future__ import annotations

import argparse

from sad3_megatron.core.errors import Sad3Error

EPILOG = """\
every argument after DIR goes to `lm-eval run` (--tasks, --num_fewshot, --batch_size, --limit, --output_path,
--include_path, --log_samples, ...); sad3's options go in --model_args KEY=VALUE: draws, seed, block_size,
max_length, truncation (error|left), add_bos_token, max_gen_toks, use_ema, and the sampling flags of
`sad3 sample` (steps, sampler, threshold, temperature, top_p, ...). Offline tasks over the bundled corpus:
--include_path configs/lm_eval (docs/lm-eval.md)."""


def add_commands(sub) -> None:
    p = sub.add_parser(
        "lm-eval", help="evaluate a checkpoint or export with lm-evaluation-harness (model `sad3`)",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("directory", help="a run directory, one of its checkpoints/step_*, or a `sad3 export` directory")
    p.add_argument("harness_args", nargs=argparse.REMAINDER, help="lm-eval run flags, e.g. --tasks NAME --limit 10")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from sad3_megatron.evaluation.harness import run_harness
    except ImportError as err:
        if err.name and err.name.split(".")[0] == "lm_eval":
            raise Sad3Error("sad3 lm-eval needs lm-evaluation-harness: pip install 'sad3[eval]'") from None
        raise
    run_harness(args.directory, args.harness_args)
    return 0
