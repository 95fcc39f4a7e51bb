"""Context parallelism on CPU: memory per rank and step time, CP = 1 (one process) against CP = 2 (two
processes), for one micro-batch of the doubled sequence at L = 4096 (8192 rows).

    python tools/bench_context_parallel.py --seq-len 4096 --preset tiny --steps 3

Each process runs the trainer's model and objective (through model/context_parallel.py under CP = 2)
for `--steps` forward + backward passes after one warm-up, plus the gradient all-reduce DeepSpeed
would do over the CP group. Per rank it reports:
- the activations kept for backward: the bytes of every tensor autograd saves during the forward
  (each storage once, parameters left out), which context parallelism should about halve; split into
  the output layer's (tensors as wide as the vocabulary: logits, log-softmax), CPU SDPA's dense mask
  (2-D, as wide as all rows; the kernel keeps a float copy per layer) and the layers' own;
- of the layers' own, the keys/values all-gathered at attention (kept whole on every rank; computed,
  not measured);
- peak resident memory (ru_maxrss) of the process, and how much it grew during the timed steps;
- the median step time.
The step-time ratio CP = 2 / CP = 1 is measured in one run on the same machine; CPU collectives go
through gloo over shared memory, so the communication share says little about NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from sad3_megatron.core.diffusion_config import DiffusionConfig
    from sad3_megatron.core.model_config import ModelConfig
    from sad3_megatron.core.registry import build_objective
    from sad3_megatron.engine.distributed import gradient_group, init_distributed
    from sad3_megatron.model import context_parallel
    from sad3_megatron.model.build import build_model
    from sad3_megatron.model.transformer import make_spec

    cp = int(os.environ["WORLD_SIZE"])
    init_distributed(torch.device("cpu"), context_parallel=cp)
    torch.manual_seed(0)
    config = ModelConfig(preset=args.preset, seq_len=args.seq_len, dropout=0.0, attention_backend="sdpa")
    model = build_model(make_spec(config, 30522, 30521, "sdpa"), torch.device("cpu"))
    objective = build_objective(DiffusionConfig(block_size=args.block_size), args.seq_len, 30521)
    denoiser = context_parallel.ContextParallelDenoiser(model) if cp > 1 else model
    x = torch.randint(0, 30521, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = model.spec.model
    rows = objective.positions.numel()
    vocab = model.spec.padded_vocab_size
    # Keys and values of all rows, fp32, every layer: what attention keeps whole on each CP rank.
    kv_bytes = sizes.num_layers * rows * 2 * sizes.hidden_size * 4 if cp > 1 else 0

    def step(measure: bool) -> dict:
        saved: dict[int, tuple[str, int]] = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                width = t.shape[-1] if t.dim() else 0
                kind = "output" if width == vocab else "mask" if t.dim() == 2 and width == rows else "layers"
                saved[storage.data_ptr()] = (kind, storage.nbytes())
            return t

        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if measure:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                terms = objective(denoiser, x, torch.Generator().manual_seed(1))
        else:
            terms = objective(denoiser, x, torch.Generator().manual_seed(1))
        (terms.loss * cp).backward()
        if cp > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad, group=gradient_group())
        parts = {kind: sum(n for k, n in saved.values() if k == kind) for kind in ("output", "mask", "layers")}
        return {"seconds": time.perf_counter() - start, "saved": sum(parts.values()), **parts, "kv": kv_bytes}

    step(measure=False)  # warm-up
    before = _rss_gib()
    measured = step(measure=True)
    times = [step(measure=False)["seconds"] for _ in range(args.steps)]
    report = {
        "rank": dist.get_rank(),
        "saved_gib": measured["saved"] / 2**30,
        **{f"{kind}_gib": measured[kind] / 2**30 for kind in ("output", "mask", "layers")},
        "gathered_kv_gib": measured["kv"] / 2**30,
        "peak_rss_gib": _rss_gib(),
        "rss_growth_gib": _rss_gib() - before,
        "step_s": statistics.median(times),
    }
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(reports))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, args, out: Path) -> list[dict]:
    cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", __file__, "--worker",
           "--out", str(out), "--seq-len", str(args.seq_len), "--block-size", str(args.block_size),
           "--preset", args.preset, "--steps", str(args.steps)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        runs = {cp: launch(cp, args, Path(tmp) / f"cp{cp}.json") for cp in (1, 2)}
    print(f"{args.preset} model, L={args.seq_len} (x_t ⊕ x: {2 * args.seq_len} rows), L'={args.block_size}, micro-batch 1, "
          f"fp32, SDPA, {args.threads} thread(s) per process")  # fmt: skip
    print(f"{'CP':>3} {'rank':>4} {'activations GiB':>16} {'output layer':>13} {'SDPA mask':>10} {'layers':>7} "
          f"{'of which gathered K/V':>22} {'peak RSS GiB':>13} {'RSS growth GiB':>15} {'step s':>8}")  # fmt: skip
    for cp, reports in runs.items():
        for r in reports:
            print(f"{cp:>3} {r['rank']:>4} {r['saved_gib']:>16.3f} {r['output_gib']:>13.3f} {r['mask_gib']:>10.3f} "
                  f"{r['layers_gib']:>7.3f} {r['gathered_kv_gib']:>22.3f} {r['peak_rss_gib']:>13.3f} "
                  f"{r['rss_growth_gib']:>15.3f} {r['step_s']:>8.2f}")  # fmt: skip
    one, two = runs[1][0], max(runs[2], key=lambda r: r["step_s"])
    for key, what in (("saved_gib", "activations"), ("layers_gib", "the layers' activations")):
        print(f"{what} per rank CP=2 / CP=1: {max(r[key] for r in runs[2]) / one[key]:.3f}")
    print(f"step time CP=2 / CP=1: {two['step_s'] / one['step_s']:.3f} (slowest rank; gloo on CPU)")


if __name__ == "__main__":
    main()
