"""Likelihood evaluation: the NELBO of Eq. 7 under t ~ U[0, 1] with its Monte-Carlo standard error,
and the exact NLL of the AR baseline. Reported per scored token (position 0 of a row is context for
both); PPL = exp(per-token NELBO) is an upper bound on the true perplexity for diffusion models (Sec. 6).
`sad3 eval`, the trainer's held-out bound and the exported model's `nelbo` all call `estimate_bound`.

The default estimator integrates t out (`evaluation_schedule()`, `count` masking in schedules.py):
the same bound as t ~ U[0, 1] with Bernoulli masks, unbiased and with finite variance, and exact (one
pass, no Monte-Carlo error) at L' = 1. `schedule=evaluation_schedule(t_floor)` gives the paper's
Monte-Carlo protocol instead (t ~ U[t_floor, 1], MDLM's t_floor = 1e-3).

`estimate_continuations` is the same bound for a continuation given its context (what
lm-evaluation-harness asks of a model): each row is context ⊕ continuation at positions 0.., the
context clean in the blocks before the continuation and inside the block where it starts, the
continuation's tokens the only ones masked and scored (the objective's `scored_nll`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import Sad3Error
from .objectives import Objective, scored_label_nll
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


def continuation_rows(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], multiple: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows context ⊕ continuation [b, n] for (context, continuation) token lists, right-padded with
    `pad_id` to one length n, a multiple of `multiple` (L': a row's last block is completed with
    [MASK], unknown and never scored, as Alg. 2 leaves positions past its budget); and `scored`
    [b, n], True on the continuations. A context holds at least one token: position 0 of a row is
    context, as in training (its BOS)."""
    width = max(len(context) + len(continuation) for context, continuation in requests)
    width = -(-width // multiple) * multiple
    x = torch.full((len(requests), width), pad_id, dtype=torch.long)
    scored = torch.zeros((len(requests), width), dtype=torch.bool)
    for i, (context, continuation) in enumerate(requests):
        if not context:
            raise Sad3Error("a continuation is scored after at least one context token (e.g. BOS): got an empty context")
        end = len(context) + len(continuation)
        x[i, :end] = torch.as_tensor([*context, *continuation], dtype=torch.long)
        scored[i, len(context) : end] = True
    return x, scored


@dataclass
class ContinuationEstimate:
    nll: torch.Tensor  # [b] -log p(continuation | context): exact for AR and L' = 1, else the NELBO (mean over draws)
    std_err: torch.Tensor  # [b] standard error of that mean across draws (0 when exact)
    greedy: torch.Tensor  # [b] bool: greedy decoding reproduces the continuation (`greedy_continuations`)
    draws: int
    exact: bool


@torch.no_grad()
def estimate_continuations(
    model,
    objective: Objective,
    x: torch.Tensor,
    scored: torch.Tensor,
    draws: int = 8,
    seed: int = 0,
    schedule: NoiseSchedule | None = None,
    greedy: bool = True,
) -> ContinuationEstimate:
    """The bound on -log p(x_scored | the rest) of every row of `x` [b, n] (`continuation_rows`), for
    `objective` built over rows of n tokens, averaged over `draws` draws of the noise under `schedule`
    (default `evaluation_schedule()`: t integrated out, as `sad3 eval`), all in one pass over draws × b
    rows (the antithetic strata span them, so the draws' spread overstates the error); exact in one draw for the
    AR baseline and for L' = 1; `greedy=False` skips the greedy rule (all False). The model is
    expected in eval mode."""
    if scored[:, 0].any():
        raise Sad3Error("position 0 of a row is context and is never scored")
    if objective.autoregressive:  # exact, and one pass gives both the log-probabilities and the greedy rule
        logits = objective.logits(model, x, x)
        nll = scored_label_nll(logits, x, scored).cpu()
        matches = _argmax_matches(logits, x, scored.to(x.device)) if greedy else torch.zeros_like(nll, dtype=torch.bool)
        return ContinuationEstimate(nll, torch.zeros_like(nll), matches, 1, True)
    schedule = schedule or evaluation_schedule()
    exact = objective.block_size == 1 and schedule.masking == "count"
    draws = 1 if exact else draws
    generator = torch.Generator().manual_seed(seed)
    # All draws in one pass (draws × b rows): one call of x_θ per batch, the noise stratified over all of them.
    values = objective.scored_nll(model, x.repeat(draws, 1), scored.repeat(draws, 1), generator, schedule)
    values = values.view(draws, x.shape[0]).double().cpu()
    std_err = values.std(0) / math.sqrt(draws) if draws > 1 else torch.zeros(x.shape[0], dtype=torch.float64)
    matches = greedy_continuations(model, objective, x, scored) if greedy else torch.zeros(x.shape[0], dtype=torch.bool)
    return ContinuationEstimate(values.mean(0), std_err, matches, draws, exact)


def _argmax_matches(logits: torch.Tensor, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return ((logits[:, : x.shape[1]].argmax(-1) == x) | ~where).all(-1).cpu()


@torch.no_grad()
def greedy_continuations(model, objective: Objective, x: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[b] bool: whether greedy decoding of each row's continuation, one position at a time from left
    to right, reproduces it. At every scored position i the argmax of x_θ, given the context, the
    continuation before i (clean) and [MASK] from i to the end of i's block, must equal x_i (for the
    AR baseline and L' = 1: every next-token argmax, HFLM's rule). One pass per in-block offset of
    the scored positions (at most L'), all blocks at once."""
    if objective.autoregressive:
        return _argmax_matches(objective.logits(model, x, x), x, scored.to(x.device))
    offset = torch.arange(x.shape[1], device=x.device) % objective.block_size
    scored = scored.to(x.device)
    matches = torch.ones(x.shape[0], dtype=torch.bool)
    for j in offset[scored.any(0)].unique().tolist():
        x_t = torch.where(scored & (offset >= j), objective.mask_id, x)
        matches &= _argmax_matches(objective.logits(model, x, x_t), x, scored & (offset == j))
    return matches
