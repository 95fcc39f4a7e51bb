"""The cost of the adaptation switches (docs/adaptation.md), measured in one run: training-step time of each
recipe's setting against the paper's objective at the same L', and the variance the complementary copy buys.

A step is forward, backward and an AdamW update of the trainer's model (megatron-core layers at TP = 1) on
the same rows and noise seeds. Variants are timed interleaved, round after round, and compared by medians,
so load on a shared machine hits all of them alike. Ratios are against `paper` (every switch off). On a
CPU the default is one thread and the process's CPU time (`--clock cpu`): on a machine shared with other
jobs, wall time measures the neighbours as much as the step; on a GPU, wall time after a synchronize.

The variance rows: the per-sequence NELBO estimate (t ~ U(0, 1], Bernoulli masks, Eq. 7 weights) over
--draws draws of the noise, one mask per row against the complementary pair; the pair costs two rows, so
"per unit compute" compares 2 × Var(pair) with Var(one mask) (< 1: the pair beats two independent masks).

    python tools/bench_adaptation.py                                  # tiny preset, L = 128, CPU
    python tools/bench_adaptation.py --preset small --seq-len 1024 --batch-size 8 --block-size 32   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.model_config import ModelConfig
from sad3_megatron.core.registry import build_objective
from sad3_megatron.core.schedules import make_schedule
from sad3_megatron.engine.distributed import init_distributed
from sad3_megatron.model.build import build_model
from sad3_megatron.model.transformer import make_spec

VARIANTS = {  # name -> DiffusionConfig fields on top of the paper's objective
    "paper": {},
    "shift": {"shift": True},
    "complementary": {"complementary_masks": True},
    "causal_clean": {"clean_attention": "causal"},
    "causal+ar_loss": {"clean_attention": "causal", "ar_loss_weight": 1.0},
    "fast_dllm_v2": {"shift": True, "complementary_masks": True, "loss_weighting": "uniform"},
    "nemotron": {"clean_attention": "causal", "ar_loss_weight": 1.0, "diffusion_loss_weight": 0.3},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    def __init__(self, name: str, args, device: torch.device, mask_id: int):
        self.name = name
        d = replace(DiffusionConfig(block_size=args.block_size, schedule="linear"), **VARIANTS[name])
        self.objective = build_objective(d, args.seq_len, mask_id)
        torch.manual_seed(0)  # the same initial weights for every variant
        spec = make_spec(ModelConfig(preset=args.preset, dropout=0.0), args.vocab_size, mask_id, args.backend)
        self.model = build_model(spec, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.device, self.times = device, []

    def step(self, x: torch.Tensor, seed: int, clock) -> None:
        synchronize(self.device)
        start = clock()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective(self.model, x, torch.Generator().manual_seed(seed)).loss.backward()
        self.optimizer.step()
        synchronize(self.device)
        self.times.append(clock() - start)


@torch.no_grad()
def estimate_variances(model, args, x: torch.Tensor, mask_id: int) -> tuple[float, float]:
    """Var over draws of each sequence's per-token NELBO, averaged over sequences: (one mask, pair)."""
    out = []
    for complementary in (False, True):
        d = DiffusionConfig(block_size=args.block_size, schedule="linear", complementary_masks=complementary)
        objective = build_objective(d, args.seq_len, mask_id, schedule=make_schedule("linear"))
        generator = torch.Generator().manual_seed(1)
        draws = []
        for _ in range(args.draws):
            noised = objective.noise(x, generator)
            draws.append(objective.bound().diffusion_terms(model, x, noised).sum(-1) / objective.scored_per_row)
        out.append(torch.stack(draws).var(dim=0).mean().item())
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=30522, help="bert-base-uncased by default")
    parser.add_argument("--backend", default="sdpa", help="attention kernel: sdpa (CPU) or flex (GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--draws", type=int, default=64, help="noise draws for the variance rows")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None, help="default: cpu on a CPU, wall on a GPU")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock_name = args.clock or ("wall" if device.type == "cuda" else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    init_distributed(device)
    mask_id = args.vocab_size - 1
    variants = [Variant(name, args, device, mask_id) for name in args.variants.split(",")]
    x = torch.randint(0, mask_id, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    for i in range(args.warmup):
        for v in variants:
            v.step(x, seed=i, clock=clock)
    for v in variants:
        v.times.clear()
    for r in range(args.rounds):
        for v in variants:
            v.step(x, seed=1000 + r, clock=clock)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} preset={args.preset} L={args.seq_len} L'={args.block_size} "
          f"batch={args.batch_size} rounds={args.rounds} clock={clock_name} threads={torch.get_num_threads()} "
          "(medians, interleaved)")  # fmt: skip
    base = statistics.median(variants[0].times)
    for v in variants:
        t = statistics.median(v.times)
        o = v.objective
        print(f"  {v.name:16s} step {t * 1000:8.1f} ms  ×{t / base:5.2f} of {variants[0].name}  "
              f"(rows per sequence {o.copies}, input {o.positions.numel()}, outputs {o.num_outputs})")  # fmt: skip
    single, pair = estimate_variances(variants[0].model.eval(), args, x, mask_id)
    print(f"  per-sequence NELBO variance over {args.draws} draws: one mask {single:.4g}, complementary pair {pair:.4g} "
          f"(×{pair / single:.2f}); per unit compute (2 × pair / one mask) ×{2 * pair / single:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
