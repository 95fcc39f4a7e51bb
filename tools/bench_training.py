"""Training-step time, tokens/s and MFU of several variants, measured in one run.

A variant is objective:backend:precision:
- objective is bd3 (the vectorized x_t ⊕ x pass at L' = --block-size), naive (Alg. 1's per-block
  loop), twopass (Alg. 1 as two passes: the clean sequence for K/V, then every noisy block at once
  against them; Sec. 6.4 compares it with the vectorized pass), mdlm (L' = L), ar (the AR baseline)
  or ar-random (AR + random batch size, Table 1: the loss on a random ~half of the tokens);
- backend is sdpa, flex or flash;
- precision is fp32, bf16 (autocast) or fp8 (bf16 autocast plus model/fp8.py's GEMMs);
- an optional fourth field joins options with "+": compile (each layer through torch.compile),
  ckpt-selective / ckpt-full (activation checkpointing), chunk (the chunked output-layer loss,
  4096 tokens per chunk), e.g. bd3:flex:bf16:compile+chunk.
A step is the whole training step: forward, backward and an AdamW update.

The variants are timed interleaved, round after round, and compared by their medians, so load on a
noisy machine hits all of them alike. Ratios are printed against the first variant; absolute times
are for orientation. MFU counts model FLOPs (engine/flops.py) against the device's dense bf16 peak.

    python tools/bench_training.py --preset tiny --seq-len 128 --batch-size 8 --rounds 5
    python tools/bench_training.py --preset small --seq-len 1024 --batch-size 16 --rounds 10 \\
        --variants bd3:flex:bf16,mdlm:flex:bf16,bd3:sdpa:bf16,bd3:flex:fp8        # one Hopper GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.masks import AttentionMask, block_diffusion_visible
from sad3_megatron.core.model_config import ModelConfig
from sad3_megatron.core.objectives import BlockDiffusionObjective, loss_terms, token_weights
from sad3_megatron.core.registry import build_objective
from sad3_megatron.engine.distributed import init_distributed
from sad3_megatron.engine.flops import peak_tflops, training_flops_per_sequence
from sad3_megatron.model.activation_checkpointing import apply_activation_checkpointing
from sad3_megatron.model.build import build_model
from sad3_megatron.model.compile import compile_layers
from sad3_megatron.model.fp8 import enable_fp8, require_fp8
from sad3_megatron.model.transformer import make_spec

DEFAULT_VARIANTS = "bd3:sdpa:fp32,naive:sdpa:fp32,mdlm:sdpa:fp32"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class CleanFirstMask:
    """Noisy queries x_t over keys [clean x ; x_t]: Mask(L, L')'s first L rows with its two key
    halves swapped, the layout of Alg. 1's second pass, where the clean K/V come in as `past_kv`."""

    seq_len: int
    block_size: int

    q_len = property(lambda self: self.seq_len)
    kv_len = property(lambda self: 2 * self.seq_len)
    is_causal = False

    def first_rows(self, n: int) -> CleanFirstMask:
        assert n == self.seq_len  # the noisy pass keeps every row
        return self

    def _visible(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        swapped = (kv_idx + self.seq_len) % (2 * self.seq_len)
        return block_diffusion_visible(q_idx, swapped, self.seq_len, self.block_size)

    def mask_mod(self):
        return lambda b, h, q_idx, kv_idx: self._visible(q_idx, kv_idx)

    def dense(self, device="cpu") -> torch.Tensor:
        q = torch.arange(self.seq_len, device=device)[:, None]
        return self._visible(q, torch.arange(2 * self.seq_len, device=device)[None, :])


def two_pass_loss(model, objective: BlockDiffusionObjective, x: torch.Tensor, generator) -> torch.Tensor:
    """Alg. 1 as written: (∅, K, V) ← x_θ(x), then x_θ^b(x_t^b, K^{<b}, V^{<b}) for all blocks in one call."""
    L, block = objective.seq_len, objective.block_size
    positions = torch.arange(L, device=x.device)
    noised = objective.noise(x, generator)
    clean = model(x, positions, AttentionMask.block_causal(L, block), num_outputs=1, return_kv=True)
    out = model(noised.x_t, positions, CleanFirstMask(L, block), past_kv=clean.kv, labels=x)
    return loss_terms(out.token_nll, token_weights(noised), x.shape[0] * objective.scored_per_row).loss


class Variant:
    def __init__(self, name: str, args, device: torch.device, vocab: int, mask_id: int):
        self.name = name
        objective, backend, self.precision, *extra = name.split(":")
        options = set(extra[0].split("+")) if extra else set()
        self.kind, self.naive = objective, objective == "naive"
        self.block_size = args.seq_len if objective == "mdlm" else args.block_size
        kind = "ar" if objective.startswith("ar") else "sad3"
        diffusion = DiffusionConfig(objective=kind, block_size=self.block_size, ar_random_tokens=objective == "ar-random")
        self.objective = build_objective(diffusion, args.seq_len, mask_id)
        torch.manual_seed(0)  # every variant starts from the same weights
        chunk = 4096 if "chunk" in options else 0
        spec = make_spec(ModelConfig(preset=args.preset, dropout=0.0, loss_chunk_tokens=chunk), vocab, mask_id, backend)
        self.model = build_model(spec, device)
        if self.precision == "fp8":
            require_fp8(device)
            enable_fp8(self.model)
        for mode in ("selective", "full"):
            if f"ckpt-{mode}" in options:
                apply_activation_checkpointing(self.model, mode)
        if "compile" in options:
            compile_layers(self.model)
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **fused)
        self.flops = args.batch_size * training_flops_per_sequence(spec.model, spec.padded_vocab_size, self.objective)
        self.device, self.times, self.losses, self.peak_gib = device, [], [], None

    def step(self, x: torch.Tensor, seed: int) -> None:
        amp = self.precision in ("bf16", "fp8")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if amp else nullcontext()
        generator = torch.Generator().manual_seed(seed)
        synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:
            if self.kind == "twopass":
                loss = two_pass_loss(self.model, self.objective, x, generator)
            elif self.kind.startswith("ar"):
                loss = self.objective(self.model, x, generator).loss
            else:
                loss = self.objective(self.model, x, generator, naive=self.naive).loss
        loss.backward()
        self.optimizer.step()
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        self.losses.append(loss.item())
        if self.device.type == "cuda":
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=30522, help="bert-base-uncased by default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation)")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated objective:backend:precision[:options]")
    parser.add_argument("--markdown", default=None, help="append one table row per variant to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device)
    mask_id = args.vocab_size - 1
    variants = [Variant(name, args, device, args.vocab_size, mask_id) for name in args.variants.split(",")]
    x = torch.randint(0, mask_id, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    for i in range(args.warmup):
        for v in variants:
            v.step(x, seed=i)
    for v in variants:
        v.times.clear()
    for r in range(args.rounds):
        for v in variants:
            v.step(x, seed=1000 + r)  # the same noise draws for every variant in a round

    peak = peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={name} torch={torch.__version__} preset={args.preset} params="
        f"{sum(p.numel() for p in variants[0].model.parameters()) / 1e6:.1f}M L={args.seq_len} "
        f"batch={args.batch_size} vocab={args.vocab_size} rounds={args.rounds} (medians)"
    )
    base = statistics.median(variants[0].times)
    rows = []
    for v in variants:
        t = statistics.median(v.times)
        tokens_per_s = args.batch_size * args.seq_len / t
        mfu = f"{100 * v.flops / t / (peak * 1e12):5.1f}%" if peak else "  n/a"
        memory = f"{v.peak_gib:.1f} GiB" if v.peak_gib is not None else "n/a"
        rows.append(f"| {args.preset} L={args.seq_len} b={args.batch_size} | {v.name} | {t * 1000:.1f} ms | "
                    f"{tokens_per_s:,.0f} | {mfu.strip()} | ×{t / base:.2f} | {memory} |")  # fmt: skip
        print(
            f"  {v.name:18s} L'={v.block_size:<5d} step {t * 1000:8.1f} ms  {tokens_per_s:10,.0f} tok/s  "
            f"MFU {mfu}  ×{t / base:5.2f} of {variants[0].name}  last loss {v.losses[-1]:.3f}  "
            f"loss std over rounds {statistics.stdev(v.losses[-args.rounds :]) if args.rounds > 1 else float('nan'):.4f}"
        )
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("".join(row + "\n" for row in rows))


if __name__ == "__main__":
    main()
