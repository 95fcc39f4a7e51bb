"""A denoiser with a known output: a table of logits for every possible x_t of a tiny vocabulary,
with the interface of SAD3Transformer.forward. Its exact likelihoods can be enumerated."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch


class TableDenoiser:
    """Logits [L, V] looked up by the whole input row (tokens in 0..V-1, the mask id among them)."""

    training = False

    def __init__(self, length: int, vocab: int, mask_id: int, seed: int = 0, scale: float = 2.0):
        self.length, self.vocab, self.mask_id = length, vocab, mask_id
        g = torch.Generator().manual_seed(seed)
        self.table = scale * torch.randn((vocab**length, length, vocab), generator=g, dtype=torch.float64)
        self.table[..., mask_id] = float("-inf")  # SUBS: [MASK] is never predicted
        self.powers = vocab ** torch.arange(length - 1, -1, -1)

    def logits_of(self, rows: torch.Tensor) -> torch.Tensor:
        return self.table[(rows * self.powers).sum(-1)]

    def __call__(self, tokens, positions, mask, *, past_kv=None, num_outputs=None, labels=None, return_kv=False):
        logits = self.logits_of(tokens)
        if labels is None:
            return SimpleNamespace(logits=logits, token_nll=None, kv=None)
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return SimpleNamespace(logits=None, token_nll=nll, kv=None)


def mask_patterns(length: int):
    """Every non-empty set of masked positions, as a tuple of booleans."""
    return [m for m in itertools.product([False, True], repeat=length) if any(m)]


def masked_row(x: list[int], pattern, mask_id: int) -> list[int]:
    return [mask_id if m else v for v, m in zip(x, pattern, strict=True)]
