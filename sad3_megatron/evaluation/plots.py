"""PNG figures of runs and of the paper's comparisons: training loss and held-out bound against
training tokens (Fig. 1 style), variance of the NELBO by schedule (Tables 2 and 7), generative
perplexity against NFEs (Table 6). Shared by `sad3 plot` and tools/reproduce.py.

Headless: matplotlib's Agg backend, chosen here, so no display is needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sad3_megatron.core.errors import Sad3Error


@dataclass
class RunCurves:
    """The curves of one run's metrics.jsonl: training loss and held-out NELBO per token, by tokens seen."""

    label: str
    train_tokens: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_tokens: list[float] = field(default_factory=list)
    val_nelbo: list[float] = field(default_factory=list)


def read_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    """Read a run directory (or its metrics.jsonl). Held-out records carry no token count; they get
    the count of the training record of the same step (tokens grow linearly in steps)."""
    path = Path(run_dir)
    metrics = path if path.is_file() else path / "metrics.jsonl"
    if not metrics.is_file():
        raise Sad3Error(f"{str(run_dir)!r} has no metrics.jsonl: pass a run directory written by `sad3 train`")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    curves = RunCurves(label or (path.parent.name if path.is_file() else path.name))
    tokens_per_step = next((r["tokens"] / r["step"] for r in records if r.get("tokens") and r.get("step")), None)
    for r in records:
        if r.get("loss") is not None and r.get("tokens") is not None:
            curves.train_tokens.append(r["tokens"])
            curves.train_loss.append(r["loss"])
        if r.get("val_nelbo") is not None and tokens_per_step is not None:
            curves.val_tokens.append(r["step"] * tokens_per_step)
            curves.val_nelbo.append(r["val_nelbo"])
    if not curves.train_loss and not curves.val_nelbo:
        raise Sad3Error(f"{str(metrics)!r} holds no logged steps yet: train longer or wait for the first log")
    return curves


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise Sad3Error("plots need matplotlib: pip install -e '.[plot]' (pins matplotlib==3.11.2)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs: Sequence[str], out: str | Path, labels: Sequence[str] | None = None, title: str = "") -> str:
    """`sad3 plot`: read the runs, draw their curves, and say where the PNG went."""
    labels = labels or []
    if labels and len(labels) != len(run_dirs):
        raise Sad3Error(f"--labels needs one label per run ({len(run_dirs)}), got {len(labels)}")
    runs = [read_run(run, labels[i] if labels else None) for i, run in enumerate(run_dirs)]
    return f"{len(runs)} run(s) -> {plot_curves(runs, out, title)}"


def plot_curves(runs: Sequence[RunCurves], out: str | Path, title: str = "") -> Path:
    """Two panels against training tokens: training loss, and held-out NELBO (exact NLL for AR)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        left.plot(run.train_tokens, run.train_loss, color=color, label=run.label, linewidth=1)
        right.plot(run.val_tokens, run.val_nelbo, color=color, label=run.label, marker="o", markersize=3)
    left.set(xlabel="training tokens", ylabel="training loss (nats/token)", title="training loss")
    right.set(xlabel="training tokens", ylabel="NELBO (nats/token)", title="held-out bound")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, plt, out)


def plot_bars(
    groups: dict[str, dict[str, float]], out: str | Path, ylabel: str, title: str = "", log: bool = False
) -> Path:
    """Grouped bars: groups (e.g. L') × series (e.g. schedules) → value, e.g. Var. ELBO (Table 2)."""
    plt = _pyplot()
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    width = 0.8 / max(len(series), 1)
    for k, name in enumerate(series):
        xs = [g + k * width for g in range(len(groups))]
        ax.bar(xs, [values.get(name, float("nan")) for values in groups.values()], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, plt, out)


def plot_points(
    points: dict[str, tuple[float, float]], out: str | Path, xlabel: str, ylabel: str, title: str = ""
) -> Path:
    """One labelled point per model, e.g. (NFEs, Gen. PPL) for Table 6; log-scaled x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for i, (label, (x, y)) in enumerate(points.items()):
        ax.scatter([x], [y], color=f"C{i % 10}", label=label)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return _save(fig, plt, out)


def _save(fig, plt, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
