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

    cfg = load_config(args.config, args.overrides, stage=args.stage)  # validate before the heavy imports
    if args.dry_run:
        return _print_plan(cfg, args.world_size)
    from sad3_megatron.engine.trainer import train

    result = train(cfg)
    from sad3_megatron.engine.distributed import rank

    if result.val is not None and rank() == 0:
        v = result.val
        print(
            f"sad3 train: done at step {result.steps}; held-out NELBO {v['nelbo_per_token']:.4f}/token, PPL <= {v['ppl']:.2f}; run dir {result.run_dir}"
        )
    return 0


def _print_plan(cfg, world_size: int | None) -> int:
    """`--dry-run`: the resolved layout, batch arithmetic, tokens and memory; starts nothing."""
    import os

    from sad3_megatron.data import load_tokenizer
    from sad3_megatron.engine.plan import make_plan

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    plan = make_plan(cfg, world, load_tokenizer(cfg.data.tokenizer).vocab_size)
    print(
        f"sad3 train --dry-run: {cfg.run.name}, {cfg.model.preset} model, L={cfg.model.seq_len}, L'={cfg.diffusion.block_size}, objective={cfg.diffusion.objective}, ZeRO-{cfg.parallel.zero_stage}, "
        f"precision {cfg.train.precision}{' + fp8 GEMMs' if cfg.train.fp8 else ''}"
    )
    for line in plan.lines():
        print("  " + line)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from sad3_megatron.diffusion import BlockDiffusionObjective, evaluation_schedule
    from sad3_megatron.engine.build import load_components
    from sad3_megatron.evaluation import estimate_bound

    schedule = evaluation_schedule(args.t_floor)  # checks --t-floor before the model loads
    if args.draws < 1:
        raise Sad3Error(f"--draws must be at least 1, got {args.draws}")
    if args.batch_size < 1:
        raise Sad3Error(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_zero_shot_args(args)
    parts, ckpt = load_components(args.checkpoint, use_ema=not args.no_ema)
    cfg, objective = parts.cfg, parts.objective
    seq_len = cfg.model.seq_len
    if args.block_size is not None:
        if cfg.diffusion.objective != "sad3":
            raise Sad3Error(f"--block-size applies to SAD3/MDLM checkpoints; this one is {cfg.diffusion.objective}")
        if args.block_size < 1 or seq_len % args.block_size:
            raise Sad3Error(
                f"--block-size {args.block_size} does not divide the model's context length {seq_len}: pick a divisor"
            )
        objective = BlockDiffusionObjective(
            seq_len, args.block_size, objective.schedule, parts.tokenizer.mask_id, objective.antithetic
        )
    if args.discrete_steps:
        objective = _discrete_time_objective(args, cfg, objective, parts.tokenizer.mask_id)
    sequences, described = _eval_sequences(args, cfg, parts.tokenizer, seq_len)
    torch.manual_seed(args.seed)
    bound = estimate_bound(
        parts.model, objective, sequences, parts.device, args.batch_size, args.draws, args.seed,
        max_sequences=args.max_sequences or None, schedule=schedule,
    )  # fmt: skip
    result = {"checkpoint": str(ckpt), "data": described, **bound.to_dict(), "discrete_steps": args.discrete_steps}
    result["estimator"] = "t integrated out" if schedule.masking == "count" else f"t ~ U[{args.t_floor:g}, 1]"
    if args.json:
        print(json.dumps(result))
    else:
        kind = f"NELBO (L'={bound.block_size}, {bound.draws} draws, {result['estimator']})"
        if bound.exact:  # the AR baseline, or L' = 1 with t integrated out (Suppl. B)
            kind = "NLL (exact, AR)" if bound.block_size is None else "NLL (exact, L'=1 in one pass)"
        if args.discrete_steps:
            kind = f"D3PM NELBO (T={args.discrete_steps}, L'={bound.block_size}, {bound.draws} draws of j ~ U{{1..T}})"
        relation = "=" if bound.exact else "<="
        print(
            f"{kind}: {bound.nelbo_per_token:.4f} ± {bound.std_err:.4f} nats/token; "
            f"PPL {relation} {bound.ppl:.2f} ± {bound.ppl_std_err:.2f}; {bound.tokens} tokens in {bound.sequences} sequences"
        )
    return 0


def _discrete_time_objective(args: argparse.Namespace, cfg, objective, mask_id: int):
    """`--discrete-steps T`: the T-step D3PM NELBO (Eq. 3) of a masked-diffusion checkpoint."""
    from sad3_megatron.diffusion import NoiseSchedule
    from sad3_megatron.hf.d3pm import DiscreteTimeObjective

    if cfg.diffusion.objective != "sad3":
        raise Sad3Error(
            f"--discrete-steps scores masked-diffusion (sad3) checkpoints; this one is {cfg.diffusion.objective}"
        )
    if args.discrete_steps < 1:
        raise Sad3Error(f"--discrete-steps must be at least 1, got {args.discrete_steps}")
    return DiscreteTimeObjective(
        cfg.model.seq_len, objective.block_size, NoiseSchedule("linear"), mask_id, args.discrete_steps,
        objective.antithetic, getattr(objective, "clean_prefix", 1),
    )  # fmt: skip


def _check_zero_shot_args(args: argparse.Namespace) -> None:
    """Before the checkpoint loads: a zero-shot name must exist, and a local copy needs to say which set it is."""
    if args.zero_shot_path and not args.zero_shot:
        raise Sad3Error("--zero-shot-path needs --zero-shot NAME to say which set the local copy holds")
    if args.zero_shot:
        from sad3_megatron.data.zero_shot import ZERO_SHOT

        if args.zero_shot not in ZERO_SHOT:
            raise Sad3Error(f"unknown zero-shot set {args.zero_shot!r}: choose one of {', '.join(ZERO_SHOT)}")


def _eval_sequences(args: argparse.Namespace, cfg, tokenizer, seq_len: int):
    """The packed sequences `sad3 eval` scores, and how to name them in the report."""
    from sad3_megatron.data import load_corpus, load_eval_sequences

    cache = cfg.data.cache_dir or None
    if args.zero_shot:
        where = args.zero_shot_path or "hub"
        sequences = load_eval_sequences(
            tokenizer, seq_len, zero_shot=args.zero_shot, zero_shot_path=args.zero_shot_path, cache_dir=cache,
            framing=cfg.data.framing,
        )  # fmt: skip
        return sequences, f"zero-shot {args.zero_shot} ({where})"
    if args.data:
        files = load_eval_sequences(tokenizer, seq_len, files=args.data, cache_dir=cache, framing=cfg.data.framing)
        return files, args.data
    return load_corpus(cfg.data, tokenizer, seq_len).val, "held-out split"  # the checkpoint's own


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sad3_megatron.data.preparation import prepare
    from sad3_megatron.data.recipes import apply_overrides, load_recipe, recipe_from_dict
    from sad3_megatron.data.zero_shot import ZERO_SHOT, zero_shot_raw

    if not Path(args.recipe).is_file() and args.recipe in ZERO_SHOT:  # a zero-shot set, e.g. to cache it ahead
        raw = apply_overrides(zero_shot_raw(args.recipe, "gpt2"), args.overrides)
        recipe = recipe_from_dict(raw, f"zero-shot set {args.recipe}")
    else:
        recipe = load_recipe(args.recipe, args.overrides)
    result = prepare(recipe, cache_dir=args.cache_dir, verify=not args.no_verify, progress=not args.no_progress)
    m = result.manifest
    splits = ", ".join(
        f"{name} {s['documents']:,} docs / {s['tokens']:,} tokens in {len(s['shards'])} shard(s)"
        for name, s in m["splits"].items()
    )
    skipped = ", ".join(f"{v if isinstance(v, int) else len(v)} {k.replace('_', ' ')}" for k, v in m["skipped"].items())
    print(
        f"sad3 data prepare: {recipe.name} ({m['tokenizer']['name']}) -> {result.root}: {splits}; "
        f"{len(result.built)} shard(s) built, {len(result.reused)} kept; skipped: {skipped}; manifest {result.root / 'manifest.json'}"
    )
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import contextlib
    from dataclasses import replace
    from pathlib import Path

    from sad3_megatron.sampling import SamplingConfig

    config = SamplingConfig(
        num_tokens=args.num_tokens,
        block_size=args.block_size,
        steps=args.steps,
        sampler=args.sampler or "ancestral",
        threshold=args.threshold,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        kv_cache=not args.no_kv_cache,
        window=args.window,
        window_keep=args.window_keep,
        sliding=args.sliding,
        stop_at_eos=not args.ignore_eos,
        stop_rule=args.stop_rule,
        min_entropy=args.min_entropy,
        entropy_window=args.entropy_window,
        max_redraws=args.max_redraws,
    )
    config.check()  # before loading the model
    from sad3_megatron.engine.build import load_components
    from sad3_megatron.evaluation.generative import split_documents
    from sad3_megatron.sampling import generate, token_budget

    # SDPA: query and key lengths change at every step, which a compiled FlexAttention would
    # recompile for; with the KV cache most calls need no mask at all. DeepSpeed announces its
    # communication op on stdout while the model is set up: keep stdout for the --json result.
    with contextlib.redirect_stdout(sys.stderr):
        parts, ckpt = load_components(args.checkpoint, use_ema=not args.no_ema, backend="sdpa")
    cfg, tok = parts.cfg, parts.tokenizer
    autoregressive = cfg.diffusion.objective == "ar"
    if autoregressive and args.block_size is not None:
        raise Sad3Error("--block-size applies to diffusion checkpoints; this one is the AR baseline")
    prompt = [tok.bos_id] + (tok.encode(args.prompt) if args.prompt else [])
    config = replace(
        config,
        sampler=args.sampler or ("euler" if cfg.diffusion.objective == "sedd" else "ancestral"),  # SEDD: its own
        num_tokens=token_budget(args.num_tokens, cfg.model.seq_len, len(prompt)),  # prompt + sample = L
        block_size=1 if autoregressive else (args.block_size or cfg.diffusion.block_size),
    )
    result = generate(
        parts.model,
        config,
        seq_len=cfg.model.seq_len,
        mask_id=tok.mask_id,
        eos_id=tok.eos_id,
        prompt=prompt,
        autoregressive=autoregressive,
    )
    samples = [
        {
            "tokens": s.tokens,
            "text": tok.hf.decode(s.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True),
            "documents": [  # the EOS-separated pieces: eval-samples joins them with its evaluator's EOS
                tok.hf.decode(d, skip_special_tokens=True, clean_up_tokenization_spaces=True)
                for d in split_documents(s.tokens, tok.eos_id)
            ],
            "nfe": s.nfe,
            "length": s.length,
            "stop_reason": s.stop_reason,
            "rejections": s.rejections,
            "seconds": s.seconds,
            "tokens_per_s": s.tokens_per_s,
        }
        for s in result.samples
    ]
    out = {
        "checkpoint": str(ckpt),
        "objective": cfg.diffusion.objective,
        "tokenizer": cfg.data.tokenizer,
        "seq_len": cfg.model.seq_len,
        "block_size": config.block_size,
        "sampler": "autoregressive" if autoregressive else config.sampler,
        "steps": config.steps,
        "threshold": config.threshold,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "kv_cache": config.kv_cache,
        "window": result.window.size,
        "window_keep": result.window.keep,
        "num_tokens": config.num_tokens,
        "prompt_tokens": len(prompt),
        "sequence_length": len(prompt) + config.num_tokens,  # the longest sample with its prompt (BOS)
        "stop_rule": config.stop_rule,
        "entropy_window": config.entropy_rule()[0],
        "min_entropy": config.entropy_rule()[1],
        "rejections": result.rejections,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens_per_s,
        "mean_nfe": sum(s["nfe"] for s in samples) / len(samples),
        "clean_passes": result.clean_passes,
        "samples": samples,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out) + "\n")
    still = sum(s["stop_reason"] == "rejected" for s in samples)
    if still:
        print(
            f"sad3 sample: warning: {still} sample(s) stayed degenerate after {config.max_redraws} redraws "
            "(stop_reason 'rejected'); raise --max-redraws or train the model longer",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(out))
        return 0
    for i, s in enumerate(samples):
        print(
            f"--- sample {i}: {s['length']} tokens, stop: {s['stop_reason']}, {s['nfe']} NFEs, {s['tokens_per_s']:.1f} tokens/s"
        )
        if s["stop_reason"] == "eos" and s["length"] <= 1:
            print(
                "(stopped at EOS after 0 tokens: the model ended the document immediately; "
                "use --ignore-eos or --prompt)"
            )
        print(s["text"])
    how = "AR, next-token" if autoregressive else f"L'={config.block_size}, {config.sampler}, T={config.steps}"
    cache = "KV cache" if config.kv_cache else "no KV cache"
    print(
        f"sad3 sample: {len(samples)} samples, {sum(s['length'] for s in samples)} tokens in {result.seconds:.2f} s "
        f"({result.tokens_per_s:.1f} tokens/s); {how}; {cache}, window {result.window.size} (keep {result.window.keep})"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from sad3_megatron.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out_dir, not args.no_ema, args.dtype, args.max_shard_size)
    print(
        f"sad3 export: {result.checkpoint} -> {result.out_dir} ({result.bytes / 2**20:.1f} MiB, "
        f"{len(result.files)} files, {result.seconds:.1f} s)"
    )
    return 0


def _add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a HuggingFace transformers model directory")
    p.add_argument("checkpoint", help="a run directory or one of its checkpoints/step_* directories")
    p.add_argument("out_dir", help="the directory to write (new, empty, or an earlier export)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16")
    p.add_argument("--max-shard-size", default="5GB", help="largest weights file before sharding (default 5GB)")
    p.set_defaults(func=_cmd_export)


def _cmd_eval_samples(args: argparse.Namespace) -> int:
    from sad3_megatron.evaluation import load_evaluator, load_samples, summarize_samples

    if args.max_length < 2 or not 1 <= args.stride < args.max_length:
        raise Sad3Error(
            f"--max-length must be >= 2 and 1 <= --stride < --max-length (got {args.max_length}, {args.stride})"
        )
    samples = load_samples(args.samples)
    model = tokenizer = None
    if args.evaluator:
        from sad3_megatron.engine.distributed import resolve_device

        model, tokenizer = load_evaluator(args.evaluator, resolve_device("auto"))
    summary = {
        "samples_file": args.samples,
        "evaluator": args.evaluator,
        **summarize_samples(samples, model, tokenizer, args.max_length, args.stride),
    }
    if args.json:
        print(json.dumps(summary))
        return 0

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    line = (
        f"{summary['samples']} samples: mean length {fmt(summary['mean_length'], '.1f')}, "
        f"unigram entropy {fmt(summary['mean_unigram_entropy'], '.3f')} nats, "
        f"NFEs {fmt(summary['mean_nfe'], '.1f')}, {fmt(summary['mean_tokens_per_s'], '.1f')} tokens/s"
    )
    if model is not None:
        line += (
            f"; Gen. PPL {summary['gen_ppl']:.2f} under {args.evaluator} "
            f"({summary['gen_scored_tokens']} tokens, windows {summary['gen_max_length']}/{summary['gen_stride']})"
        )
    print(line)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from sad3_megatron.evaluation.plots import plot_curves, read_run

    labels = args.labels or []
    if labels and len(labels) != len(args.runs):
        raise Sad3Error(f"--labels needs one label per run ({len(args.runs)}), got {len(labels)}")
    runs = [read_run(run, labels[i] if labels else None) for i, run in enumerate(args.runs)]
    print(f"sad3 plot: {len(runs)} run(s) -> {plot_curves(runs, args.out, args.title)}")
    return 0


def _add_plot_command(sub) -> None:
    p = sub.add_parser("plot", help="PNG of training loss and held-out bound against tokens for runs")
    p.add_argument("runs", nargs="+", help="run directories (or their metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run (default: directory names)")
    p.add_argument("--title", default="", help="figure title")
    p.set_defaults(func=_cmd_plot)


def _add_sampling_commands(sub) -> None:
    p = sub.add_parser("sample", help="generate samples from a checkpoint (Alg. 2; AR baseline: next-token)")
    p.add_argument("checkpoint", help="a run directory, one of its checkpoints/step_*, or a `sad3 export` directory")
    p.add_argument(
        "--num-tokens", type=int, default=None, help="token budget per sample (default: L - prompt: BOS + sample = L)"
    )
    p.add_argument("--block-size", type=int, default=None, help="L' (default: the checkpoint's; must divide L)")
    p.add_argument("--steps", type=int, default=1000, help="T, diffusion steps per block (default 1000)")
    p.add_argument(
        "--sampler", default=None,
        help="ancestral (default), first_hitting, confident, or euler (SEDD's; the default for SEDD checkpoints)",
    )  # fmt: skip
    p.add_argument("--threshold", type=float, default=0.9, help="confident: commit tokens this likely (default 0.9)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    p.add_argument("--batch-size", type=int, default=1, help="samples generated together (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the context at every step (reference)")
    p.add_argument("--window", type=int, default=None, help="most context tokens a block sees (default L - L')")
    p.add_argument("--window-keep", type=int, default=None, help="tokens kept when the window slides (default half)")
    p.add_argument(
        "--sliding", default="halving", help="halving (default: keep half the window) or exact (re-encode per block)"
    )
    p.add_argument("--prompt", default=None, help="text to continue (default: start from BOS)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (fixed-length samples)")
    p.add_argument(
        "--stop-rule", default="paper",
        help="paper (default, Table 6: last 256 tokens under 4 nats rejects a fixed-length sample, truncates a "
        "variable-length one) or sad3 (last 64 under 1.5 nats: stop and keep)",
    )  # fmt: skip
    p.add_argument("--min-entropy", type=float, default=None, help="entropy floor, nats (0: off; default: the rule's)")
    p.add_argument("--entropy-window", type=int, default=None, help="tokens it is measured on (default: the rule's)")
    p.add_argument("--max-redraws", type=int, default=10, help="redraws of a rejected sample (default 10)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON to this file (input of eval-samples)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval-samples", help="Gen. PPL, entropy, NFEs and speed of `sad3 sample` output")
    p.add_argument("samples", help="a JSON file written by `sad3 sample --out` (or its --json output)")
    p.add_argument(
        "--evaluator",
        default=None,
        help="local HuggingFace causal-LM directory, or a sad3 AR-baseline checkpoint, for Gen. PPL",
    )
    p.add_argument("--max-length", type=int, default=1024, help="evaluator window (default 1024)")
    p.add_argument("--stride", type=int, default=512, help="evaluator window stride (default 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval_samples)


def _add_variance_command(sub) -> None:
    p = sub.add_parser("variance", help="Var. ELBO and gradient variance (Eq. 9) per noise schedule and L' (Table 7)")
    p.add_argument("checkpoint", help="a run directory or one of its checkpoints/step_* directories")
    p.add_argument("--block-size", default=None, help="L' values, comma-separated (default: the checkpoint's)")
    p.add_argument(
        "--schedules", default=None,
        help="comma-separated NAME[:LO:HI][@MASKING], e.g. linear,clipped:0.3:0.8,cosine (default: the checkpoint's)",
    )  # fmt: skip
    p.add_argument("--batches", type=int, default=8, help="M, independent minibatches (default 8)")
    p.add_argument("--batch-size", type=int, default=16, help="K, sequences per minibatch (default 16)")
    p.add_argument("--parameters", default="", help="gradient variance over parameters whose name contains this")
    p.add_argument("--no-grad", action="store_true", help="Var. ELBO only (no backward passes)")
    p.add_argument("--t-floor", type=float, default=None, help="smallest t drawn (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the variances by clip range and L' to this PNG")
    p.set_defaults(func=_cmd_variance)


def _cmd_variance(args: argparse.Namespace) -> int:
    from sad3_megatron.evaluation.variance_report import as_json, measure, plot, table

    rows = measure(args)
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps(as_json(args.checkpoint, rows)) if args.json else table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sad3", description="Train, evaluate and sample semi-autoregressive discrete diffusion LMs.")
    # The DeepSpeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    p.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="section.key=value",
        help="overrides, e.g. train.steps=100 diffusion.block_size=16 (anywhere on the line)",
    )  # fmt: skip
    p.add_argument("--stage", default=None, help="a stage of the config's `stages:` (e.g. pretrain, finetune)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved plan (layout, batch, tokens, memory) and exit"
    )
    p.add_argument("--world-size", type=int, default=None, help="world size for --dry-run (default: $WORLD_SIZE or 1)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="NELBO / PPL bound of a checkpoint on text files or a zero-shot set")
    p.add_argument("checkpoint", help="a run directory, one of its checkpoints/step_*, or a `sad3 export` directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="text files or globs to evaluate on")
    source.add_argument("--split", choices=["val"], help="the held-out split of the checkpoint's own training data")
    source.add_argument(
        "--zero-shot",
        metavar="NAME",
        help="a zero-shot set: ptb, wikitext2, wikitext103, lambada, ag_news, pubmed, arxiv, lm1b",
    )
    p.add_argument(
        "--zero-shot-path",
        metavar="PATH",
        help="local copy of the --zero-shot set (saved dataset directory or files): no hub access",
    )
    p.add_argument("--block-size", type=int, default=None, help="L' to evaluate with (default: the checkpoint's)")
    p.add_argument("--draws", type=int, default=8, help="Monte-Carlo draws of the noise per sequence (default 8)")
    p.add_argument(
        "--t-floor", type=float, default=None,
        help="the paper's estimator: Bernoulli masks with t ~ U[T_FLOOR, 1] (MDLM: 1e-3); default: t integrated out",
    )  # fmt: skip
    p.add_argument(
        "--discrete-steps", type=int, default=0, metavar="T", help="score with the T-step D3PM NELBO (Eq. 3) instead"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-sequences", type=int, default=0, help="evaluate only the first N sequences (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("data", help="prepare datasets into token shards")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    q = data_sub.add_parser(
        "prepare", help="tokenize a data recipe into memory-mapped shards with a manifest (resumable)"
    )
    q.add_argument("recipe", help="a recipe YAML such as configs/data/lm1b.yaml, or a zero-shot set name")
    q.add_argument(
        "overrides", nargs="*", help="key=value, e.g. source.path=/data/lm1b workers=8 output_dir=/data/lm1b-bert"
    )
    q.add_argument(
        "--cache-dir",
        default=None,
        help="where recipes without output_dir go (default $SAD3_DATA_CACHE or ~/.cache/sad3/data)",
    )
    q.add_argument("--no-verify", action="store_true", help="check kept shards by size only, not by checksum")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_data_prepare)

    _add_sampling_commands(sub)
    _add_plot_command(sub)
    _add_export_command(sub)
    _add_variance_command(sub)
    _add_checkpoint_command(sub)
    return parser


def _add_checkpoint_command(sub) -> None:
    from sad3_megatron.engine.checkpoint_info import add_checkpoint_command  # all of it lives there

    add_checkpoint_command(sub)


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
        # `key=value` overrides may sit anywhere among the options of `train` and `data prepare`.
        args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        if extra and not (args.command in ("train", "data") and all("=" in a and not a.startswith("-") for a in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*getattr(args, "overrides", []), *extra]
        return args.func(args)
    except Sad3Error as err:
        print(f"sad3: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sad3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
