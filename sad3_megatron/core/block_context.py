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


def noisy_block_window(length: int, block_size: int) -> AttentionMask:
    """Mask(n, L') restricted to [last noisy block ⊕ clean blocks 1..B-1] on both axes (n = length).

    Row and column offsets start at index n - L' of the doubled sequence x_t ⊕ x, i.e. at the
    last noisy block, and span n tokens: that block, then the first n - L' clean tokens."""
    offset = length - block_size
    return AttentionMask(length, block_size, offset, length, offset, length)


class CachedContext:
    """x_θ^b(x_t^b, K^{1:b-1}, V^{1:b-1}) with the clean K/V cached (Eq. 6, Alg. 2)."""

    def __init__(self, model, block_size: int):
        self.model, self.block_size = model, block_size
        self.cache = KVCache()
        self.clean_passes = 0

    def prepare(self, tokens: torch.Tensor, start: int, end: int) -> None:
        """Make the cache hold the clean K/V of tokens[:, start:end] (block-causal over them)."""
        cache, device = self.cache, tokens.device
        if cache.covers(start, end):
            return
        if start == end:
            cache.clear(start)
            return
        if cache.start == start and cache.layers is not None and end - cache.end == self.block_size:
            # Alg. 2, after SAMPLE: ∅, K^b, V^b ← x_θ^b(x^b). No logits are needed (num_outputs=0).
            out = self.model(
                tokens[:, cache.end : end],
                _positions(cache.end, end, device),
                None,
                past_kv=cache.layers,
                num_outputs=0,
                return_kv=True,
            )
            cache.append(out.kv)
        else:  # first context, a prompt, or a window that slid: encode [start, end) from scratch
            out = self.model(
                tokens[:, start:end],
                _positions(start, end, device),
                AttentionMask.block_causal(end - start, self.block_size),
                num_outputs=0,
                return_kv=True,
            )
            cache.replace(out.kv, start, end)
        self.clean_passes += 1

    def denoise(self, rows: torch.Tensor | None, x_block: torch.Tensor, block_start: int) -> torch.Tensor:
        positions = _positions(block_start, block_start + x_block.shape[1], x_block.device)
        return self.model(x_block, positions, None, past_kv=self.cache.rows(rows)).logits

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.cache.keep_rows(keep)


class RecomputeContext:
    """The same denoiser without a cache: the context is recomputed at every step."""

    def __init__(self, model, block_size: int):
        self.model, self.block_size = model, block_size
        self.prefix: torch.Tensor | None = None
        self.start = 0
        self.clean_passes = 0

    def prepare(self, tokens: torch.Tensor, start: int, end: int) -> None:
        self.prefix, self.start = tokens[:, start:end], start

    def denoise(self, rows: torch.Tensor | None, x_block: torch.Tensor, block_start: int) -> torch.Tensor:
        prefix = self.prefix if rows is None else self.prefix.index_select(0, rows)
        length = x_block.shape[1] + prefix.shape[1]
        device = x_block.device
        positions = torch.cat(
            [
                _positions(block_start, block_start + x_block.shape[1], device),
                _positions(self.start, block_start, device),
            ]
        )
        tokens = torch.cat([x_block, prefix], dim=1)
        mask = noisy_block_window(length, self.block_size)
        return self.model(tokens, positions, mask, num_outputs=x_block.shape[1]).logits

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Nothing is stored across blocks: `prepare` gets the active rows' tokens every block."""
