"""The block denoiser x_θ^b(x_t^b, x^{<b}) of Eq. 6, computed two ways that must agree.

- `CachedContext` (Alg. 2): the clean context lives in a K/V cache. A finished block is run once
  as clean tokens against the cache (`mask=None`: the block sees the cache and itself, which is
  the last block row of M_BC) and its K/V are appended; every denoising step then runs only the
  L' noisy tokens with `past_kv`.
- `RecomputeContext` (the `--no-kv-cache` reference): every denoising step recomputes the whole
  context. It runs x_t^b ⊕ x^{[c, s)} under the window of the training mask Mask(n, L') that
  starts at the last noisy block (Suppl. D): that block sees itself and every clean token, the
  clean tokens see each other block-causally (M_BC). This is exactly the vectorized training
  pass restricted to one block, and putting the noisy block first lets `num_outputs` keep only
  its L' rows, so the reference pays for the output layer on L' rows as the cached path does.

Both receive the clean tokens of the active rows and the window [start, end) chosen by
`ContextWindow`, and return logits [rows, L', vocab] for the block at `end`.

Two adaptation switches change what the context computes (docs/adaptation.md), in both paths alike:
- `clean_block_size` 1 (`diffusion.clean_attention=causal`): clean tokens are encoded token-causally
  (the cache's first pass under the causal mask, each appended block under `clean_window(., ., 1)`),
  as the clean half of training sees them; the noisy block still sees the whole cache and itself.
- `shift` (token shift): the logits for position j of a block are the output of position j - 1. For
  j > 0 that is the noisy block's own row j - 1; for j = 0 it is the last clean token's row, which
  the pass that encoded that token already computed (kept in `last`), exactly as training reads the
  clean row of position s - 1 for the first token of the block at s.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .kv_cache import KVCache
from .masks import AttentionMask


class BlockContext(Protocol):
    clean_passes: int  # forward passes spent on clean tokens only (K/V appends and re-encodes)

    def prepare(self, tokens: torch.Tensor, start: int, end: int) -> None: ...

    def denoise(self, rows: torch.Tensor | None, x_block: torch.Tensor, block_start: int) -> torch.Tensor: ...

    def keep_rows(self, keep: torch.Tensor) -> None: ...


def _positions(start: int, end: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, end, device=device)


def noisy_block_window(length: int, block_size: int, clean_block_size: int | None = None) -> AttentionMask:
    """Mask(n, L') restricted to [last noisy block ⊕ clean blocks 1..B-1] on both axes (n = length).

    Row and column offsets start at index n - L' of the doubled sequence x_t ⊕ x, i.e. at the
    last noisy block, and span n tokens: that block, then the first n - L' clean tokens."""
    offset = length - block_size
    return AttentionMask(length, block_size, offset, length, offset, length, clean_block_size)


def shifted(last: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Token shift: position j's logits are row j - 1's; position 0's are `last`, the row of the
    clean token before the block (zeros where there is none: such a position is never generated)."""
    first = torch.zeros_like(logits[:, 0]) if last is None else last.to(logits.dtype)
    return torch.cat([first[:, None], logits[:, :-1]], dim=1)


class CachedContext:
    """x_θ^b(x_t^b, K^{1:b-1}, V^{1:b-1}) with the clean K/V cached (Eq. 6, Alg. 2)."""

    def __init__(self, model, block_size: int, shift: bool = False, clean_block_size: int | None = None):
        self.model, self.block_size = model, block_size
        self.shift, self.clean_block = shift, clean_block_size or block_size
        self.cache = KVCache()
        self.last: torch.Tensor | None = None  # shift: logits [rows, V] of the last cached token's row
        self.clean_passes = 0

    def prepare(self, tokens: torch.Tensor, start: int, end: int) -> None:
        """Make the cache hold the clean K/V of tokens[:, start:end] (block-causal over them)."""
        cache, device = self.cache, tokens.device
        if cache.covers(start, end):
            return
        if start == end:
            cache.clear(start)
            self.last = None
            return
        outputs = None if self.shift else 0  # logits only for the shift's last row
        if cache.start == start and cache.layers is not None and end - cache.end == self.block_size:
            # Alg. 2, after SAMPLE: ∅, K^b, V^b ← x_θ^b(x^b). No logits are needed (num_outputs=0).
            mask = None if self.clean_block == self.block_size else AttentionMask.clean_window(len(cache), end - cache.end, 1)
            out = self.model(
                tokens[:, cache.end : end],
                _positions(cache.end, end, device),
                mask,
                past_kv=cache.layers,
                num_outputs=outputs,
                return_kv=True,
            )
            cache.append(out.kv)
        else:  # first context, a prompt, or a window that slid: encode [start, end) from scratch
            out = self.model(
                tokens[:, start:end],
                _positions(start, end, device),
                AttentionMask.block_causal(end - start, self.clean_block),
                num_outputs=outputs,
                return_kv=True,
            )
            cache.replace(out.kv, start, end)
        self.last = out.logits[:, -1] if self.shift else None
        self.clean_passes += 1

    def denoise(self, rows: torch.Tensor | None, x_block: torch.Tensor, block_start: int) -> torch.Tensor:
        last = self.last if self.last is None or rows is None else self.last.index_select(0, rows)
        if self.shift and x_block.shape[1] == 1 and last is not None:  # L' = 1: the clean row is all it reads
            return last[:, None]
        positions = _positions(block_start, block_start + x_block.shape[1], x_block.device)
        logits = self.model(x_block, positions, None, past_kv=self.cache.rows(rows)).logits
        return shifted(last, logits) if self.shift else logits

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.cache.keep_rows(keep)
        if self.last is not None:
            self.last = self.last[keep]


class RecomputeContext:
    """The same denoiser without a cache: the context is recomputed at every step."""

    def __init__(self, model, block_size: int, shift: bool = False, clean_block_size: int | None = None):
        self.model, self.block_size = model, block_size
        self.shift, self.clean_block_size = shift, clean_block_size
        self.prefix: torch.Tensor | None = None
        self.start = 0
        self.clean_passes = 0

    def prepare(self, tokens: torch.Tensor, start: int, end: int) -> None:
        self.prefix, self.start = tokens[:, start:end], start

    def denoise(self, rows: torch.Tensor | None, x_block: torch.Tensor, block_start: int) -> torch.Tensor:
        prefix = self.prefix if rows is None else self.prefix.index_select(0, rows)
        width = x_block.shape[1]
        length = width + prefix.shape[1]
        device = x_block.device
        positions = torch.cat([_positions(block_start, block_start + width, device),
                               _positions(self.start, block_start, device)])  # fmt: skip
        tokens = torch.cat([x_block, prefix], dim=1)
        mask = noisy_block_window(length, self.block_size, self.clean_block_size)
        reads_last = self.shift and prefix.shape[1] > 0  # shift: also the last clean row
        logits = self.model(tokens, positions, mask, num_outputs=None if reads_last else width).logits
        if not self.shift:
            return logits
        return shifted(logits[:, -1] if reads_last else None, logits[:, :width])

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Nothing is stored across blocks: `prepare` gets the active rows' tokens every block."""
