"""Data-driven clipped schedules (Sec. 5.3, Sec. 6): at an evaluation, score a grid of (β, ω) on
held-out batches and pick the range whose estimate has the least variance.

    search = ScheduleSearch.from_config(cfg, group=data_parallel_group)
    result = search.run(model, objective, val_sequences, device, step)
    objective_schedule = result.best            # a NoiseSchedule: clipped U[β, ω]
    log(result.metrics())                       # every candidate's variance, and the choice

The criterion is Var. ELBO (`elbo`, the paper's proxy and the reference code's: the per-block
variance of core/variance.py) or the gradient variance of Eq. 9 (`grad`). Every candidate is
scored with the weight it trains with (1/t, core/schedules.py) and the run's masking, on the same
batches with the same uniforms (common random numbers: candidates differ by their range only). The
batches are split over the ranks of `group` (rank r takes batches r, r + W, ...); per-block losses
are gathered and gradient sums all-reduced, so W ranks give the single-process variances.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.likelihood import rows_and_documents
from sad3_megatron.core.schedules import T_FLOOR, NoiseSchedule, make_schedule, parse_grid
from sad3_megatron.core.variance import GradientSums, batch_gradient, block_losses, elbo_variance, select_parameters

CRITERIA = ("elbo", "grad")


@dataclass
class Candidate:
    schedule: NoiseSchedule
    variance: float

    @property
    def beta(self) -> float:
        return self.schedule.t_min

    @property
    def omega(self) -> float:
        return self.schedule.t_max


@dataclass
class SearchResult:
    step: int
    criterion: str
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def best(self) -> NoiseSchedule:
        """The candidate of least variance (the first on ties; NaNs never win)."""
        finite = [c for c in self.candidates if c.variance == c.variance]
        return min(finite or self.candidates, key=lambda c: c.variance).schedule

    def metrics(self) -> dict[str, float]:
        """Flat numbers for metrics.jsonl / wandb: search/var_B_W per candidate, search/beta, search/omega."""
        out = {f"search/var_{c.beta:g}_{c.omega:g}": c.variance for c in self.candidates}
        out.update({"search/beta": self.best.t_min, "search/omega": self.best.t_max})
        return out


class ScheduleSearch:
    """Grid search over clipped ranges (β, ω) by estimator variance; see the module docstring."""

    def __init__(
        self,
        grid: list[tuple[float, float]],
        criterion: str = "elbo",
        batches: int = 100,
        batch_size: int = 16,
        t_floor: float = T_FLOOR,
        masking: str = "bernoulli",
        seed: int = 0,
        parameters: str = "",
        group=None,
        equal_shares: bool = False,
    ):
        if criterion not in CRITERIA:
            raise Sad3Error(f"unknown schedule-search criterion {criterion!r}: choose elbo or grad")
        self.schedules = [make_schedule("clipped", b, w, t_floor, masking) for b, w in grid]
        self.criterion, self.batches, self.batch_size = criterion, batches, batch_size
        self.seed, self.parameters, self.group = seed, parameters, group
        self.equal_shares = equal_shares

    @classmethod
    def from_config(cls, cfg, group=None) -> ScheduleSearch:
        d = cfg.diffusion
        return cls(
            parse_grid(d.search_grid, d.block_size),
            d.schedule_search,
            d.search_batches,
            cfg.train.micro_batch_size,
            d.t_floor,
            d.masking,
            cfg.run.seed,
            d.search_parameters,
            group,
            equal_shares=cfg.parallel.zero_stage == 3,
        )

    def _share(self, sequences) -> list[int]:
        """This rank's batch indices: whole batches only, every `world`-th from its rank."""
        available = min(self.batches, len(sequences) // self.batch_size)
        if available < (2 if self.criterion == "grad" else 1):
            raise Sad3Error(
                f"the schedule search needs held-out batches of {self.batch_size} sequences, the split has {len(sequences)}: lower diffusion.search_batches or add data"
            )
        rank, world = _rank_and_world(self.group)
        if self.equal_shares:  # ZeRO-3 gathers weights collectively in every forward: the same count per rank
            available = max(available // world, 1) * world
        return list(range(available))[rank::world]

    def _generator(self, step: int, index: int) -> torch.Generator:
        # The same uniforms for every candidate and on every layout: a function of (seed, step, batch).
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_000_033 + index)

    def run(
        self, model, objective, sequences, device: torch.device, step: int = 0, autocast_dtype=None
    ) -> SearchResult:
        """Score every candidate; collective over `group` when it has several ranks."""
        share = self._share(sequences)
        was_training = model.training
        model.eval()
        score = self._elbo if self.criterion == "elbo" else self._grad
        try:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                candidates = [
                    Candidate(s, score(model, objective, sequences, device, step, share, s)) for s in self.schedules
                ]
        finally:
            model.train(was_training)
        return SearchResult(step, self.criterion, candidates)

    def _batch(self, sequences, index: int, device):
        return rows_and_documents(sequences, index * self.batch_size, (index + 1) * self.batch_size, device)

    @torch.no_grad()
    def _elbo(self, model, objective, sequences, device, step, share, schedule) -> float:
        mine = []
        for i in share:
            x, document_ids, scored = self._batch(sequences, i, device)
            losses = block_losses(model, objective, x, self._generator(step, i), schedule, document_ids, scored)
            mine.append((i, losses.cpu()))
        pieces = sorted(_gather(mine, self.group), key=lambda piece: piece[0])  # batch order, whatever the layout
        return elbo_variance(torch.cat([p for _, p in pieces]), objective).per_block

    def _grad(self, model, objective, sequences, device, step, share, schedule) -> float:
        params = [p for _, p in select_parameters(model, self.parameters)]
        if not params:
            raise Sad3Error(f"diffusion.search_parameters={self.parameters!r} matches no parameter name")
        sums = GradientSums()
        for i in share:
            x, document_ids, scored = self._batch(sequences, i, device)
            sums.add(batch_gradient(model, objective, x, self._generator(step, i), params, schedule, document_ids, scored))
        return _all_reduce_sums(sums, params, self.group).result().variance


def _rank_and_world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(items: list, group) -> list:
    if _rank_and_world(group)[1] == 1:
        return items
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, items, group=group)
    return [item for part in out for item in part]


def _all_reduce_sums(sums: GradientSums, params, group) -> GradientSums:
    """Add every rank's Σ g, Σ ‖g‖² and count (ranks without a batch contribute zeros)."""
    if _rank_and_world(group)[1] == 1:
        return sums
    if not sums.total:
        sums.total = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    for t in sums.total:
        dist.all_reduce(t, group=group)
    scalars = torch.tensor([sums.sq_norms, float(sums.count)], dtype=torch.float64, device=sums.total[0].device)
    dist.all_reduce(scalars, group=group)
    sums.sq_norms, sums.count = scalars[0].item(), int(scalars[1].item())
    return sums
