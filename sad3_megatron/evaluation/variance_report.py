"""`sad3 variance`: Var. ELBO and the gradient variance of Eq. 9 of a checkpoint, per noise schedule
and block size (a Table 7 / Table 2 of one's own model), as text, JSON rows and a PNG.

Every schedule is scored on the same M minibatches of K held-out sequences with the same uniforms,
under the weight it trains with (hf/schedules.py); see diffusion/variance.py for the definitions.
"""

from __future__ import annotations

import argparse

import torch

from sad3_megatron.diffusion import BlockDiffusionObjective, make_schedule, parse_schedule
from sad3_megatron.diffusion.variance import (
    GradientSums,
    batch_gradient,
    block_losses,
    elbo_variance,
    select_parameters,
)
from sad3_megatron.errors import Sad3Error
from sad3_megatron.evaluation.likelihood import rows_and_documents


def _block_sizes(text: str | None, default: int, seq_len: int) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")] if text else [default]
    except ValueError:
        raise Sad3Error(f"--block-size {text!r} must be comma-separated integers, e.g. 4,16") from None
    for n in sizes:
        if n < 1 or seq_len % n:
            raise Sad3Error(f"--block-size {n} does not divide the model's context length {seq_len}: pick a divisor")
    return sizes


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per (L', schedule): Var. ELBO per block and per sequence, gradient variance, mean loss."""
    from sad3_megatron.data import load_corpus
    from sad3_megatron.engine.build import load_components

    if args.batches < 2 or args.batch_size < 1:
        raise Sad3Error(
            f"--batches must be at least 2 and --batch-size at least 1 (got {args.batches}, {args.batch_size})"
        )
    for spec in (args.schedules or "linear").split(","):
        parse_schedule(spec)  # bad specs fail before the model loads
    parts, _ = load_components(args.checkpoint, use_ema=not args.no_ema)
    cfg, model, device = parts.cfg, parts.model, parts.device
    if cfg.diffusion.objective != "sad3":
        raise Sad3Error(
            f"sad3 variance scores masked-diffusion (sad3) checkpoints; this one is {cfg.diffusion.objective}"
        )
    d = cfg.diffusion
    floor = d.t_floor if args.t_floor is None else args.t_floor
    if args.schedules:
        schedules = [parse_schedule(s, floor, d.masking) for s in args.schedules.split(",")]
    else:  # the checkpoint's own training schedule
        schedules = [make_schedule(d.schedule, d.beta, d.omega, floor, d.masking)]
    sizes = _block_sizes(args.block_size, cfg.diffusion.block_size, cfg.model.seq_len)
    sequences = load_corpus(cfg.data, parts.tokenizer, cfg.model.seq_len).val
    if len(sequences) < args.batches * args.batch_size:
        raise Sad3Error(
            f"the held-out split has {len(sequences)} sequences, fewer than --batches × --batch-size = {args.batches * args.batch_size}"
        )
    batches = [
        rows_and_documents(sequences, m * args.batch_size, (m + 1) * args.batch_size, device)
        for m in range(args.batches)
    ]
    params = [p for _, p in select_parameters(model, args.parameters)]
    if not params:
        raise Sad3Error(f"--parameters {args.parameters!r} matches no parameter name")
    rows = []
    for size in sizes:
        objective = BlockDiffusionObjective(cfg.model.seq_len, size, schedules[0], parts.tokenizer.mask_id)
        for schedule in schedules:
            rows.append(_row(model, objective, schedule, batches, params, args.seed, not args.no_grad))
    return rows


def _row(model, objective, schedule, batches, params, seed: int, with_grad: bool) -> dict:
    losses, sums = [], GradientSums()
    for m, (x, document_ids) in enumerate(batches):
        with torch.no_grad():
            losses.append(
                block_losses(
                    model, objective, x, torch.Generator().manual_seed(seed * 1_000_003 + m), schedule, document_ids
                )
            )
        if with_grad:  # the same noise as the ELBO pass: a fresh, independent draw per minibatch
            generator = torch.Generator().manual_seed(seed * 1_000_003 + m)
            sums.add(batch_gradient(model, objective, x, generator, params, schedule, document_ids))
    return {
        "block_size": objective.block_size,
        "schedule": schedule.label,
        "t_min": schedule.t_min,
        "t_max": schedule.t_max,
        "masking": schedule.masking,
        "elbo": elbo_variance(torch.cat(losses), objective).to_dict(),  # per_block, per_sequence, mean, sequences
        "grad": sums.result().to_dict() if with_grad else None,  # variance, mean_grad_norm_sq, batches, parameters
        "batches": len(batches),
        "batch_size": batches[0][0].shape[0],
    }


def as_json(checkpoint: str, rows: list[dict]) -> dict:
    """`--json`: every row; with a single (L', schedule) its fields also at the top level."""
    return {"checkpoint": checkpoint, "rows": rows, **(rows[0] if len(rows) == 1 else {})}


def table(rows: list[dict]) -> str:
    lines = [f"{'L′':>4}  {'schedule':<26} {'Var. ELBO':>10} {'per seq.':>10} {'grad var.':>11} {'mean loss':>10}"]
    for r in rows:
        e = r["elbo"]
        grad = "n/a" if r["grad"] is None else f"{r['grad']['variance']:.4g}"
        lines.append(
            f"{r['block_size']:>4}  {r['schedule']:<26} {e['per_block']:>10.4g} {e['per_sequence']:>10.4g} {grad:>11} {e['mean']:>10.4f}"
        )
    m, k = rows[0]["batches"], rows[0]["batch_size"]
    lines.append(
        f"(M = {m} minibatches of K = {k} held-out sequences; Var. ELBO per block as Table 7, gradient variance Eq. 9)"
    )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Var. ELBO and gradient variance by schedule (x) for each L' (one line each), log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Sad3Error("--plot needs matplotlib: pip install 'sad3[plot]' (matplotlib==3.11.2)") from None
    labels = list(dict.fromkeys(r["schedule"] for r in rows))
    panels = [(("elbo", "per_block"), "Var. ELBO (per block)")] + (
        [(("grad", "variance"), "gradient variance (Eq. 9)")] if rows[0]["grad"] is not None else []
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, ((group, key), title) in zip(axes[0], panels, strict=True):
        for size in dict.fromkeys(r["block_size"] for r in rows):
            values = {r["schedule"]: r[group][key] for r in rows if r["block_size"] == size}
            ax.plot(range(len(labels)), [values.get(s) for s in labels], marker="o", label=f"L′ = {size}")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
