"""A random transformers checkpoint of a preset's shape (llama3.2-1b, qwen3-0.6b, ...), built and saved by
transformers itself, with a word-level tokenizer that has exactly as many tokens as the base's table:
something to import, measure and export without downloading a model.

    python tools/random_hf_checkpoint.py llama3.2-1b /tmp/llama-1b --dtype bf16
    /usr/bin/time -v sad3 import /tmp/llama-1b /tmp/llama-1b-sad3     # peak RSS and time of the import

The weights are transformers' own initialisation; the tokenizer's words are w0, w1, ... after <unk> <s> </s>.
"""

from __future__ import annotations

import argparse
import time

import torch

from sad3_megatron.core.model_config import PRESETS, ModelConfig
from sad3_megatron.hf.families import family_fields, family_for


def word_tokenizer(n: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=[p for p, v in PRESETS.items() if v.get("hf_family")])
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--tokens", type=int, default=None, help="tokenizer size (default: the table's rows)")
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    m = ModelConfig(preset=args.preset).resolved()
    start = time.perf_counter()
    config = AutoConfig.for_model(**family_fields(m, family_for(m), m.vocab_rows), bos_token_id=1, eos_token_id=2)
    torch.set_default_dtype({"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(args.out_dir)
    word_tokenizer(args.tokens or m.vocab_rows).save_pretrained(args.out_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params / 1e9:.2f}B parameters, {args.dtype}, written to {args.out_dir} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
