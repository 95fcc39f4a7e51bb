"""Training-step time of the llama-style block against the paper's DiT-style block at equal parameter
count, measured in one run.

The DiT block (Suppl. F): LayerNorm, GELU MLP of 4h with biases, multi-head attention. The llama-style
block: RMSNorm, SwiGLU without biases, grouped-query attention (--kv-heads), its MLP width chosen so
that a layer has the DiT layer's parameter count (engine/plan.py `layer_parameters`); both untied,
the same vocabulary and context. A step is the block-diffusion training step (x_t ⊕ x, L' =
--block-size): forward, backward and an AdamW update of the trainer's model at TP = 1. The two are
timed interleaved, round after round, and compared by their medians.

    python tools/bench_architectures.py --hidden 256 --layers 4 --heads 8 --kv-heads 2 --seq-len 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.model_config import ModelConfig
from sad3_megatron.core.registry import build_objective
from sad3_megatron.engine.distributed import init_distributed
from sad3_megatron.engine.plan import layer_parameters
from sad3_megatron.model.build import build_model
from sad3_megatron.model.transformer import make_spec


def configs(args) -> dict[str, ModelConfig]:
    common = dict(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads, dropout=0.0,
                  attention_backend="sdpa", seq_len=args.seq_len)  # fmt: skip
    dit = ModelConfig(**common, ffn_hidden_size=4 * args.hidden)
    target = layer_parameters(dit.resolved())

    def llama(ffn: int) -> ModelConfig:
        return ModelConfig(**common, ffn_hidden_size=ffn, norm="rmsnorm", mlp="swiglu", mlp_bias=False,
                           num_kv_heads=args.kv_heads)  # fmt: skip

    ffn = min(range(8, 8 * args.hidden, 8), key=lambda f: abs(layer_parameters(llama(f).resolved()) - target))
    return {"dit": dit, "llama-style": llama(ffn)}


class Candidate:
    def __init__(self, name: str, model: ModelConfig, args, device: torch.device):
        self.name, self.config = name, model.resolved()
        torch.manual_seed(0)
        self.model = build_model(make_spec(model, args.vocab_size, args.vocab_size - 1, "sdpa"), device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.objective = build_objective(DiffusionConfig(block_size=args.block_size), args.seq_len, args.vocab_size - 1)
        self.times: list[float] = []

    def step(self, x: torch.Tensor, seed: int) -> None:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective(self.model, x, torch.Generator().manual_seed(seed)).loss.backward()
        self.optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2, help="the llama-style block's key/value heads")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device)
    candidates = [Candidate(name, model, args, device) for name, model in configs(args).items()]
    x = torch.randint(0, args.vocab_size - 1, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    for r in range(args.warmup + args.rounds):
        for c in candidates:
            c.step(x, seed=r)
    for c in candidates:
        del c.times[: args.warmup]
    print(f"device={device.type} torch={torch.__version__} L={args.seq_len} L'={args.block_size} batch={args.batch_size} "
          f"vocab={args.vocab_size} rounds={args.rounds} (medians, interleaved)")  # fmt: skip
    base = statistics.median(candidates[0].times)
    for c in candidates:
        m, t = c.config, statistics.median(c.times)
        print(f"  {c.name:12s} {sum(p.numel() for p in c.model.parameters()) / 1e6:6.2f}M params "
              f"({layer_parameters(m):,} per layer: {m.norm}, {m.mlp} {m.ffn_hidden_size}, heads {m.num_heads}/{m.num_kv_heads}) "
              f"step {t * 1000:8.1f} ms  ×{t / base:.3f} of {candidates[0].name}")  # fmt: skip


if __name__ == "__main__":
    main()
