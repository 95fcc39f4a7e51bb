"""`sad3 eval`: the likelihood bound of a checkpoint (or an export) on its held-out split, text files
or a zero-shot set, as the paper reports it (Sec. 6: the NELBO under the linear schedule, t ~ U[0, 1]).

The estimate is `core/likelihood.estimate_bound` with the run's own objective (core/registry.py); this
module picks the rows, the estimator (t integrated out by default, the paper's Monte-Carlo protocol
with `t_floor`, or D3PM's T-step bound) and words the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from sad3_megatron.config import adaptation_switches
from sad3_megatron.core.d3pm import DiscreteTimeObjective
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.field_help import described
from sad3_megatron.core.likelihood import estimate_bound
from sad3_megatron.core.registry import build_objective
from sad3_megatron.core.schedules import NoiseSchedule, evaluation_schedule
from sad3_megatron.data.zero_shot import ZERO_SHOT


@dataclass
class EvalSource:
    """Which rows to score: exactly one of these (the CLI makes them mutually exclusive)."""

    data: list[str] | None = None  # text files or globs
    split: str | None = None  # "val": the checkpoint's own held-out split
    zero_shot: str | None = None  # a zero-shot set name (data/zero_shot.py)
    zero_shot_path: str | None = None  # its local copy (no hub access)

    def check(self) -> None:
        if self.zero_shot_path and not self.zero_shot:
            raise Sad3Error("--zero-shot-path needs --zero-shot NAME to say which set the local copy holds")
        if self.zero_shot and self.zero_shot not in ZERO_SHOT:
            raise Sad3Error(f"unknown zero-shot set {self.zero_shot!r}: choose one of {', '.join(ZERO_SHOT)}")


@dataclass
class EvalSettings:
    """The estimator of `sad3 eval` (its flags are these fields)."""

    block_size: int | None = field(default=None, metadata=described("L' to evaluate with (default: the checkpoint's)"))
    draws: int = field(default=8, metadata=described("Monte-Carlo draws of the noise per sequence"))
    t_floor: float | None = field(default=None, metadata=described(
        "the paper's estimator: Bernoulli masks with t ~ U[T_FLOOR, 1] (MDLM: 1e-3); default: t integrated out"))  # fmt: skip
    discrete_steps: int = field(default=0, metadata=described("score with the T-step D3PM NELBO (Eq. 3) instead"))
    batch_size: int = field(default=16, metadata=described("sequences per forward pass"))
    max_sequences: int = field(default=0, metadata=described("evaluate only the first N sequences (0 = all)"))
    seed: int = field(default=0, metadata=described("seed of the noise draws"))
    use_ema: bool = field(default=True, metadata=described("use the raw weights instead of the EMA weights",
                                                        flag="--no-ema", invert=True))  # fmt: skip

    def check(self) -> NoiseSchedule:
        """The evaluation schedule, after checking every setting that does not need the model."""
        schedule = evaluation_schedule(self.t_floor)
        if self.draws < 1:
            raise Sad3Error(f"--draws must be at least 1, got {self.draws}")
        if self.batch_size < 1:
            raise Sad3Error(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.discrete_steps < 0:
            raise Sad3Error(f"--discrete-steps must be at least 1, got {self.discrete_steps}")
        return schedule


def evaluate_checkpoint(checkpoint: str, source: EvalSource, settings: EvalSettings) -> dict:
    """The bound of `checkpoint` on `source`: BoundEstimate's fields, plus what was scored and how."""
    from sad3_megatron.engine.build import load_components  # megatron: only once the flags are checked

    schedule = settings.check()
    source.check()
    parts, ckpt = load_components(checkpoint, use_ema=settings.use_ema)
    objective = _objective(parts, settings)
    sequences, described = _sequences(parts, source)
    torch.manual_seed(settings.seed)
    bound = estimate_bound(
        parts.model, objective, sequences, parts.device, settings.batch_size, settings.draws, settings.seed,
        max_sequences=settings.max_sequences or None, schedule=schedule,
    )  # fmt: skip
    estimator = "t integrated out" if schedule.masking == "count" else f"t ~ U[{settings.t_floor:g}, 1]"
    return {"checkpoint": str(ckpt), "data": described, **bound.to_dict(),
            "discrete_steps": settings.discrete_steps, "estimator": estimator,
            "trained_with": adaptation_switches(parts.cfg.diffusion)}  # fmt: skip


def _objective(parts, settings: EvalSettings):
    """The run's objective, at another L' (`block_size`) or with D3PM's T-step terms when asked."""
    cfg, mask_id = parts.cfg, parts.tokenizer.mask_id
    objective, seq_len = parts.objective, cfg.model.seq_len
    if settings.block_size is not None or settings.discrete_steps:
        if cfg.diffusion.objective != "sad3":
            flag = "--block-size" if settings.block_size is not None else "--discrete-steps"
            raise Sad3Error(f"{flag} applies to masked-diffusion (sad3) checkpoints; this one is {cfg.diffusion.objective}")
    if settings.block_size is not None:
        if settings.block_size < 1 or seq_len % settings.block_size:
            raise Sad3Error(
                f"--block-size {settings.block_size} does not divide the model's context length {seq_len}: pick a divisor"
            )
        objective = build_objective(cfg.diffusion, seq_len, mask_id, block_size=settings.block_size)
    if settings.discrete_steps:
        objective = DiscreteTimeObjective(
            seq_len, objective.block_size, NoiseSchedule("linear"), mask_id, settings.discrete_steps,
            objective.antithetic, objective.clean_prefix, replace(objective.switches, complementary=False),
        )  # fmt: skip
    return objective


def _sequences(parts, source: EvalSource):
    """The packed rows `sad3 eval` scores, and how to name them in the report."""
    from sad3_megatron.data.corpus import load_corpus, load_eval_sequences

    cfg, tokenizer, seq_len = parts.cfg, parts.tokenizer, parts.cfg.model.seq_len
    cache = cfg.data.cache_dir or None
    if source.zero_shot:
        sequences = load_eval_sequences(
            tokenizer, seq_len, zero_shot=source.zero_shot, zero_shot_path=source.zero_shot_path, cache_dir=cache,
            framing=cfg.data.framing,
        )  # fmt: skip
        return sequences, f"zero-shot {source.zero_shot} ({source.zero_shot_path or 'hub'})"
    if source.data:
        files = load_eval_sequences(tokenizer, seq_len, files=source.data, cache_dir=cache, framing=cfg.data.framing)
        return files, source.data
    return load_corpus(cfg.data, tokenizer, seq_len).val, "held-out split"  # the checkpoint's own


def describe(result: dict) -> str:
    """One line: what was estimated, its value and error, the PPL (= for exact NLLs, <= for bounds)."""
    block, draws = result["block_size"], result["draws"]
    kind = f"NELBO (L'={block}, {draws} draws, {result['estimator']})"
    if result["exact"]:  # the AR baseline, or L' = 1 with t integrated out (Suppl. B)
        kind = "NLL (exact, AR)" if block is None else "NLL (exact, L'=1 in one pass)"
    if result["discrete_steps"]:
        kind = f"D3PM NELBO (T={result['discrete_steps']}, L'={block}, {draws} draws of j ~ U{{1..T}})"
    relation = "=" if result["exact"] else "<="
    # Whatever the run optimised (uniform weights, an AR term), the number is the bound: say so.
    trained = result.get("trained_with")
    note = f"; the true bound (Eq. 7 weights) of a model trained with {trained}" if trained else ""
    return (
        f"{kind}: {result['nelbo_per_token']:.4f} ± {result['std_err']:.4f} nats/token; "
        f"PPL {relation} {result['ppl']:.2f} ± {result['ppl_std_err']:.2f}; "
        f"{result['tokens']} tokens in {result['sequences']} sequences{note}"
    )
