"""The clean-prefix key/value cache K^{1:b-1}, V^{1:b-1} of Eq. 6 and Alg. 2.

It stores, per layer, the rotated keys and values that `network.Network.forward(..., return_kv=True)`
returns, together with the absolute token positions [start, end) they cover, so the sampler can
tell whether a block's context is already cached, needs one more block appended, or must be
re-encoded because the context window slid (see `context_window.py`).
"""

from __future__ import annotations

import torch

KV = tuple[torch.Tensor, torch.Tensor]  # rotated keys and values of one layer, [b, heads, s, head_dim]


class KVCache:
    """Per-layer [batch, heads, tokens, head_dim] keys/values of the clean tokens [start, end)."""

    def __init__(self) -> None:
        self.layers: list[KV] | None = None
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def covers(self, start: int, end: int) -> bool:
        return self.start == start and self.end == end and (self.layers is not None or start == end)

    def replace(self, kv: list[KV], start: int, end: int) -> None:
        """Hold exactly `kv`, the keys/values of tokens [start, end)."""
        self.layers, self.start, self.end = list(kv), start, end

    def clear(self, position: int) -> None:
        """An empty context that starts (and ends) at `position`."""
        self.layers, self.start, self.end = None, position, position

    def append(self, kv: list[KV]) -> None:
        """Concatenate the keys/values of the tokens right after `end` (Alg. 2: K ← K^{1:b-1} ⊕ K^b)."""
        if self.layers is None:
            self.layers = list(kv)
        else:
            self.layers = [
                (torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2))
                for (k, v), (k2, v2) in zip(self.layers, kv, strict=True)
            ]
        self.end += kv[0][0].shape[2]

    def rows(self, index: torch.Tensor | None) -> list[KV] | None:
        """The cache of the batch rows `index` (None: all rows), as `past_kv` for the model."""
        if self.layers is None or index is None:
            return self.layers
        return [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the batch rows of finished samples (`keep` is a bool mask over the rows)."""
        if self.layers is not None:
            self.layers = [(k[keep], v[keep]) for k, v in self.layers]
