"""The output layer and its loss, full logits against the chunked cross-entropy (model/chunked_loss.py):
time of forward + backward and, on a GPU, peak memory, measured interleaved in one run (medians).

    python tools/bench_output_layer.py --tokens 4096 --hidden 256 --vocab 30522           # CPU
    python tools/bench_output_layer.py --tokens 16384 --hidden 768 --vocab 50304 --bf16  # one GPU: 16 × 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from sad3_megatron.model.chunked_loss import chunked_vocab_parallel_nll


def full_logits_nll(h, weight, labels, blocked):
    logits = (h @ weight.t()).float()
    logits[:, blocked] = float("-inf")
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, generator=g).to(device).requires_grad_(True)
    weight = (0.02 * torch.randn(args.vocab, args.hidden, generator=g)).to(device).requires_grad_(True)
    labels = torch.randint(0, args.vocab - 1, (args.tokens,), generator=g).to(device)
    blocked = torch.tensor([args.vocab - 1], device=device)
    variants = {
        "full logits": lambda: full_logits_nll(h, weight, labels, blocked),
        f"chunked ({args.chunk})": lambda: chunked_vocab_parallel_nll(h, weight, labels, blocked, chunk_tokens=args.chunk),
    }
    times = {name: [] for name in variants}
    peaks = {name: 0 for name in variants}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    for r in range(args.rounds + 1):
        for name, run in variants.items():
            h.grad = weight.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with autocast:
                loss = run().mean()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["full logits"])
    print(f"device={device.type} tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} bf16={args.bf16}")
    for name in variants:
        t = statistics.median(times[name])
        memory = f"  peak {peaks[name] / 2**30:6.2f} GiB" if device.type == "cuda" else ""
        print(f"  {name:16s} {t * 1000:8.1f} ms  ×{t / base:5.2f}{memory}")


if __name__ == "__main__":
    main()
