"""What a resume carries across layouts, and what it refuses (docs/checkpoints.md).

Data position. The rows of a step are a run of consecutive entries of the epoch-wise permutation of
the training rows (data/sampler.py): the global batch of step s starts at entry s × G (G = global
batch), and micro-batch slot k (micro-batch × DP size + DP rank) takes entries k × micro-batch
onwards. That depends on the global batch, not on how it is split over data-parallel ranks and
accumulation steps, and neither does the noise (step_seed(seed, step, slot)). A checkpoint records
the entry the next step starts at (`data.rows`, rows drawn so far, skipped steps included) and G.
A run resumed with another global batch G' starts step s at that same entry and goes on
G' rows per step: entry(s') = rows + (s' - s) × G', i.e. a row offset of rows - s × G'.
"""

from __future__ import annotations

from dataclasses import asdict

from sad3_megatron.config import Config
from sad3_megatron.core.errors import Sad3Error


def data_state(step: int, global_batch: int, row_offset: int) -> dict:
    """The data position saved with a checkpoint at `step` (steps done)."""
    return {"rows": step * global_batch + row_offset, "global_batch": global_batch}


def row_offset(saved: dict | None, step: int, global_batch: int, seq_len: int, announce: bool) -> int:
    """The offset that makes step `step` start at the saved data position under `global_batch`;
    a change of global batch is said in one line (rank 0)."""
    if not saved:
        return 0  # older checkpoints: written with the global batch they resume with
    rows, before = int(saved["rows"]), int(saved["global_batch"])
    if before != global_batch and announce:
        print(
            f"sad3 train: the global batch changes from {before} to {global_batch} sequences at step {step}: the data "
            f"goes on from sequence {rows:,} of the training order (token {rows * seq_len:,}), {global_batch} per step "
            f"(set train.global_batch_size={before} to keep it)",
            flush=True,
        )
    return rows - step * global_batch


def layout(cfg: Config, dp: int, global_batch: int) -> dict:
    """How a run is split, as recorded in a checkpoint (for `sad3 checkpoint info`)."""
    p, t = cfg.parallel, cfg.train
    return {
        "world_size": dp * p.tensor_parallel * p.pipeline_parallel * p.context_parallel,
        "data_parallel": dp,
        "tensor_parallel": p.tensor_parallel,
        "pipeline_parallel": p.pipeline_parallel,
        "sequence_parallel": p.sequence_parallel,
        "context_parallel": p.context_parallel,
        "zero_stage": p.zero_stage,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "global_batch": global_batch,
    }


# Fields of the `model:` section that a run may change on resume: they shape no weight.
RUNTIME_MODEL_FIELDS = ("preset", "dropout", "attention_backend", "loss_chunk_tokens")


def model_identity(cfg: Config) -> dict:
    """What a resume cannot change: the network's shape (every other `model:` field, presets resolved)
    and the token ids it was trained on."""
    shape = {k: v for k, v in asdict(cfg.model.resolved()).items() if k not in RUNTIME_MODEL_FIELDS}
    return {**{f"model.{k}": v for k, v in shape.items()}, "data.tokenizer": cfg.data.tokenizer}


def check_same_model(saved: Config, cfg: Config, checkpoint) -> None:
    """A one-line error naming the first setting the checkpoint and this run disagree on (shape,
    tokenizer, then L')."""
    theirs, ours = model_identity(saved), model_identity(cfg)
    for key, value in theirs.items():
        if ours[key] != value:
            raise Sad3Error(
                f"checkpoint {str(checkpoint)!r} was trained with {key}={value}, this run has {key}={ours[key]}: "
                f"a resume keeps the model's shape and tokenizer; set {key}={value} or use another run.out_dir"
            )
    if saved.diffusion.block_size != cfg.diffusion.block_size:  # the schedule and its search belong to the saved L'
        raise Sad3Error(
            f"checkpoint {str(checkpoint)!r} trained L'={saved.diffusion.block_size}, this run has "
            f"diffusion.block_size={cfg.diffusion.block_size}: a new L' is a new stage (train.init_from and a new "
            "run.out_dir; launchers/adapt.sh), not a resume"
        )
