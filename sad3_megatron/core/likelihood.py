"""Likelihood evaluation: the NELBO of Eq. 7 under t ~ U[0, 1] with its Monte-Carlo standard error,
and the exact NLL of the AR baseline. Reported per scored token (position 0 of a row is context for
both); PPL = exp(per-token NELBO) is an upper bound on the true perplexity for diffusion models (Sec. 6).
`sad3 eval`, the trainer's held-out bound and the exported model's `nelbo` all call `estimate_bound`.

The default estimator integrates t out (`evaluation_schedule()`, `count` masking in schedules.py):
the same bound as t ~ U[0, 1] with Bernoulli masks, unbiased and with finite variance, and exact (one
pass, no Monte-Carlo error) at L' = 1. `schedule=evaluation_schedule(t_floor)` gives the paper's
Monte-Carlo protocol instead (t ~ U[t_floor, 1], MDLM's t_floor = 1e-3)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .objectives import Objective
from .schedules import NoiseSchedule, evaluation_schedule


@dataclass
class BoundEstimate:
    nelbo_per_token: float  # mean over Monte-Carlo draws of t (exact NLL for AR)
    std_err: float  # standard error of that mean across draws (0 for AR)
    ppl: float  # exp(nelbo_per_token): a bound for diffusion, exact for AR
    ppl_std_err: float  # delta-method error of the PPL
    draws: int
    tokens: int
    sequences: int
    block_size: int | None
    exact: bool

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_words(nelbo_per_token: float, ppl: float, exact: bool) -> str:
    """"held-out NELBO 5.9788/token (PPL <= 394.95)", or NLL and "=" where the value is exact (AR, L' = 1)."""
    what, relation = ("NLL", "=") if exact else ("NELBO", "<=")
    return f"held-out {what} {nelbo_per_token:.4f}/token (PPL {relation} {ppl:.2f})"


def rows_and_documents(sequences, start: int, stop: int, device: torch.device):
    """Rows [start, stop) as a tensor, with their document ids when the rows were packed by document
    and their scored mask when only some tokens are scored (chat rows: the answers), else None."""
    if getattr(sequences, "document_ids", False) or getattr(sequences, "has_scored", False):
        batch = sequences.batch(np.arange(start, stop))
        ids = None if batch.document_ids is None else torch.as_tensor(batch.document_ids, device=device)
        scored = None if getattr(batch, "scored", None) is None else torch.as_tensor(batch.scored, device=device)
        return torch.as_tensor(batch.tokens, device=device), ids, scored
    return torch.as_tensor(sequences[start:stop], device=device), None, None


@torch.no_grad()
def estimate_bound(
    model,
    objective: Objective,
    sequences: np.ndarray,
    device: torch.device,
    batch_size: int = 16,
    draws: int = 4,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    max_sequences: int | None = None,
    schedule: NoiseSchedule | None = None,
) -> BoundEstimate:
    """Average the per-token NELBO over `sequences` [n, L] (the first `max_sequences` when given),
    repeated for `draws` independent draws of the noise per block under `schedule` (default
    `evaluation_schedule()`); the spread across draws gives the standard error. The AR baseline, and
    L' = 1 under `count` masking, are exact: one draw. Rows packed by document keep their document ids.

    Whatever the objective trained with (uniform weights, an AR term), this scores `objective.bound()`:
    the NELBO of Eq. 7 of the same model function (token shift and clean attention as trained)."""
    count = len(sequences) if not max_sequences else min(max_sequences, len(sequences))
    objective = objective.bound()
    was_training = model.training
    model.eval()
    autoregressive = objective.autoregressive
    schedule = None if autoregressive else (schedule or evaluation_schedule())
    exact = autoregressive or (objective.block_size == 1 and schedule.masking == "count")
    draws = 1 if exact else draws
    per_draw = []
    tokens = 0
    for k in range(draws):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
        total, tokens = 0.0, 0
        for start in range(0, count, batch_size):
            x, document_ids, scored = rows_and_documents(sequences, start, min(start + batch_size, count), device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                terms = objective(model, x, generator, schedule=schedule, document_ids=document_ids, scored=scored)
            total += terms.nll_sum.item()
            tokens += terms.num_tokens
        per_draw.append(total / tokens)
    model.train(was_training)
    mean = float(np.mean(per_draw))
    std_err = float(np.std(per_draw, ddof=1) / math.sqrt(draws)) if draws > 1 else 0.0
    block = None if autoregressive else objective.block_size
    ppl = math.exp(mean) if mean < 700 else math.inf  # a diverged model's bound overflows a float: say so
    return BoundEstimate(mean, std_err, ppl, ppl * std_err, draws, tokens, count, block, exact)
