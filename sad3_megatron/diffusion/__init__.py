"""The math of SAD3-LMs: schedules, the forward process, the NELBO. Pure torch, no parallelism.

The modules live in the standalone package `sad3_megatron.hf` (`schedules.py`, `noising.py`,
`objective.py`) so that an exported HuggingFace model scores text with the very same code."""

from sad3_megatron.hf.noising import NoisedBatch, mask_blocks, per_token
from sad3_megatron.hf.objective import (
    AutoregressiveObjective,
    BlockDiffusionObjective,
    LossTerms,
    TrainingPass,
    build_objective,
    loss_terms,
    token_weights,
)
from sad3_megatron.hf.schedules import (
    MASKINGS,
    SCHEDULES,
    T_FLOOR,
    NoiseSchedule,
    evaluation_schedule,
    make_schedule,
    parse_schedule,
)

__all__ = [
    "MASKINGS",
    "SCHEDULES",
    "T_FLOOR",
    "AutoregressiveObjective",
    "BlockDiffusionObjective",
    "LossTerms",
    "NoiseSchedule",
    "NoisedBatch",
    "TrainingPass",
    "loss_terms",
    "build_objective",
    "evaluation_schedule",
    "make_schedule",
    "parse_schedule",
    "mask_blocks",
    "per_token",
    "token_weights",
]
