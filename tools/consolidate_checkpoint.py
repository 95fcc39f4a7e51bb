"""Write one fp32 state dict (safetensors, TP = 1 layout) for any sad3 checkpoint.

Every checkpoint already carries consolidated `model.safetensors` / `ema.safetensors`, gathered over
tensor-parallel shards and ZeRO-3 partitions at save time; this tool extracts them. With
`--from-deepspeed` it rebuilds the weights from DeepSpeed's own ZeRO shards instead (TP = 1 runs of
earlier sad3 versions, which wrote them; checkpoints are layout-free safetensors now).

    python tools/consolidate_checkpoint.py runs/demo out.safetensors [--ema | --from-deepspeed]
"""

from __future__ import annotations

import argparse
import sys

from safetensors.torch import save_file

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.engine.checkpoint import read_checkpoint, resolve_checkpoint


def from_deepspeed(checkpoint) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not list(checkpoint.glob("*.pt")):
        raise Sad3Error(
            f"{str(checkpoint)!r} holds no DeepSpeed shards (a layout-free checkpoint): drop --from-deepspeed"
        )
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return {k: v.float().contiguous() for k, v in state.items() if not k.endswith("_extra_state")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory or a checkpoints/step_* directory")
    parser.add_argument("output", help="the .safetensors file to write")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ema", action="store_true", help="the EMA weights instead of the raw ones")
    source.add_argument("--from-deepspeed", action="store_true", help="rebuild from DeepSpeed's ZeRO shards")
    args = parser.parse_args(argv)
    try:
        if args.from_deepspeed:
            path = resolve_checkpoint(args.checkpoint)
            weights = from_deepspeed(path)
        else:
            _, weights, path = read_checkpoint(args.checkpoint, use_ema=args.ema)
    except Sad3Error as err:
        print(f"consolidate: error: {err}", file=sys.stderr)
        return 2
    save_file(weights, args.output)
    print(
        f"consolidate: {len(weights)} tensors, {sum(v.numel() for v in weights.values()):,} values from {path} -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
