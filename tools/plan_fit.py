"""Which model fits where: the dry-run memory estimate (engine/plan.py) turned into a table of the largest
micro-batch per GPU for every model preset, ZeRO-1 and ZeRO-3, and each activation-checkpointing mode.

    python tools/plan_fit.py --seq-len 1024 --world-size 1 --gpu-memory 80
    python tools/plan_fit.py --config configs/owt.yaml --stage finetune --world-size 8

An estimate, not a measurement: it counts fp32 weights, gradients, Adam moments and EMA (sharded by ZeRO),
and 16-bit activations of the doubled sequence by Korthikanti et al.'s per-layer formula with a fused
attention kernel (no s² term). Allocator fragmentation and communication buffers come on top.
"""

from __future__ import annotations

import argparse

from sad3_megatron.config import load_config
from sad3_megatron.core.model_config import PRESETS
from sad3_megatron.data.tokenizers import load_tokenizer
from sad3_megatron.engine.plan import make_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/owt.yaml")
    parser.add_argument("--stage", default="finetune", help="a stage of the config (finetune: the doubled sequence)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    args = parser.parse_args()
    print(f"largest micro-batch per GPU within {args.gpu_memory:g} GiB, world size {args.world_size} ({args.config}, {args.stage})")
    print(f"{'preset':8s} {'params':>9s}  " + "  ".join(f"{m:>16s}" for m in ("none", "selective", "full")))
    for preset in PRESETS:
        cells, params = [], 0
        for mode in ("none", "selective", "full"):
            overrides = [f"model.preset={preset}", f"train.activation_checkpointing={mode}", "train.global_batch_size=0"]
            if args.seq_len:
                overrides.append(f"model.seq_len={args.seq_len}")
            cfg = load_config(args.config, overrides, stage=args.stage)
            plan = make_plan(cfg, args.world_size, load_tokenizer(cfg.data.tokenizer).vocab_size, args.gpu_memory)
            params = plan.parameters
            cells.append(f"Z1 {plan.fits[1]:>4d} / Z3 {plan.fits[3]:>4d}")
        print(f"{preset:8s} {params / 1e6:8.0f}M  " + "  ".join(f"{c:>16s}" for c in cells))


if __name__ == "__main__":
    main()
