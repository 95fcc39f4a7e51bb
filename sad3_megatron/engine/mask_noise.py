"""Noise on the [MASK] token's input embedding early in training (`diffusion.mask_embedding_noise`).

An AR checkpoint never saw the mask token: its embedding row is new (or, in a padded table, a row that
weight decay shrank for the whole of pretraining), and LLaDA2 saw gradients explode when adapting from
such a row. Following it, every [MASK] occurrence in a training input gets Gaussian noise of standard
deviation σ_k = σ · max(0, 1 - k / N) added to its embedding at optimizer step k (N =
`mask_embedding_noise_steps`): a perturbation that fades out linearly and is gone after N steps.

It is applied from outside the model, as a forward hook on the embedding layer (the `embed` module of
every `core.network.Embedding`, so the megatron model, its pipeline stage 0 and the plain network alike),
only in training mode: evaluation, the schedule search and sampling never see it. The draws are a pure
function of (run seed, step, micro-batch, data-parallel rank), like the masks, so a resumed run adds
exactly the noise the uninterrupted run added.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sad3_megatron.core.network import Embedding


def noise_std(std: float, steps: int, step: int) -> float:
    """σ_k: linear decay from `std` at step 0 to 0 at step `steps` (0 after it)."""
    if std <= 0 or steps <= 0:
        return 0.0
    return std * max(0.0, 1.0 - step / steps)


class MaskEmbeddingNoise:
    """The hook, and the step it draws for (`begin(step)` before each optimizer step's forwards)."""

    def __init__(self, model: nn.Module, mask_id: int, std: float, steps: int, seed: Callable[[int, int], int]):
        """`seed(step, k)`: the seed of the k-th training forward of `step` on this rank."""
        self.mask_id, self.std, self.steps, self.seed = mask_id, std, steps, seed
        self.step, self.calls = 0, 0
        embeds = [m.embed for m in model.modules() if isinstance(m, Embedding)]
        self.handles = [embed.register_forward_hook(self._hook) for embed in embeds]

    @property
    def current_std(self) -> float:
        return noise_std(self.std, self.steps, self.step)

    def begin(self, step: int) -> None:
        self.step, self.calls = step, 0

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        std = self.current_std
        if not module.training or std == 0.0:
            return None
        generator = torch.Generator(device=output.device).manual_seed(self.seed(self.step, self.calls))
        self.calls += 1
        where = inputs[0] == self.mask_id  # [b, s]: the input layout of nn.Embedding and megatron's
        noise = torch.randn((int(where.sum()), output.shape[-1]), generator=generator, device=output.device)
        out = output.clone()
        out[where] = out[where] + std * noise.to(output.dtype)
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
