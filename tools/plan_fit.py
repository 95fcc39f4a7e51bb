"""Which model fits where: the dry-run memory estimate (engine/plan.py) turned into a table of the largest
micro-batch per GPU for model presets, ZeRO-1 and ZeRO-3, and each activation-checkpointing mode, under
one or more parallel layouts, plus the estimated memory of one sequence per GPU.

    python tools/plan_fit.py --seq-len 1024 --world-size 1 --gpu-memory 80
    python tools/plan_fit.py --config configs/owt.yaml --stage finetune --world-size 8
    python tools/plan_fit.py --seq-len 2048 --presets llama3.2-1b,qwen3-4b --layouts 1:1:1,8:1:1,2:2:1,2:1:2

A layout is WORLD:TP:PP (data parallel = WORLD / (TP · PP)). An estimate, not a measurement: it counts fp32
weights, gradients, Adam moments and EMA (sharded by ZeRO), and 16-bit activations of the doubled sequence
by Korthikanti et al.'s per-layer formula with a fused attention kernel (no s² term), generalised to
grouped-query attention and SwiGLU. Allocator fragmentation and communication buffers come on top.
"""

from __future__ import annotations

import argparse

from sad3_megatron.config import load_config
from sad3_megatron.core.model_config import CUSTOM, PRESETS
from sad3_megatron.data.tokenizers import load_tokenizer
from sad3_megatron.engine.plan import make_plan

MODES = ("none", "selective", "full")


def row(args, preset: str, layout: tuple[int, int, int]) -> str:
    world, tp, pp = layout
    cells, params, memory = [], 0, 0.0
    for mode in MODES:
        overrides = [f"model.preset={preset}", f"train.activation_checkpointing={mode}", "train.global_batch_size=0",
                     "train.micro_batch_size=1", f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
                     f"parallel.zero_stage={1 if pp > 1 else 3}", "diffusion.schedule_search=off"]  # fmt: skip
        if args.seq_len:
            overrides.append(f"model.seq_len={args.seq_len}")
        cfg = load_config(args.config, overrides, stage=args.stage)
        plan = make_plan(cfg, world, load_tokenizer(cfg.data.tokenizer).vocab_size, args.gpu_memory)
        params = plan.parameters
        memory = plan.memory_gib["total"] if mode == "none" else memory
        z3 = f"{plan.fits[3]:>4d}" if pp == 1 else "   -"  # DeepSpeed's pipeline engine: ZeRO-1 at most
        cells.append(f"Z1 {plan.fits[1]:>4d} / Z3 {z3}")
    name = f"{world}:{tp}:{pp}"
    return f"{preset:13s} {params / 1e6:8.0f}M  {name:>7s}  {memory:9.1f}  " + "  ".join(f"{c:>16s}" for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/owt.yaml")
    parser.add_argument("--stage", default="finetune", help="a stage of the config (finetune: the doubled sequence)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=1, help="with the default layout TP = PP = 1")
    parser.add_argument("--layouts", default=None, help="WORLD:TP:PP,... (default: WORLD_SIZE:1:1)")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: all)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    args = parser.parse_args()
    layouts = [tuple(int(x) for x in item.split(":")) for item in (args.layouts or f"{args.world_size}:1:1").split(",")]
    presets = args.presets.split(",") if args.presets else [p for p in PRESETS if p != CUSTOM]
    print(f"largest micro-batch per GPU within {args.gpu_memory:g} GiB ({args.config}, {args.stage}"
          f"{f', L = {args.seq_len}' if args.seq_len else ''}); memory: one sequence per GPU, ZeRO-3 (ZeRO-1 under PP), no checkpointing")  # fmt: skip
    print(f"{'preset':13s} {'params':>9s}  {'W:TP:PP':>7s}  {'GiB @ 1':>9s}  " + "  ".join(f"{m:>16s}" for m in MODES))
    for preset in presets:
        for layout in layouts:
            print(row(args, preset, layout))


if __name__ == "__main__":
    main()
