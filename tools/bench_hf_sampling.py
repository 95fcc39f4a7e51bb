"""Sampling speed of an exported model against `sad3 sample`'s model of the same checkpoint, in one run.

Both run the same Alg. 2 (`core/generate.py`) with the same settings and seeds; rounds alternate
between the two so machine load affects both alike. Prints tokens/s (medians) and their ratio, and
checks that the two produced the same tokens.

    python tools/bench_hf_sampling.py runs/demo runs/demo/hf --num-tokens 256 --steps 16 --rounds 3
"""

import argparse
import statistics

import torch

from sad3_megatron.core.generate import SamplingConfig, generate
from sad3_megatron.engine.build import load_components
from sad3_megatron.hf.modeling_sad3 import Sad3ForMaskedLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("export")
    parser.add_argument("--num-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    parts, _ = load_components(args.checkpoint, backend="sdpa")
    hf = Sad3ForMaskedLM.from_pretrained(args.export).eval()
    settings = {"num_tokens": args.num_tokens, "steps": args.steps, "batch_size": args.batch_size,
                "stop_at_eos": False, "min_entropy": 0.0}  # fmt: skip
    tok = parts.tokenizer
    speed = {"sad3 sample model": [], "exported model": []}
    for r in range(args.rounds):
        config = SamplingConfig(block_size=parts.cfg.diffusion.block_size, seed=r, **settings)
        ref = generate(parts.model, config, seq_len=parts.cfg.model.seq_len, mask_id=tok.mask_id, eos_id=tok.eos_id,
                       prompt=[tok.bos_id])  # fmt: skip
        out = hf.generate_blocks([tok.bos_id], seed=r, **settings)
        assert [s.tokens for s in ref.samples] == [s.tokens for s in out.samples], "the two models sampled differently"
        speed["sad3 sample model"].append(ref.tokens_per_s)
        speed["exported model"].append(out.tokens_per_s)
    medians = {k: statistics.median(v) for k, v in speed.items()}
    for name, value in medians.items():
        print(f"{name}: {value:.1f} tokens/s (median of {args.rounds}; threads {torch.get_num_threads()})")
    print(f"exported / sad3 sample: {medians['exported model'] / medians['sad3 sample model']:.3f}")


if __name__ == "__main__":
    main()
