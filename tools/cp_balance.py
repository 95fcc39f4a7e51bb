"""Each context-parallel rank's share of the attention work under the training mask: visible (query,
key) pairs counted from the mask the rank's kernel is given (core/masks.py RowsMask over the rows
model/context_parallel.py assigns it), for every layer and for the last one (noisy queries only),
and FlexAttention's 128 × 128 tiles with any visible pair.

    python tools/cp_balance.py --seq-len 8192 --block-size 4 16 --cp 2 4 8
    python tools/cp_balance.py --seq-len 8192 --cp 2 4 8 --objective ar

Without document packing the zig-zag per half is exactly balanced (docs/context-parallel.md says why);
with packed documents the work follows the documents and no static assignment balances it.
"""

from __future__ import annotations

import argparse

import torch

from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.masks import RowsMask
from sad3_megatron.core.registry import build_objective
from sad3_megatron.model.context_parallel import RowLayout

TILE = 128


def rank_work(mask: RowsMask, keep: int, chunk: int = 512) -> tuple[int, int, int]:
    """(visible pairs, of which those of the first `keep` queries, 128 × 128 tiles with any pair) of
    one rank's mask, counted from its dense form `chunk` query rows at a time."""
    pairs = last = tiles = 0
    for start in range(0, mask.q_len, chunk):
        window = RowsMask(mask.base, mask.q_rows[start : start + chunk], mask.kv_rows)
        seen = window.dense()
        counts = seen.sum(dim=1)
        pairs += int(counts.sum())
        last += int(counts[: max(0, keep - start)].sum())
        for t in range(0, seen.shape[0], TILE):
            block = seen[t : t + TILE]
            cols = -(-block.shape[1] // TILE) * TILE
            padded = torch.nn.functional.pad(block, (0, cols - block.shape[1]))
            tiles += int(padded.view(block.shape[0], -1, TILE).any(dim=2).any(dim=0).sum())
    return pairs, last, tiles


def balance(objective: str, seq_len: int, block_size: int, cp: int) -> list[tuple[int, int, int]]:
    """Per CP rank: (pairs, last-layer pairs, tiles) of one training pass."""
    diffusion = DiffusionConfig(objective=objective, block_size=block_size)
    pass_ = build_objective(diffusion, seq_len, mask_id=0)
    rows = pass_.positions.numel()
    out = []
    for rank in range(cp):
        layout = RowLayout(rows, pass_.num_outputs, cp, rank)
        out.append(rank_work(RowsMask(pass_.mask, layout.local, layout.keys), layout.keep))
    return out


def table(objective: str, seq_len: int, block_sizes: list[int], cps: list[int]) -> list[str]:
    lines = [
        f"objective={objective}, L={seq_len}: visible (query, key) pairs per CP rank, worst rank / mean",
        f"{'Lb':>5} {'C':>2} | {'pairs per rank (M)':<52} {'all':>6} {'last':>6} {'tiles':>6}",
    ]
    for block_size in block_sizes:
        for cp in cps:
            work = balance(objective, seq_len, block_size, cp)
            ratios = [max(col) / (sum(col) / cp) for col in zip(*work, strict=True)]
            shown = ", ".join(f"{pairs / 1e6:.2f}" for pairs, _, _ in work)
            lines.append(f"{block_size:>5} {cp:>2} | {shown:<52} " + " ".join(f"{r:6.4f}" for r in ratios))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--block-size", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--objective", default="sad3", choices=["sad3", "ar"], help="sad3 with L'=L is MDLM")
    args = parser.parse_args()
    block_sizes = [1] if args.objective == "ar" else args.block_size
    print("\n".join(table(args.objective, args.seq_len, block_sizes, args.cp)))


if __name__ == "__main__":
    main()
