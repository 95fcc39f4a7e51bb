"""When a sample ends: at its first EOS (variable-length generation, Sec. 6.2), at the token
budget, or when it degenerates into repetition (low unigram entropy of its recent tokens).

Two rules for the degenerate case (`STOP_RULES`):

- `paper`, the protocol of Table 6 (the reference code's `_check_stop_conds`): once 256 tokens are
  generated, a sample whose last 256 tokens have a unigram entropy below 4 nats is REJECTED when
  samples have a fixed length (drawn again, see `generate.py`), and stops with those 256 tokens
  cut off when samples have a variable length (a sample left empty is rejected too).
- `sad3`: the last 64 tokens below 1.5 nats stop the sample and keep what it generated, which
  spends no compute on loops but leaves them in the sample.

Checked after every finished block (after every token for the AR baseline), so a sample ends at
the first EOS of a finished block and is truncated right after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

StopRule = Literal["paper", "sad3"]
STOP_REASONS = ("eos", "length", "repetition", "rejected")
# rule: (entropy window, entropy floor in nats). Text has about 3.5-4 nats in 64 tokens
# (ln 64 = 4.16) and 4.5-5 in 256 (ln 256 = 5.55); 1.5 nats in 64 means a loop over a handful.
STOP_RULES: dict[str, tuple[int, float]] = {"paper": (256, 4.0), "sad3": (64, 1.5)}
LOW_ENTROPY_ACTIONS = ("keep", "truncate", "reject")


def low_entropy_action(rule: str, fixed_length: bool) -> str:
    """What a degenerate sample becomes under `rule`: kept, cut back (paper, variable length) or rejected."""
    if rule == "sad3":
        return "keep"
    return "reject" if fixed_length else "truncate"


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
    min_entropy: float = 1.5  # stop when the recent window's unigram entropy falls below this (0: never)
    entropy_window: int = 64
    low_entropy: str = "keep"  # one of LOW_ENTROPY_ACTIONS

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
        degenerate = torch.zeros(rows, dtype=torch.bool)
        if self.min_entropy > 0 and width >= self.entropy_window:
            degenerate = (unigram_entropy(generated[:, width - self.entropy_window :]) < self.min_entropy).cpu()
        kept = width - self.entropy_window if self.low_entropy == "truncate" else width
        for i in range(rows):
            if eos_hit[i]:
                reasons[i] = "eos"
            elif degenerate[i] and self.low_entropy != "keep":  # the paper's rule checks the last block too
                reasons[i] = "rejected" if self.low_entropy == "reject" or kept == 0 else "repetition"
                lengths[i] = kept
            elif width >= self.num_tokens:
                reasons[i] = "length"
            elif degenerate[i]:
                reasons[i] = "repetition"
        return reasons, lengths
