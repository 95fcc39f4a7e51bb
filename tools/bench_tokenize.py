"""Tokenization throughput of shard preparation (`sad3 data prepare`) on the bundled Austen corpus,
for both bundled tokenizers and 1 or 2 worker processes, and the shard size per million tokens.
Each setting is prepared `--repeats` times into a fresh directory; the fastest run is reported.

    python tools/bench_tokenize.py --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time

from sad3_megatron.data.preparation import prepare
from sad3_megatron.data.recipes import load_recipe
from sad3_megatron.data.tokenizers import load_tokenizer


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the preparation workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe", default="configs/data/austen.yaml")
    args = parser.parse_args()
    for name in ("bert-base-uncased", "gpt2"):
        tokenizer = load_tokenizer(name)
        for workers in (1, 2):
            best = None
            for _ in range(args.repeats):
                out = tempfile.mkdtemp()
                recipe = load_recipe(args.recipe, [f"tokenizer={name}", f"output_dir={out}"])
                wall0, cpu0 = time.perf_counter(), cpu_seconds()
                manifest = prepare(recipe, tokenizer, workers=workers).manifest
                wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
                shards = [s for split in manifest["splits"].values() for s in split["shards"]]
                size = sum(s["bin_bytes"] + s["idx_bytes"] for s in shards)
                shutil.rmtree(out)
                if best is None or wall < best[0]:
                    best = (wall, cpu, manifest["tokens"], size)
            wall, cpu, tokens, size = best
            print(
                f"{name:18s} workers={workers}: {tokens:,} tokens in {wall:.2f} s = {tokens / wall / 1e3:,.0f}K tokens/s "
                f"({tokens / cpu / 1e3:,.0f}K per CPU-second); shards {size / tokens:.2f} MB per million tokens"
            )


if __name__ == "__main__":
    main()
