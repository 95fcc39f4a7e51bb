"""Which model fits where: the dry-run memory estimate (engine/plan.py) turned into a table of the largest
micro-batch per GPU for model presets, ZeRO-1 and ZeRO-3, and each activation-checkpointing mode, under
one or more parallel layouts, plus the estimated memory of one sequence per GPU; or, with
--context-parallel, of the longest context L that fits at micro-batch 1 on C GPUs of context parallelism
(one data-parallel replica, ZeRO-3 over the C ranks, the chunked output-layer loss).

    python tools/plan_fit.py --seq-len 1024 --world-size 1 --gpu-memory 80
    python tools/plan_fit.py --config configs/owt.yaml --stage finetune --world-size 8
    python tools/plan_fit.py --seq-len 2048 --presets llama3.2-1b,qwen3-4b --layouts 1:1:1,8:1:1,2:2:1,2:1:2
    python tools/plan_fit.py --context-parallel 1 2 4 8 --presets small,qwen3-1.7b

A layout is WORLD:TP:PP (data parallel = WORLD / (TP · PP)). An estimate, not a measurement: it counts fp32
weights, gradients, Adam moments and EMA (sharded by ZeRO), and 16-bit activations of the doubled sequence
by Korthikanti et al.'s per-layer formula with a fused attention kernel (no s² term; FlexAttention on GPU),
generalised to grouped-query attention and SwiGLU. Allocator fragmentation and communication buffers come
on top.
"""

from __future__ import annotations

import argparse

from sad3_megatron.config import load_config
from sad3_megatron.core.model_config import CUSTOM, PRESETS
from sad3_megatron.data.tokenizers import load_tokenizer
from sad3_megatron.engine.plan import longest_context, make_plan

MODES = ("none", "selective", "full")
LIMIT = 1 << 22  # contexts are searched up to 4M tokens


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




def context_table(args, presets: list[str]) -> None:
    cps = args.context_parallel
    print(
        f"longest L (multiple of 1024) within {args.gpu_memory:g} GiB per GPU, micro-batch 1, on C GPUs of context "
        f"parallelism, ZeRO-3, loss chunks of 4096 tokens ({args.config}, {args.stage})"
    )
    print(f"{'preset':13s} {'checkpointing':>13s}  " + "  ".join(f"{f'C = {c}':>9s}" for c in cps))
    for preset in presets:
        for mode in MODES:
            cells = []
            for cp in cps:
                overrides = [f"model.preset={preset}", f"train.activation_checkpointing={mode}", "train.global_batch_size=0",
                             "parallel.zero_stage=3", "model.loss_chunk_tokens=4096", f"parallel.context_parallel={cp}",
                             "model.seq_len=1024"]  # fmt: skip
                cfg = load_config(args.config, overrides, stage=args.stage)
                vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
                longest = longest_context(cfg, args.gpu_memory, vocab, limit=LIMIT)
                cells.append(f"{'>= 4M' if longest == LIMIT else f'{longest:,d}':>9s}")
            print(f"{preset:13s} {mode:>13s}  " + "  ".join(cells))


def micro_batch_table(args, presets: list[str]) -> None:
    layouts = [tuple(int(x) for x in item.split(":")) for item in (args.layouts or f"{args.world_size}:1:1").split(",")]
    print(f"largest micro-batch per GPU within {args.gpu_memory:g} GiB ({args.config}, {args.stage}"
          f"{f', L = {args.seq_len}' if args.seq_len else ''}); memory: one sequence per GPU, ZeRO-3 (ZeRO-1 under PP), no checkpointing")  # fmt: skip
    print(f"{'preset':13s} {'params':>9s}  {'W:TP:PP':>7s}  {'GiB @ 1':>9s}  " + "  ".join(f"{m:>16s}" for m in MODES))
    for preset in presets:
        for layout in layouts:
            print(row(args, preset, layout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/owt.yaml")
    parser.add_argument("--stage", default="finetune", help="a stage of the config (finetune: the doubled sequence)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=1, help="with the default layout TP = PP = 1")
    parser.add_argument("--layouts", default=None, help="WORLD:TP:PP,... (default: WORLD_SIZE:1:1)")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: all)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--context-parallel", type=int, nargs="+", default=None, metavar="C",
                        help="print the longest context per C instead of the largest micro-batch")  # fmt: skip
    args = parser.parse_args()
    presets = args.presets.split(",") if args.presets else [p for p in PRESETS if p != CUSTOM]
    unknown = [p for p in presets if p not in PRESETS or p == CUSTOM]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}: choose from {', '.join(p for p in PRESETS if p != CUSTOM)}")
    (context_table if args.context_parallel else micro_batch_table)(args, presets)


if __name__ == "__main__":
    main()
