"""AR + random batch size (Table 1, Fig. 1): the AR baseline trained on a random subset of its
loss tokens, as many as the L' = 1 diffusion objective masks.

Sec. 4.2: the SAR objective at L' = 1 computes the cross-entropy only on masked tokens, each
masked with probability t ~ U[0, 1] (half of them on average), so its gradient is estimated from a
random, about halved number of tokens. This control gives the AR model the same draw: each
next-token target is kept when u < t with t drawn like the diffusion times (stratified over the
batch) and weighted 1 / E[kept] = 2, so the loss stays an unbiased estimate of the AR NLL while
its variance grows like the diffusion objective's. Only training draws subsets; in eval mode every
token is scored (the exact NLL).
"""

from __future__ import annotations

import torch

from .objective import AutoregressiveObjective, Denoiser, LossTerms, TrainingPass
from .schedules import NoiseSchedule

_KEEP_RATE = NoiseSchedule("linear")  # t ~ U(0, 1]: keep probability t, E[kept] = 1/2


class RandomTokensAutoregressiveObjective(AutoregressiveObjective):
    """Next-token NLL over a random subset of targets (training only)."""

    def training_pass(self, x: torch.Tensor, generator: torch.Generator | None = None, schedule=None) -> TrainingPass:
        """Without a generator: every target (the base objective's exact pass)."""
        batch = super().training_pass(x)
        if generator is None:
            return batch
        t = _KEEP_RATE.sample_t(tuple(batch.labels.shape), generator)
        kept = torch.rand(t.shape, generator=generator) < t
        return TrainingPass(batch.tokens, batch.labels, 2.0 * kept.to(batch.weights))

    def __call__(
        self,
        model: Denoiser,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        document_ids: torch.Tensor | None = None,
        **_,
    ) -> LossTerms:
        """In training mode a random subset of targets; in eval mode (no generator reaches the pass) all."""
        return super().__call__(model, x, generator if model.training else None, document_ids)
