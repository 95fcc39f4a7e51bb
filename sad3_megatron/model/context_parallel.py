"""Context parallelism (`parallel.context_parallel = C`): the rows of the doubled sequence x_t ⊕ x
split across the C ranks of megatron-core's context-parallel group (docs/context-parallel.md).

Each rank runs every layer on its own share of the 2L query rows. Keys and values are all-gathered
across the group after rotary (their gradients summed back to the rank that owns the rows), so every
mask works unchanged: the rank's queries attend to all keys under a `RowsMask` that names, for each
query and each key, its position in the training window.

Which rows a rank holds — a zig-zag per half. Both halves of x_t ⊕ x cost the same per query block:
a noisy query of block b sees its own noisy block and the b clean blocks before it, a clean query
sees the b + 1 clean blocks up to its own, (b + 1)·L' keys either way. Cutting each half into 2C
chunks and giving rank r chunks r and 2C-1-r pairs cheap with dear blocks, so every rank does the
same attention work exactly (tools/cp_balance.py counts it). A rank's local order is

    [noisy chunk r, noisy chunk 2C-1-r, clean chunk r, clean chunk 2C-1-r]

so its noisy rows come first and the last layer keeps the first L/C rows, as it keeps the first L
without CP. MDLM (x_t only) and the AR baseline (x[:, :-1], L-1 rows, padded with one unscored row
to L) run the same zig-zag over their single half.

What travels: rotary positions, labels and document ids follow the rows; the token and noise draws
are the same on every rank of the group (they read the same micro-batch with the same seed) and each
slices its rows, which is why a CP step equals the unsplit one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.masks import AttentionMask, DocumentMask, RowsMask
from sad3_megatron.core.network import ModelOutput


def zigzag_rows(rows: int, halves: int, cp: int, rank: int) -> torch.Tensor:
    """Positions of `rows` (split into `halves` equal halves) held by CP rank `rank`, in its local
    order: chunks rank and 2C-1-rank of each half's 2C equal chunks, half by half."""
    half = rows // halves
    if rows % halves or half % (2 * cp):
        raise Sad3Error(f"{rows} rows in {halves} half(s) do not split into 2 × {cp} equal chunks per half")
    size = half // (2 * cp)
    starts = [h * half + chunk * size for h in range(halves) for chunk in (rank, 2 * cp - 1 - rank)]
    return torch.cat([torch.arange(start, start + size) for start in starts])


@dataclass(frozen=True)
class RowLayout:
    """How one training pass's rows are split over the CP group.

    `rows` input rows (2L for x_t ⊕ x, L for MDLM, L-1 for AR), of which the first `outputs` are
    scored (L, L, L-1). A single-half input is padded to a multiple of 2C rows."""

    rows: int
    outputs: int
    cp: int
    rank: int

    @property
    def halves(self) -> int:
        if self.rows == 2 * self.outputs:
            return 2  # x_t ⊕ x: the scored noisy half, then the clean half
        if self.rows == self.outputs:
            return 1
        raise Sad3Error(f"context parallelism splits x_t ⊕ x or a fully scored input, not {self.outputs} of {self.rows} rows")

    @property
    def padded(self) -> int:
        """Input rows after padding (only a single half is padded: the AR baseline's L-1 rows)."""
        return self.rows if self.halves == 2 else math.ceil(self.rows / (2 * self.cp)) * 2 * self.cp

    @property
    def keep(self) -> int:
        """Rows of this rank that the last layer keeps: its share of the scored rows."""
        return self.padded // self.cp // self.halves

    @functools.cached_property
    def local(self) -> torch.Tensor:
        """This rank's positions in the (padded) input, in local order; the first `keep` are scored."""
        return zigzag_rows(self.padded, self.halves, self.cp, self.rank)

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """The position of every key in the order the all-gather delivers them: rank 0's rows, rank 1's, ..."""
        return torch.cat([zigzag_rows(self.padded, self.halves, self.cp, r) for r in range(self.cp)])


def pad_columns(t: torch.Tensor, length: int, fill: int | None = None) -> torch.Tensor:
    """t [..., n] padded to [..., length] by repeating its last column, or with `fill`."""
    extra = length - t.shape[-1]
    if extra <= 0:
        return t
    tail = t[..., -1:] if fill is None else torch.full_like(t[..., -1:], fill)
    return torch.cat([t, tail.expand(*t.shape[:-1], extra)], dim=-1)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward hands each rank the sum over the group of the
    gradients of its own rows (a reduce-scatter).

    Not torch.distributed.nn's all_gather: on gloo its backward scatters into buffers with the
    gradient's strides and gives wrong gradients for non-contiguous ones, which attention's dK/dV are."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        size = dist.get_world_size(group)
        if dist.get_backend(group) == "nccl":
            out = x.new_empty((size * x.shape[0], *x.shape[1:]))
            dist.all_gather_into_tensor(out, x, group=group)
            return out
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        size = dist.get_world_size(group)
        if dist.get_backend(group) == "nccl":
            grad = grad.contiguous()
            out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        total = grad.contiguous().clone()  # gloo has no reduce-scatter: sum everything, keep this rank's rows
        dist.all_reduce(total, group=group)
        return total.chunk(size, dim=0)[dist.get_rank(group)].contiguous(), None


class _SumRows(torch.autograd.Function):
    """Sum over a group of tensors that are zero outside each rank's own rows; backward passes the
    gradient through unchanged, of which each rank's rows are its own share."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def context_parallel_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def gather_keys_values(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [s, b, heads, d] of this rank's rows → [C·s, b, heads, d] of every rank's, in
    rank order (RowLayout.keys), in one collective; gradients return to the rank of each row."""
    if context_parallel_size() == 1:
        return k, v
    kv = _GatherRows.apply(torch.cat([k, v], dim=-1), parallel_state.get_context_parallel_group())
    return kv.chunk(2, dim=-1)


class ContextParallelDenoiser:
    """x_θ with Eq. 6's interface (core/network.py Network.forward) run on this rank's rows: what the
    objective calls in place of the model under context parallelism.

    The objective hands over the whole pass (x_t ⊕ x, positions, mask, labels); this rank runs its
    rows and scores its share of the outputs; the per-token losses of all ranks are summed, so every
    rank returns the whole [b, outputs] cross-entropy. Its gradient reaches each rank only through its
    own rows, so a rank's gradient is its share of the batch's: the trainer scales the loss by C,
    because DeepSpeed averages gradients over the data- × context-parallel group."""

    def __init__(self, model):
        self.model = model
        self.group = parallel_state.get_context_parallel_group()
        self.cp = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._static: dict = {}  # masks without documents: one RowsMask (and its dense / BlockMask) per run

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, tokens, positions, mask, *, past_kv=None, num_outputs=None, labels=None, return_kv=False):
        if labels is None or past_kv is not None or return_kv:
            raise Sad3Error("context parallelism runs scored passes only (labels, no KV cache): sample on one rank")
        b, outputs = labels.shape
        layout = RowLayout(tokens.shape[1], outputs, self.cp, self.rank)
        rows = layout.local.to(tokens.device)
        scored = rows[: layout.keep]
        last = positions[-1:] + 1  # a pad row sits one position past the last
        positions = torch.cat([positions, last + torch.arange(layout.padded - positions.numel(), device=last.device)])
        local_mask = self.rows_mask(mask, layout, tokens.device)
        nll = self.model(
            pad_columns(tokens, layout.padded)[:, rows], positions[rows], local_mask, num_outputs=layout.keep,
            labels=pad_columns(labels, layout.padded // layout.halves)[:, scored],
        ).token_nll  # fmt: skip
        mine = nll.new_zeros(b, layout.padded // layout.halves).index_copy(1, scored, nll)
        return ModelOutput(None, _SumRows.apply(mine, self.group)[:, :outputs], None)

    def rows_mask(self, mask, layout: RowLayout, device: torch.device) -> RowsMask:
        """This rank's queries against every rank's keys, under the pass's mask."""
        if isinstance(mask, AttentionMask):
            key = (mask, layout.rows, layout.outputs, str(device))
            if key not in self._static:
                self._static[key] = RowsMask(mask, layout.local.to(device), layout.keys.to(device))
            return self._static[key]
        if isinstance(mask, DocumentMask):
            ids = pad_columns(mask.document_ids, layout.padded, fill=-1)  # pad rows: a document of their own
            return RowsMask(mask.base, layout.local.to(device), layout.keys.to(device), ids)
        raise Sad3Error(f"context parallelism takes the training masks, not {type(mask).__name__}")
