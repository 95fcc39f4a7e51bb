"""Sampling speed (Alg. 2) measured in one run: the KV cache against recomputing the context, batched
throughput, and confident (parallel) decoding against the AR baseline's token-by-token loop on the
same network and cache. Random weights: these are speed figures (the model calls made are those of a
trained model with the same settings, except that confident decoding commits as many tokens per call
as the model is confident about, which random weights are not; `--threshold` low emulates it).

    python tools/bench_sampling.py --preset tiny --seq-len 128 --num-tokens 256 --batches 1,4    # CPU
    python tools/bench_sampling.py --preset small --seq-len 1024 --num-tokens 1024 --batches 1,16,64   # GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from sad3_megatron.core.generate import SamplingConfig, generate
from sad3_megatron.core.model_config import ModelConfig
from sad3_megatron.engine.distributed import init_distributed
from sad3_megatron.model.build import build_model
from sad3_megatron.model.transformer import make_spec


def timed(model, args, **settings) -> tuple[float, float]:
    """(tokens/s over the batch, mean NFEs per sample) of one generate() call."""
    config = SamplingConfig(
        **{"num_tokens": args.num_tokens, "block_size": args.block_size, "steps": args.steps, "seed": 0,
           "stop_at_eos": False, "min_entropy": 0.0, **settings}
    )  # fmt: skip
    if model.embedding.embed.weight.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = generate(
        model, config, seq_len=args.seq_len, mask_id=args.vocab_size - 1, eos_id=None, prompt=[0],
        objective="ar" if settings.get("block_size") == 1 else "sad3",
    )  # fmt: skip
    if model.embedding.embed.weight.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(s.length for s in result.samples)
    return tokens / seconds, sum(s.nfe for s in result.samples) / len(result.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="T per block")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--batches", default="1,4", help="batch sizes for the throughput rows")
    parser.add_argument("--threshold", type=float, default=0.0, help="confident decoding threshold")
    parser.add_argument("--markdown", default=None, help="append the table rows to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = make_spec(ModelConfig(preset=args.preset, dropout=0.0), args.vocab_size, args.vocab_size - 1, "sdpa")
    model = build_model(spec, device).to(dtype).eval()
    timed(model, args, num_tokens=args.block_size)  # warm-up
    rows = []
    cached, nfe = timed(model, args)
    recomputed, _ = timed(model, args, kv_cache=False)
    rows.append(("KV cache vs recompute, batch 1", f"{cached:,.0f} vs {recomputed:,.0f} tok/s", f"×{cached / recomputed:.2f}"))
    for batch in (int(b) for b in args.batches.split(",")):
        speed, _ = timed(model, args, batch_size=batch)
        rows.append((f"ancestral T={args.steps}, batch {batch}", f"{speed:,.0f} tok/s", f"{nfe:.0f} NFEs/sample"))
    confident, confident_nfe = timed(model, args, sampler="confident", threshold=args.threshold or 1e-9)
    ar, ar_nfe = timed(model, args, block_size=1)
    rows.append(("confident vs AR, batch 1", f"{confident:,.0f} vs {ar:,.0f} tok/s", f"×{confident / ar:.2f} ({confident_nfe:.0f} vs {ar_nfe:.0f} NFEs)"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} preset={args.preset} L={args.seq_len} L'={args.block_size} tokens={args.num_tokens} dtype={dtype}")
    for row in rows:
        print("  " + " | ".join(row))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("".join(f"| sampling {args.preset} | {a} | {b} | {c} |\n" for a, b, c in rows))


if __name__ == "__main__":
    main()
