"""The one table of objectives and within-block samplers, by the names configs and flags use.

Everything that needs an objective or a sampler builds it here from its name: the trainer, `sad3 eval`,
`sad3 sample`, the schedule search, and the exported model's `nelbo()`, `generate_blocks()` and
generation defaults. So a SEDD, AR, MDLM or block-diffusion run is scored and sampled the same way
wherever it is loaded. No module in core imports this one except `generate.py` (for samplers), so
the objective and sampler modules never know about each other's factories.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

from .diffusion_config import DiffusionConfig, ObjectiveName
from .errors import Sad3Error
from .objectives import AutoregressiveObjective, BlockDiffusionObjective, Objective, Switches
from .samplers import BlockSampler, ConfidentSampler, SamplerName, ScheduledSampler
from .schedules import NoiseSchedule, make_schedule
from .sedd import EulerSampler, ScoreEntropyObjective


@dataclass(frozen=True)
class ObjectiveEntry:
    """How to build one objective, and how its models are sampled."""

    build: Callable[[DiffusionConfig, int, int, int, NoiseSchedule], Objective]  # (config, L, L', mask id, schedule)
    default_sampler: SamplerName
    autoregressive: bool  # next-token: block size 1, sampled token by token


OBJECTIVES: dict[str, ObjectiveEntry] = {
    "sad3": ObjectiveEntry(
        lambda d, seq_len, block, mask_id, schedule: BlockDiffusionObjective(
            seq_len, block, schedule, mask_id, d.antithetic, switches=Switches.of(d)
        ),
        "ancestral",
        False,
    ),
    "ar": ObjectiveEntry(
        lambda d, seq_len, block, mask_id, schedule: AutoregressiveObjective(seq_len, d.ar_random_tokens),
        "ancestral",  # unused: the AR baseline samples token by token
        True,
    ),
    "sedd": ObjectiveEntry(
        lambda d, seq_len, block, mask_id, schedule: ScoreEntropyObjective(seq_len, schedule, mask_id, d.antithetic),
        "euler",
        False,
    ),
}

SAMPLERS: dict[str, Callable[[int, float], BlockSampler]] = {
    "ancestral": lambda steps, threshold: ScheduledSampler("ancestral", steps),
    "first_hitting": lambda steps, threshold: ScheduledSampler("first_hitting", steps),
    "confident": lambda steps, threshold: ConfidentSampler(steps, threshold),
    "euler": lambda steps, threshold: EulerSampler(steps),
}

assert set(OBJECTIVES) == set(get_args(ObjectiveName)) and set(SAMPLERS) == set(get_args(SamplerName))


def objective_entry(name: str) -> ObjectiveEntry:
    if name not in OBJECTIVES:
        raise Sad3Error(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def training_schedule(d: DiffusionConfig) -> NoiseSchedule:
    """The noise schedule a run trains with (Sec. 5.2: clipped U[β, ω] by default)."""
    return make_schedule(d.schedule, d.beta, d.omega, d.t_floor, d.masking)


def build_objective(
    d: DiffusionConfig, seq_len: int, mask_id: int, block_size: int | None = None,
    schedule: NoiseSchedule | None = None,
) -> Objective:  # fmt: skip
    """The objective of `d` over rows of `seq_len` tokens, with its training schedule unless `schedule`
    is given. `block_size` overrides L' (evaluation at another L'); SEDD is one block (L' = L)."""
    entry = objective_entry(d.objective)
    block = block_size or d.block_size
    return entry.build(d, seq_len, block, mask_id, schedule or training_schedule(d))


def make_sampler(name: str, steps: int, threshold: float = 0.9) -> BlockSampler:
    if name not in SAMPLERS:
        raise Sad3Error(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](steps, threshold)
