"""When a sample ends: at its first EOS (variable-length generation, Sec. 6.2), at the token
budget, or when it degenerates into repetition (low unigram entropy of its recent tokens).

Checked after every finished block (after every token for the AR baseline), so a sample ends at
the first EOS of a finished block and is truncated right after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STOP_REASONS = ("eos", "length", "repetition")


def unigram_entropy(tokens: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the empirical token distribution of each row of `tokens` [r, w]."""
    width = tokens.shape[-1]
    ordered = tokens.sort(dim=-1).values
    new_run = torch.ones_like(ordered, dtype=torch.long)
    new_run[..., 1:] = (ordered[..., 1:] != ordered[..., :-1]).long()
    counts = torch.zeros(ordered.shape, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(-1, new_run.cumsum(dim=-1) - 1, torch.ones_like(counts))
    p = counts / width
    return -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1)


@dataclass(frozen=True)
class StopCriteria:
    num_tokens: int  # the token budget per sample
    eos_id: int | None  # None: generate through EOS (fixed-length samples, as in Table 6)
    # Stop when the recent window's unigram entropy falls below this (0: never). Text has about
    # 3.5-4 nats in 64 tokens (ln 64 = 4.16); 1.5 nats means a loop over a handful of tokens.
    min_entropy: float = 1.5
    entropy_window: int = 64

    def check(self, generated: torch.Tensor, new_from: int) -> tuple[list[str | None], torch.Tensor]:
        """Stop reasons (None: continue) and lengths of the rows of `generated` [r, g].

        `generated` holds each active sample's generated tokens so far (never beyond the budget);
        tokens from `new_from` on are the block just finished."""
        rows, width = generated.shape
        reasons: list[str | None] = [None] * rows
        lengths = torch.full((rows,), width, dtype=torch.long)
        eos_hit = torch.zeros(rows, dtype=torch.bool)
        if self.eos_id is not None:
            is_eos = (generated[:, new_from:] == self.eos_id).cpu()
            eos_hit = is_eos.any(dim=1)
            lengths = torch.where(eos_hit, new_from + is_eos.int().argmax(dim=1) + 1, lengths)
        repetitive = torch.zeros(rows, dtype=torch.bool)
        if self.min_entropy > 0 and width >= self.entropy_window:
            repetitive = (unigram_entropy(generated[:, width - self.entropy_window :]) < self.min_entropy).cpu()
        for i in range(rows):
            if eos_hit[i]:
                reasons[i] = "eos"
            elif width >= self.num_tokens:
                reasons[i] = "length"
            elif repetitive[i]:
                reasons[i] = "repetition"
        return reasons, lengths
