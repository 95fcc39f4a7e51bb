"""The block-diffusion attention mask of Suppl. D, as ONE mask function.

Training runs the transformer over the doubled sequence x_t ⊕ x of length 2L
(indices 0..L-1 are noisy, L..2L-1 are clean) under

    Mask(L, L') = [ M_BD   M_OBC ]      M_BD : noisy i sees noisy j of the same block
                  [ 0      M_BC  ]      M_OBC: noisy i sees clean j of a strictly earlier block
                                        M_BC : clean i sees clean j of the same or an earlier block

Every other mask the project needs is a window of this one, so all backends (dense SDPA,
FlexAttention BlockMask, the KV-cache sampler, the HF export) share this single definition:

- the clean stream alone (the naive Alg. 1 reference, and no-cache sampling): the M_BC quadrant;
- the plain causal mask of the AR baseline: the M_BC quadrant with L' = 1;
- one context-parallel rank's rows against every rank's keys (`RowsMask`): any window, any rows.

`clean_block_size` generalizes M_BC for the adaptation recipes (docs/adaptation.md): the clean half
attends block-causally over blocks of that size, L' by default (the paper's M_BC) or 1 (a token-causal
clean half, `diffusion.clean_attention=causal`); the noisy half keeps M_BD and M_OBC over blocks of L'.

This module is pure torch: no DeepSpeed, no megatron.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def block_diffusion_visible(
    q_idx: torch.Tensor, kv_idx: torch.Tensor, seq_len: int, block_size: int, clean_block_size: int | None = None
) -> torch.Tensor:
    """Whether doubled-sequence query `q_idx` may attend to key `kv_idx` (Suppl. D); the clean half's
    M_BC runs over blocks of `clean_block_size` (default L'; 1 makes the clean half token-causal)."""
    q_clean = q_idx >= seq_len
    kv_clean = kv_idx >= seq_len
    q_pos = torch.where(q_clean, q_idx - seq_len, q_idx)
    kv_pos = torch.where(kv_clean, kv_idx - seq_len, kv_idx)
    q_block, kv_block = q_pos // block_size, kv_pos // block_size
    clean = clean_block_size or block_size
    m_bd = ~q_clean & ~kv_clean & (q_block == kv_block)
    m_obc = ~q_clean & kv_clean & (q_block > kv_block)
    m_bc = q_clean & kv_clean & (q_pos // clean >= kv_pos // clean)
    return m_bd | m_obc | m_bc


@dataclass(frozen=True)
class AttentionMask:
    """A rectangular window [q_offset, q_offset+q_len) × [kv_offset, kv_offset+kv_len) of Mask(L, L').

    Frozen and hashable, so backends can cache the dense matrix or BlockMask built from it.
    """

    seq_len: int
    block_size: int
    q_offset: int
    q_len: int
    kv_offset: int
    kv_len: int
    clean_block_size: int | None = None  # blocks of the clean half's M_BC (None: L'; 1: token-causal)

    @classmethod
    def doubled(cls, seq_len: int, block_size: int, clean_block_size: int | None = None) -> AttentionMask:
        """The full 2L × 2L training mask over x_t ⊕ x (Alg. 1, vectorized)."""
        return cls(seq_len, block_size, 0, 2 * seq_len, 0, 2 * seq_len, clean_block_size)

    @classmethod
    def block_causal(cls, seq_len: int, block_size: int) -> AttentionMask:
        """M_BC over a clean sequence of length `seq_len` (block size 1 gives the causal mask)."""
        return cls(seq_len, block_size, seq_len, seq_len, seq_len, seq_len)

    @classmethod
    def causal(cls, seq_len: int) -> AttentionMask:
        """The AR baseline's causal mask: M_BC with L' = 1."""
        return cls.block_causal(seq_len, 1)

    @classmethod
    def clean_window(cls, past: int, length: int, block_size: int) -> AttentionMask:
        """M_BC for `length` clean tokens at positions past.. that follow `past` cached ones (blocks
        aligned to position 0): each sees the cache and the tokens of its own and earlier blocks."""
        total = past + length
        return cls(total, block_size, total + past, length, total, total)

    def first_rows(self, n: int) -> AttentionMask:
        """The same mask for the first `n` queries only (the model's last layer keeps the noisy half)."""
        return replace(self, q_len=min(n, self.q_len))

    def first_cols(self, n: int) -> AttentionMask:
        """The same mask over the first `n` keys only."""
        return replace(self, kv_len=min(n, self.kv_len))

    @property
    def clean_block(self) -> int:
        return self.clean_block_size or self.block_size

    @property
    def is_causal(self) -> bool:
        """True when this window is a plain causal mask (what flash-attn can run natively)."""
        return self.clean_block == 1 and self.q_offset == self.kv_offset == self.seq_len and self.q_len == self.kv_len

    @property
    def is_full(self) -> bool:
        """True when every query sees every key: MDLM's window over x_t alone (one block, M_BD)."""
        noisy = self.q_offset + self.q_len <= self.seq_len and self.kv_offset + self.kv_len <= self.seq_len
        return self.block_size == self.seq_len and noisy

    def mask_mod(self) -> MaskMod:
        """FlexAttention-style predicate (b, h, q_idx, kv_idx) -> bool over this window."""
        seq_len, block_size, q_off, kv_off = self.seq_len, self.block_size, self.q_offset, self.kv_offset
        clean = self.clean_block_size

        def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return block_diffusion_visible(q_idx + q_off, kv_idx + kv_off, seq_len, block_size, clean)

        return visible

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The boolean [q_len, kv_len] matrix (True = may attend), for SDPA and for tests."""
        q = torch.arange(self.q_len, device=device)[:, None] + self.q_offset
        kv = torch.arange(self.kv_len, device=device)[None, :] + self.kv_offset
        return block_diffusion_visible(q, kv, self.seq_len, self.block_size, self.clean_block_size)


def doubled_positions(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rotary positions of x_t ⊕ x: both halves use 0..L-1, so a noisy token and its clean twin align."""
    pos = torch.arange(seq_len, device=device)
    return torch.cat([pos, pos])


class _BuiltOnce:
    """What a batch-dependent mask shares between the layers: the dense matrix or BlockMask built for it
    (and for its `first_rows` windows) on first use, kept in the mask's `built` dict, which the
    windows share. Subclasses are dataclasses with a `built` field and q_len / kv_len."""

    def memo(self, kind: str, device: torch.device | str, build: Callable[[], object]):
        """What `build` makes for this window on `device`, built on first use and then shared."""
        key = (kind, self.q_len, self.kv_len, str(device))
        if key not in self.built:
            self.built[key] = build()
        return self.built[key]


@dataclass(frozen=True, eq=False)
class DocumentMask(_BuiltOnce):
    """Mask(L, L') AND "same document", for packed rows that keep attention inside documents.

    `document_ids` [b, kv_len] labels every key position of the window (for the doubled sequence,
    cat(doc, doc)); queries are a prefix of the same window, so they read the first q_len labels.
    Every query still sees itself, so no softmax row is empty. It depends on the batch, so backends
    never cache it globally; instead the dense matrix or BlockMask built for it is kept in `built`,
    which `first_rows` shares, so one micro-batch builds each window once for all layers.
    """

    base: AttentionMask
    document_ids: torch.Tensor
    built: dict = field(default_factory=dict, repr=False)  # (kind, q_len, device) -> dense mask / BlockMask

    @property
    def q_len(self) -> int:
        return self.base.q_len

    @property
    def kv_len(self) -> int:
        return self.base.kv_len

    @property
    def is_causal(self) -> bool:
        return False

    def first_rows(self, n: int) -> DocumentMask:
        return DocumentMask(self.base.first_rows(n), self.document_ids, self.built)

    def mask_mod(self) -> MaskMod:
        base, ids = self.base.mask_mod(), self.document_ids

        def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return base(b, h, q_idx, kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

        return visible

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[b, 1, q_len, kv_len] boolean (broadcast over heads)."""
        ids = self.document_ids.to(device)
        same = ids[:, : self.q_len, None] == ids[:, None, :]
        return (self.base.dense(device) & same)[:, None]


def document_window_ids(document_ids: torch.Tensor, doubled: bool) -> torch.Tensor:
    """Per-position document labels of a row, laid out like the model input (x_t ⊕ x when doubled)."""
    return torch.cat([document_ids, document_ids], dim=1) if doubled else document_ids


@dataclass(frozen=True, eq=False)
class RowsMask(_BuiltOnce):
    """A window of Mask(L, L') whose queries and keys sit at arbitrary positions of `base`'s window:
    query i is position q_rows[i], key j is position kv_rows[j] (and, with `document_ids`, both must
    also be in the same document). Context parallelism (model/context_parallel.py) gives each rank
    its own rows as queries and every rank's rows, in the order the keys arrive, as keys.

    Positions past the end of `base`'s window extend it by the same formula: the AR baseline's L-1
    rows padded to L make the pad row the last row of the causal mask over L, which no other row sees.
    `document_ids` [b, n] label `base`'s positions (as DocumentMask's do). Built per micro-batch (or
    once, without documents); the dense matrix or BlockMask is kept in `built` and shared by the layers."""

    base: AttentionMask
    q_rows: torch.Tensor  # [q_len] long, positions in base's query range
    kv_rows: torch.Tensor  # [kv_len] long, positions in base's key range
    document_ids: torch.Tensor | None = None
    built: dict = field(default_factory=dict, repr=False)

    @property
    def q_len(self) -> int:
        return self.q_rows.numel()

    @property
    def kv_len(self) -> int:
        return self.kv_rows.numel()

    @property
    def is_causal(self) -> bool:
        return False

    def first_rows(self, n: int) -> RowsMask:
        return RowsMask(self.base, self.q_rows[:n], self.kv_rows, self.document_ids, self.built)

    def mask_mod(self) -> MaskMod:
        """Index tensors captured by the predicate: on GPU, FlexAttention's BlockMask is built over them."""
        b0, q_rows, kv_rows, ids = self.base, self.q_rows, self.kv_rows, self.document_ids

        def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            q, kv = q_rows[q_idx], kv_rows[kv_idx]
            seen = block_diffusion_visible(q + b0.q_offset, kv + b0.kv_offset, b0.seq_len, b0.block_size, b0.clean_block_size)
            return seen if ids is None else seen & (ids[b, q] == ids[b, kv])

        return visible

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The boolean [q_len, kv_len] matrix, or [b, 1, q_len, kv_len] with document ids."""
        q, kv = self.q_rows.to(device), self.kv_rows.to(device)
        b0 = self.base
        seen = block_diffusion_visible(
            q[:, None] + b0.q_offset, kv[None, :] + b0.kv_offset, b0.seq_len, b0.block_size, b0.clean_block_size
        )
        if self.document_ids is None:
            return seen
        ids = self.document_ids.to(device)
        return (seen & (ids[:, q, None] == ids[:, None, kv]))[:, None]
