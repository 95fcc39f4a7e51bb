"""The objective and its noise, defined once: the `diffusion:` section of a config.

`registry.build_objective` turns it into the objective the trainer, `sad3 eval`, `sad3 sample`, the
schedule search and the exported model all run; the HF config stores it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ObjectiveName = Literal["sad3", "ar", "sedd"]
ScheduleName = Literal["linear", "cosine", "log", "sqrt", "square", "clipped"]
Masking = Literal["bernoulli", "resample", "count"]
SearchCriterion = Literal["off", "elbo", "grad"]


@dataclass
class DiffusionConfig:
    """`sad3` with block_size = seq_len is MDLM; block_size 1 with full masking is AR (Suppl. B)."""

    objective: ObjectiveName = "sad3"  # ar: next-token baseline on the same model; sedd: score entropy, L' = L
    ar_random_tokens: bool = False  # ar: loss on a random ~half of the tokens (Table 1's "AR + random batch size")
    block_size: int = 4  # L'
    schedule: ScheduleName = field(default="clipped", metadata={"label": "noise schedule"})
    beta: float = 0.3  # clipped schedule: mask rates ~ U[beta, omega] (Sec. 5.2)
    omega: float = 0.8
    antithetic: bool = True
    # resample: the reference code's realised rate in [beta, omega]; count: t integrated out
    masking: Masking = field(default="bernoulli", metadata={"label": "masking"})
    t_floor: float = 1e-3  # smallest t drawn in training (MDLM's; keeps the 1/t weight's variance finite)
    schedule_search: SearchCriterion = "off"  # pick (beta, omega) of least variance at each evaluation
    search_batches: int = 100  # held-out micro-batches the search scores (the reference code's 100)
    search_grid: str = "reference"  # reference (widths .5-.9, starts every .05, + (1e-3, 1)) | "B:W,B:W,..."
    search_parameters: str = ""  # grad search: only parameters whose name contains this ("" = all)
