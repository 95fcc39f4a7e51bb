"""The variance of the NELBO estimate and of its gradient under a noise schedule (Sec. 4.3, 5.3).

Pure torch and parallel-agnostic: functions score given batches, and the statistics are computed
from what they return, so a data-parallel caller (engine/schedule_search.py) gathers the pieces and
gets exactly the single-process numbers.

**Var. ELBO** (Tables 2 and 7, Sec. 5.3's objective Var_{X,t}[L(θ, β, ω; X)]). For each sequence and
each draw of the noise under the schedule, the Eq. 8 terms w_i · (-log p_θ(x_i | x_t^b, x^{<b})) of its
tokens (w_i = 0 where x_i is not masked, and at the unscored position 0). Two variances of them,
unbiased (1/(N-1)) over all N values pooled:
- `per_block`: of each block's mean term over its L' positions, across (sequence, block, draw) —
  what the reference code minimises in its search (bd3lms `_clipped_schedule_search`, which averages
  the variance within each validation batch over batches; pooling differs from that only by the spread
  between batch means). This is the quantity on Table 7's scale.
- `per_sequence`: of each sequence's per-token NELBO estimate (Eq. 8 with K = 1, divided by the L - 1
  scored tokens), across (sequence, draw): the variance of the held-out estimate per sequence.

**Gradient variance** (Eq. 9): over M independent minibatches X^m of K sequences, each with fresh
draws of t, (1/(M-1)) Σ_m ‖∇l(X^m) - (1/M) Σ_m' ∇l(X^m')‖², with l the training loss (Eq. 8 per
scored token, i.e. Eq. 8 divided by L - 1) over all parameters or those whose name contains a filter.
Gradients come from `torch.autograd.grad`, so nothing accumulates into `.grad` (and no optimizer or
DeepSpeed hook sees them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

from .objectives import BlockDiffusionObjective
from .schedules import NoiseSchedule


@dataclass
class ElboVariance:
    per_block: float  # Var of a block's mean Eq. 8 term over (sequence, block, draw): Table 7's scale
    per_sequence: float  # Var of a sequence's per-token NELBO estimate over (sequence, draw)
    mean: float  # mean per-token loss under the schedule (a bound on the NLL for the evaluation schedule)
    sequences: int  # sequence draws pooled

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GradientVariance:
    variance: float  # Eq. 9
    mean_grad_norm_sq: float  # ‖mean_m ∇l(X^m)‖², for scale
    batches: int  # M
    parameters: int  # number of scalar parameters included

    def to_dict(self) -> dict:
        return asdict(self)


def block_losses(
    model,
    objective: BlockDiffusionObjective,
    x: torch.Tensor,
    generator: torch.Generator | None,
    schedule: NoiseSchedule | None = None,
    document_ids: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
) -> torch.Tensor:
    """[b, B]: each block's mean Eq. 8 term (weight × -log p over its L' positions) for one noise draw,
    with the objective's own weights and estimator (averaged over a complementary pair, if it has one)."""
    noised = objective.noise(x, generator, schedule, scored)
    terms = objective.diffusion_terms(model, x, noised, document_ids)
    return terms.view(x.shape[0], -1, objective.block_size).mean(-1)


def elbo_variance(per_block: torch.Tensor, objective: BlockDiffusionObjective) -> ElboVariance:
    """Both Var. ELBO statistics from the block losses [N, B] of N sequence draws (module docstring)."""
    values = per_block.detach().double().cpu()
    per_sequence = values.sum(-1) * objective.block_size / objective.scored_per_row
    return ElboVariance(
        per_block=_unbiased_var(values.reshape(-1)),
        per_sequence=_unbiased_var(per_sequence),
        mean=per_sequence.mean().item(),
        sequences=values.shape[0],
    )


def _unbiased_var(values: torch.Tensor) -> float:
    return values.var(correction=1).item() if values.numel() > 1 else math.nan


def select_parameters(model: torch.nn.Module, contains: str = "") -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters whose name contains `contains` ("" = all)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and contains in n]


@dataclass
class GradientSums:
    """Running Σ_m g_m and Σ_m ‖g_m‖² over minibatches: Eq. 9 from sums, so shares of the M batches on
    different ranks combine by adding (`engine/schedule_search.py` all-reduces them)."""

    total: list[torch.Tensor] = field(default_factory=list)  # Σ_m g_m per parameter, float64
    sq_norms: float = 0.0
    count: int = 0

    def add(self, grads: Iterable[torch.Tensor]) -> None:
        grads = [g.detach().double() for g in grads]
        if not self.total:
            self.total = [torch.zeros_like(g) for g in grads]
        for acc, g in zip(self.total, grads, strict=True):
            acc += g
        self.sq_norms += sum(float((g * g).sum()) for g in grads)
        self.count += 1

    def result(self) -> GradientVariance:
        """(1/(M-1)) Σ ‖g_m - ḡ‖² = (Σ ‖g_m‖² - M ‖ḡ‖²) / (M - 1)."""
        m = self.count
        mean_sq = sum(float((t * t).sum()) for t in self.total) / (m * m)
        variance = (self.sq_norms - m * mean_sq) / (m - 1) if m > 1 else math.nan
        return GradientVariance(variance, mean_sq, m, sum(t.numel() for t in self.total))


def batch_gradient(
    model,
    objective,
    x: torch.Tensor,
    generator: torch.Generator | None,
    parameters: list[torch.nn.Parameter],
    schedule: NoiseSchedule | None = None,
    document_ids: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """∇l(X) of one minibatch (fresh noise from `generator`) with respect to `parameters`."""
    with torch.enable_grad():
        loss = objective(model, x, generator, schedule=schedule, document_ids=document_ids, scored=scored).loss
        return torch.autograd.grad(loss, parameters, allow_unused=True, materialize_grads=True)
