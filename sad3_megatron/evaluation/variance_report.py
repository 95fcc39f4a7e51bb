"""`sad3 variance`: Var. ELBO and the gradient variance of Eq. 9 of a checkpoint, per noise schedule
and block size (a Table 7 / Table 2 of one's own model), as text, JSON rows and a PNG.

Every schedule is scored on the same M minibatches of K held-out sequences with the same uniforms,
under the weight it trains with (core/schedules.py); see core/variance.py for the definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.field_help import described
from sad3_megatron.core.likelihood import rows_and_documents
from sad3_megatron.core.registry import build_objective
from sad3_megatron.core.schedules import make_schedule, parse_schedule
from sad3_megatron.core.variance import GradientSums, batch_gradient, block_losses, elbo_variance, select_parameters


@dataclass
class VarianceSettings:
    """What `sad3 variance` measures (its flags are these fields)."""

    block_size: str | None = field(default=None, metadata=described("L' values, comma-separated (default: the checkpoint's)"))
    schedules: str | None = field(default=None, metadata=described(
        "comma-separated NAME[:LO:HI][@MASKING], e.g. linear,clipped:0.3:0.8,cosine (default: the checkpoint's)"))  # fmt: skip
    batches: int = field(default=8, metadata=described("M, independent minibatches"))
    batch_size: int = field(default=16, metadata=described("K, sequences per minibatch"))
    parameters: str = field(default="", metadata=described("gradient variance over parameters whose name contains this"))
    grad: bool = field(default=True, metadata=described("Var. ELBO only (no backward passes)", flag="--no-grad", invert=True))
    t_floor: float | None = field(default=None, metadata=described("smallest t drawn (default: the checkpoint's)"))
    seed: int = field(default=0, metadata=described("seed of the noise draws"))
    use_ema: bool = field(default=True, metadata=described("use the raw weights instead of the EMA weights",
                                                        flag="--no-ema", invert=True))  # fmt: skip

    def check(self) -> None:
        """Everything that can be checked before the model loads."""
        if self.batches < 2 or self.batch_size < 1:
            raise Sad3Error(
                f"--batches must be at least 2 and --batch-size at least 1 (got {self.batches}, {self.batch_size})"
            )
        for spec in (self.schedules or "linear").split(","):
            parse_schedule(spec)

    def block_sizes(self, default: int, seq_len: int) -> list[int]:
        try:
            sizes = [int(v) for v in self.block_size.split(",")] if self.block_size else [default]
        except ValueError:
            raise Sad3Error(f"--block-size {self.block_size!r} must be comma-separated integers, e.g. 4,16") from None
        for n in sizes:
            if n < 1 or seq_len % n:
                raise Sad3Error(f"--block-size {n} does not divide the model's context length {seq_len}: pick a divisor")
        return sizes


def measure(checkpoint: str, settings: VarianceSettings) -> list[dict]:
    """One row per (L', schedule): Var. ELBO per block and per sequence, gradient variance, mean loss."""
    from sad3_megatron.engine.build import load_components

    settings.check()  # bad flags fail before the model loads
    parts, _ = load_components(checkpoint, use_ema=settings.use_ema)
    cfg, model = parts.cfg, parts.model
    if cfg.diffusion.objective != "sad3":
        raise Sad3Error(
            f"sad3 variance scores masked-diffusion (sad3) checkpoints; this one is {cfg.diffusion.objective}"
        )
    d = cfg.diffusion
    floor = d.t_floor if settings.t_floor is None else settings.t_floor
    if settings.schedules:
        schedules = [parse_schedule(s, floor, d.masking) for s in settings.schedules.split(",")]
    else:  # the checkpoint's own training schedule
        schedules = [make_schedule(d.schedule, d.beta, d.omega, floor, d.masking)]
    sizes = settings.block_sizes(cfg.diffusion.block_size, cfg.model.seq_len)
    batches = _held_out_batches(cfg, parts, settings)
    params = [p for _, p in select_parameters(model, settings.parameters)]
    if not params:
        raise Sad3Error(f"--parameters {settings.parameters!r} matches no parameter name")
    rows = []
    for size in sizes:
        objective = build_objective(cfg.diffusion, cfg.model.seq_len, parts.tokenizer.mask_id, block_size=size)
        for schedule in schedules:
            rows.append(_row(model, objective, schedule, batches, params, settings.seed, settings.grad))
    return rows


def _held_out_batches(cfg, parts, settings: VarianceSettings) -> list:
    from sad3_megatron.data.corpus import load_corpus

    sequences = load_corpus(cfg.data, parts.tokenizer, cfg.model.seq_len).val
    m, k = settings.batches, settings.batch_size
    if len(sequences) < m * k:
        raise Sad3Error(
            f"the held-out split has {len(sequences)} sequences, fewer than --batches × --batch-size = {m * k}"
        )
    return [rows_and_documents(sequences, i * k, (i + 1) * k, parts.device) for i in range(m)]


def _row(model, objective, schedule, batches, params, seed: int, with_grad: bool) -> dict:
    losses, sums = [], GradientSums()
    for m, (x, document_ids, scored) in enumerate(batches):
        with torch.no_grad():
            losses.append(
                block_losses(
                    model, objective, x, torch.Generator().manual_seed(seed * 1_000_003 + m), schedule, document_ids,
                    scored,
                )
            )
        if with_grad:  # the same noise as the ELBO pass: a fresh, independent draw per minibatch
            generator = torch.Generator().manual_seed(seed * 1_000_003 + m)
            sums.add(batch_gradient(model, objective, x, generator, params, schedule, document_ids, scored))
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
