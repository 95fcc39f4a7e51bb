"""Within-block samplers: SAMPLE(x_θ^b, K^{1:b-1}, V^{1:b-1}) of Alg. 2 for masked diffusion.

A block starts with its positions to generate set to [MASK] and is denoised by the reverse
process restricted to the block (Sec. 3.1, Eq. 2). Every sampler here runs the same loop
(`denoise_block`): evaluate x_θ on the rows that still have masked tokens (one NFE), shape the
x-prediction (temperature, top-p), let the sampler pick which masked positions to commit, draw
their values from the x-prediction. Committed tokens are never changed again (SUBS: unmasked
tokens are copied, Sahoo et al., 2024).

- `ancestral`: the DDPM update of MDLM with T steps on the linear schedule α_t = 1 - t. Going from
  t = j/T to s = (j-1)/T, a masked token is unmasked with probability (t - s)/t and stays masked
  with probability s/t, so each masked token is unmasked at a step drawn uniformly from the T
  steps, independently of the others. We draw those steps up front and visit only the steps where
  something is unmasked: the model has no time input, so between such steps the block input and
  hence x_θ are unchanged. This is MDLM's caching of the x-prediction (Table 6 caption): an NFE is
  spent only when the block input changed, so a block costs at most min(T, masked tokens) NFEs.
- `first_hitting`: the first-hitting sampler (Zheng et al., 2024) draws the exact time at which
  the next token is unmasked; with a time-agnostic x_θ those times do not change any prediction,
  so it reduces to unmasking one uniformly chosen masked token per NFE, the T → ∞ limit of
  `ancestral`. It takes one NFE per masked token, whatever T is.
- `confident`: parallel decoding by confidence: after each NFE, commit every masked position whose
  largest (shaped) probability is at least `threshold`, at least one per step, and enough to
  finish within T steps; values are drawn from the shaped x-prediction (so with --top-p at most
  the threshold, a position committed for its confidence gets its argmax).

The draws all come from one CPU `torch.Generator`, in an order fixed by the block's state, so the
KV-cache and no-cache paths, whose x_θ agree to about 1e-6, give the same samples for the same seed
(the draws are Gumbel-max, which rounding can flip only at a near-tie; see `distributions.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .distributions import draw_categorical, shape_probs

SamplerName = Literal["ancestral", "first_hitting", "confident", "euler"]  # euler: SEDD's (sedd.py)

# x_θ over a subset of the block's rows: (row index or None for all rows, x_t rows) -> logits [r, L', V]
Denoise = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass
class BlockSample:
    tokens: torch.Tensor  # [n, L'] the block with every requested position committed
    nfe: torch.Tensor  # [n] calls of x_θ that included each row


def _group_ranks(key: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
    """Rank of each position's group, visiting keys in decreasing order and equal keys together.

    Positions that are not to be generated sort last; their ranks are never used."""
    key = torch.where(todo, key, torch.full_like(key, -1))
    sorted_key, order = key.sort(dim=1, descending=True, stable=True)
    new_group = torch.ones_like(sorted_key, dtype=torch.long)
    new_group[:, 1:] = (sorted_key[:, 1:] != sorted_key[:, :-1]).long()
    return torch.empty_like(order).scatter_(1, order, new_group.cumsum(dim=1) - 1)


class BlockSampler(Protocol):
    """SAMPLE of Alg. 2: commit every `todo` position of the block `x` [n, L'] (its [MASK] tokens to
    generate), calling `denoise` for x_θ; one NFE per call per row. `registry.make_sampler` builds them."""

    name: str

    def denoise_block(
        self, x: torch.Tensor, todo: torch.Tensor, denoise: Denoise, generator: torch.Generator,
        temperature: float = 1.0, top_p: float = 1.0,
    ) -> BlockSample: ...  # fmt: skip


class MaskedDiffusionSampler:
    """The loop every x-prediction sampler shares: evaluate x_θ on the rows that still have masked
    positions (one NFE), shape p_θ, let `commit` pick positions, draw their values from p_θ. Rows are
    independent, so they advance in lockstep without waiting for each other."""

    name: str
    steps: int

    def plan(self, todo: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        return None

    def commit(self, plan: torch.Tensor | None, step: int, probs: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denoise_block(
        self, x: torch.Tensor, todo: torch.Tensor, denoise: Denoise, generator: torch.Generator,
        temperature: float = 1.0, top_p: float = 1.0,
    ) -> BlockSample:  # fmt: skip
        x, todo = x.clone(), todo.clone()
        nfe = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        plan = self.plan(todo, generator)
        step = 0
        while True:
            rows = todo.any(dim=1).nonzero().flatten()
            if rows.numel() == 0:
                return BlockSample(x, nfe)
            index = None if rows.numel() == x.shape[0] else rows
            probs = shape_probs(denoise(index, x[rows]), temperature, top_p)
            todo_rows = todo[rows]
            commit = self.commit(None if plan is None else plan[rows], step, probs, todo_rows)
            values = x[rows]
            values[commit] = draw_categorical(probs[commit], generator)
            x[rows] = values
            todo[rows] = todo_rows & ~commit
            nfe[rows] += 1
            step += 1


class ScheduledSampler(MaskedDiffusionSampler):
    """Samplers whose unmasking order is fixed before the first NFE: ancestral and first-hitting."""

    def __init__(self, name: str, steps: int):
        self.name, self.steps = name, steps

    def plan(self, todo: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Group rank of every position: the NFE (counted from 0) after which it is committed."""
        shape = tuple(todo.shape)
        if self.name == "ancestral":
            # Unmasked at step j ~ U{1..T}; larger j is earlier (t = j/T counts down to 0).
            key = torch.randint(0, self.steps, shape, generator=generator)
        else:
            key = torch.rand(shape, generator=generator, dtype=torch.float64)  # a uniform random order
        return _group_ranks(key.to(todo.device), todo)

    def commit(self, plan: torch.Tensor, step: int, probs: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
        return todo & (plan == step)


class ConfidentSampler(MaskedDiffusionSampler):
    """Confidence-thresholded parallel decoding, at least one token and at most T steps per block."""

    name = "confident"

    def __init__(self, steps: int, threshold: float):
        self.steps, self.threshold = steps, threshold

    def commit(self, plan: None, step: int, probs: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
        confidence = torch.where(todo, probs.max(dim=-1).values, torch.full_like(todo, -1.0, dtype=probs.dtype))
        remaining = todo.sum(dim=1, keepdim=True)
        steps_left = max(self.steps - step, 1)
        at_least = torch.clamp((remaining + steps_left - 1) // steps_left, min=1)  # ceil, ≥ 1
        rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        return todo & ((confidence >= self.threshold) | (rank < at_least))


def denoise_block(
    x: torch.Tensor,
    todo: torch.Tensor,
    denoise: Denoise,
    sampler: BlockSampler,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> BlockSample:
    """Commit every `todo` position of the block `x` [n, L'] with `sampler` (see BlockSampler)."""
    return sampler.denoise_block(x, todo, denoise, generator, temperature, top_p)
