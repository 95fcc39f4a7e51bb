"""Training-step time of the vectorized x_t ⊕ x pass against the naive per-block loop (Alg. 1),
and of block diffusion (L' = 4) against MDLM (L' = L), measured in one run.

The variants are timed interleaved, round after round, and compared by their medians, so load on
a noisy machine hits all of them alike. Prints ratios; the absolute times are for orientation only.

    python tools/bench_training.py --preset tiny --seq-len 128 --batch-size 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sad3_megatron.config import ModelConfig
from sad3_megatron.diffusion import BlockDiffusionObjective, make_schedule
from sad3_megatron.engine.distributed import init_distributed
from sad3_megatron.model import build_model, make_spec


def step_time(model, objective, x, naive: bool) -> float:
    generator = torch.Generator().manual_seed(0)
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    objective(model, x, generator, naive=naive).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=30522, help="bert-base-uncased by default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=4)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device)
    torch.manual_seed(0)
    mask_id = args.vocab_size - 1
    spec = make_spec(ModelConfig(preset=args.preset, dropout=0.0), args.vocab_size, mask_id, "sdpa")
    model = build_model(spec, device)
    L, schedule = args.seq_len, make_schedule("clipped", 0.3, 0.8)
    x = torch.randint(0, mask_id, (args.batch_size, L), device=device)
    variants = {
        f"vectorized L'={args.block_size}": (BlockDiffusionObjective(L, args.block_size, schedule, mask_id), False),
        f"naive loop L'={args.block_size}": (BlockDiffusionObjective(L, args.block_size, schedule, mask_id), True),
        f"vectorized MDLM L'={L}": (BlockDiffusionObjective(L, L, schedule, mask_id), False),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for objective, naive in variants.values():  # warm-up
        step_time(model, objective, x, naive)
    for _ in range(args.rounds):
        for name, (objective, naive) in variants.items():
            times[name].append(step_time(model, objective, x, naive))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"device={device.type} preset={args.preset} L={L} batch={args.batch_size} vocab={args.vocab_size} rounds={args.rounds}"
    )
    for name, t in median.items():
        print(f"  {name:28s} median step {t * 1000:8.1f} ms")
    names = list(median)
    print(f"naive / vectorized step time:      {median[names[1]] / median[names[0]]:.2f}x")
    print(f"BD3 (L'={args.block_size}) / MDLM step time:      {median[names[0]] / median[names[2]]:.2f}x")


if __name__ == "__main__":
    main()
