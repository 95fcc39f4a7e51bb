"""Requests per second of `sad3 lm-eval`'s loglikelihood at several batch sizes, in one run: the
offline cloze task's requests (context, " " + choice), scored by the harness model `Sad3LM` as the
harness calls it (model loaded once, its default draws, is_greedy included). Every round times each
batch size on the same requests, interleaved, after one warm-up batch each; the medians are reported.

    .venv/bin/python tools/bench_harness.py runs/demo --batches 1,32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from sad3_megatron.evaluation.harness import Sad3LM

CLOZE = Path(__file__).resolve().parent.parent / "configs" / "lm_eval" / "sad3_austen_cloze.jsonl"


def requests(docs: int) -> list[Instance]:
    """The cloze task's loglikelihood requests for its first `docs` documents (four choices each)."""
    rows = [json.loads(line) for line in CLOZE.read_text().splitlines()[:docs]]
    return [
        Instance("loglikelihood", row, (row["context"], " " + choice), i, ("sad3_austen_cloze", d, 1))
        for d, row in enumerate(rows)
        for i, choice in enumerate(row["choices"])
    ]


def rate(lm: Sad3LM, batch: int, work: list[Instance]) -> float:
    """Requests per second of one harness call over `work` in batches of `batch` requests."""
    lm.batch_size = batch
    start = time.perf_counter()
    lm.loglikelihood(work, disable_tqdm=True)
    return len(work) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run, a checkpoint or a `sad3 export` directory")
    parser.add_argument("--batches", default="1,32", help="batch sizes (requests), comma-separated")
    parser.add_argument("--docs", type=int, default=100, help="cloze documents, 4 requests each (default: all 100)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each over every batch size")
    parser.add_argument("--draws", type=int, default=None, help="draws per request (default: the harness model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batches.split(",")]
    extra = {} if args.draws is None else {"draws": args.draws}
    lm = Sad3LM(pretrained=args.model, truncation="left", **extra)
    work = requests(args.docs)
    for batch in sizes:  # warm-up: kernels, allocator
        rate(lm, batch, work[:batch])
    rounds = {batch: [] for batch in sizes}
    for r in range(args.rounds):
        for batch in sizes:
            rounds[batch].append(rate(lm, batch, work))
        print(f"round {r + 1}: " + ", ".join(f"batch {b} {v[-1]:.2f} requests/s" for b, v in rounds.items()))
    rates = {batch: statistics.median(values) for batch, values in rounds.items()}
    for batch, value in rates.items():
        print(f"batch {batch:3d}: {len(work)} requests, median {value:.2f} requests/s")
    first = sizes[0]
    ratios = ", ".join(f"batch {b} / batch {first}: {v / rates[first]:.2f}x" for b, v in rates.items() if b != first)
    print(f"{lm.describe()}; threads {torch.get_num_threads()}; {ratios}")


if __name__ == "__main__":
    main()
