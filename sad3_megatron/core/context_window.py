"""Which clean prefix a block conditions on, so that samples can be longer than the training
context L (Sec. 6.2: SAR decoding "supports generating sequences of arbitrary length").

A block starting at absolute position s conditions on the clean tokens [c(s), s), with at most
`size` of them (default L - L', so the block plus its context never exceed the L tokens the model
was trained on). Once the context is full, the oldest tokens are dropped in one go, keeping the
newest `keep` tokens, and the kept tokens are re-encoded from scratch:

    c(s) = 0                              for s <= size
    c(s) = s_k - keep,  s_k = size + L' + k·(size - keep + L'),  for s_k <= s < s_{k+1}

Why re-encode instead of sliding the stored K/V: in layers above the first, a cached key/value
also depends on the tokens its own block attended to, so a K/V cache that merely drops old
entries still carries information from tokens outside the window, and it no longer equals any
forward pass the model was trained on. Re-encoding keeps the window exact: block b sees precisely
a block-causal pass over [c(s), s), the same thing the no-cache path recomputes, and nothing
before c(s). `keep` trades context for compute: re-encoding `keep` tokens once every
(size - keep)/L' + 1 blocks. keep = size (`sliding="exact"`) is the exact sliding window: c(s) =
s - size, every block sees exactly the last `size` tokens, at the price of a re-encode per block
(the reference code's window of L tokens, block included). Smaller values (`sliding="halving"`,
the default: keep = size/2) re-encode less often and condition on as few as `keep` tokens just
after a slide. Samples of at most L tokens never slide, so Table 6's numbers do not depend on it.

Positions: tokens keep their absolute positions (they grow past L; nothing is re-based). RoPE
makes attention depend on position differences only, and within a window those stay below L,
as in training; re-basing would give the same logits in exact arithmetic but would require
re-rotating every cached key whenever the window moves. c(s) is a pure function of s, so the
KV-cache path, the no-cache path and a run resumed from a prompt all use the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .errors import Sad3Error


@dataclass(frozen=True)
class ContextWindow:
    size: int  # the most clean prefix tokens a block conditions on
    keep: int  # prefix tokens kept (and re-encoded) when the window slides
    block_size: int  # L'; both sizes are multiples of it, so windows start on block boundaries

    def start(self, block_start: int) -> int:
        """c(s): the first context token of the block that starts at absolute position `block_start`."""
        if block_start <= self.size:
            return 0
        period = self.size - self.keep + self.block_size
        slide = (block_start - self.size - self.block_size) // period
        return self.size + self.block_size + slide * period - self.keep


SlidingRule = Literal["halving", "exact"]
SLIDING: tuple[str, ...] = get_args(SlidingRule)


def context_window(
    seq_len: int,
    block_size: int,
    size: int | None = None,
    keep: int | None = None,
    autoregressive: bool = False,
    sliding: str = "halving",
) -> ContextWindow:
    """The window for a model trained on `seq_len` tokens, with defaults L - L' and, for `keep`,
    half of it (`sliding="halving"`) or all of it (`"exact"`).

    The AR baseline was trained on inputs of L - 1 tokens and feeds one token per step, so its
    largest window is L - 2 cached tokens."""
    largest = seq_len - block_size - (1 if autoregressive else 0)
    size = largest if size is None else size
    if not 0 <= size <= largest:
        raise Sad3Error(
            f"--window {size} must be between 0 and {largest} (the training context {seq_len} minus the block)"
        )
    if size % block_size:
        raise Sad3Error(f"--window {size} must be a multiple of the block size {block_size}")
    if sliding not in SLIDING:
        raise Sad3Error(f"unknown --sliding {sliding!r}: choose one of {', '.join(SLIDING)}")
    if sliding == "exact" and keep not in (None, size):
        raise Sad3Error(f"--sliding exact keeps the whole window: drop --window-keep {keep} or use --sliding halving")
    if keep is None:
        keep = size if sliding == "exact" else (size // 2) // block_size * block_size
    if not 0 <= keep <= size or keep % block_size:
        raise Sad3Error(
            f"--window-keep {keep} must be a multiple of the block size {block_size} between 0 and --window {size}"
        )
    return ContextWindow(size, keep, block_size)
