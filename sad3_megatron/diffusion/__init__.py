"""The math of SAD3-LMs: schedules, the forward process, the NELBO. Pure torch, no parallelism."""

from sad3_megatron.diffusion.forward import NoisedBatch, mask_blocks, per_token
from sad3_megatron.diffusion.objective import (
    AutoregressiveObjective,
    BlockDiffusionObjective,
    LossTerms,
    TrainingPass,
    build_objective,
    loss_terms,
    token_weights,
)
from sad3_megatron.diffusion.schedules import SCHEDULES, NoiseSchedule, evaluation_schedule, make_schedule

__all__ = [
    "SCHEDULES",
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
    "mask_blocks",
    "per_token",
    "token_weights",
]
