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
CleanAttention = Literal["block_causal", "causal"]
LossWeighting = Literal["elbo", "uniform"]


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
    # The adaptation switches (docs/adaptation.md): each published AR -> block-diffusion recipe is a setting
    # of these on the one objective (core/objectives.py BlockDiffusionObjective); all off is the paper's.
    shift: bool = False  # token shift (Fast-dLLM v2): the output at position i-1 predicts token i
    complementary_masks: bool = False  # each row also scored under the complement of its masks (Fast-dLLM v2)
    clean_attention: CleanAttention = "block_causal"  # the clean half's mask: M_BC (paper) or token-causal
    ar_loss_weight: float = 0.0  # next-token cross-entropy on the clean half (clean_attention=causal only)
    diffusion_loss_weight: float = 1.0  # the diffusion term's weight beside ar_loss_weight (Nemotron: 0.3)
    loss_weighting: LossWeighting = "elbo"  # elbo: Eq. 7's -α'_t/(1-α_t) (1/t); uniform: 1 (training only)
    mask_embedding_noise: float = 0.0  # std of Gaussian noise on [MASK]'s input embedding (LLaDA2), training only
    mask_embedding_noise_steps: int = 0  # optimizer steps over which that std decays linearly to 0
