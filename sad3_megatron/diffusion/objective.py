"""Training objectives as configurations of one code path.

`BlockDiffusionObjective` is the SAR NELBO of Eq. 7/8 for any block size L' dividing L:
L' = L is MDLM, L' = 1 with the fully-masking schedule (clipped, β = ω = 1) equals the AR NLL
(Suppl. B). `AutoregressiveObjective` is the plain next-token baseline on the same model.

The model is any callable with the interface of `model.SAD3Transformer.forward` (Eq. 6);
nothing here imports DeepSpeed or megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sad3_megatron.attention.masks import AttentionMask, doubled_positions
from sad3_megatron.diffusion.forward import NoisedBatch, mask_blocks
from sad3_megatron.diffusion.schedules import NoiseSchedule


class Denoiser(Protocol):
    def __call__(self, tokens, positions, mask, *, past_kv=None, num_outputs=None, labels=None, return_kv=False): ...


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar to differentiate: NELBO (or NLL) per token of this batch
    nll_sum: torch.Tensor  # detached sum over tokens, for exact averaging across batches
    num_tokens: int


def weighted_nll(token_nll: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
    """Per-token terms of Eq. 8: weight × (-log p_θ(x | x_t, x^{<b})) on masked tokens.

    Unmasked tokens contribute 0: under the SUBS parameterization they are copied (Suppl. B, Eq. 13).
    """
    return torch.where(noised.masked, noised.weight * token_nll, torch.zeros_like(token_nll))


class BlockDiffusionObjective:
    """L_SAR of Eq. 7/8, estimated with one time t_b per block (Alg. 1)."""

    def __init__(self, seq_len: int, block_size: int, schedule: NoiseSchedule, mask_id: int, antithetic: bool = True):
        self.seq_len, self.block_size = seq_len, block_size
        self.schedule, self.mask_id, self.antithetic = schedule, mask_id, antithetic
        self.mask = AttentionMask.doubled(seq_len, block_size)

    def noise(
        self, x: torch.Tensor, generator: torch.Generator | None, schedule: NoiseSchedule | None = None
    ) -> NoisedBatch:
        return mask_blocks(x, self.block_size, schedule or self.schedule, self.mask_id, generator, self.antithetic)

    def token_nll(self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """-log p_θ(x^b | x_t^b, x^{<b}) for every token, in ONE pass over x_t ⊕ x (Suppl. D)."""
        tokens = torch.cat([noised.x_t, x], dim=1)
        positions = doubled_positions(self.seq_len, x.device)
        return model(tokens, positions, self.mask, num_outputs=self.seq_len, labels=x).token_nll

    def token_nll_naive(self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """The same quantity by Alg. 1 written as a loop: one pass over x for the clean K/V, then
        B calls x_θ^b(x_t^b, K^{1:b-1}, V^{1:b-1}). The reference the vectorized pass is tested against."""
        L, Lp = self.seq_len, self.block_size
        positions = torch.arange(L, device=x.device)
        clean_kv = model(x, positions, AttentionMask.block_causal(L, Lp), return_kv=True).kv
        pieces = []
        for start in range(0, L, Lp):
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in clean_kv]
            out = model(
                noised.x_t[:, start : start + Lp],
                positions[start : start + Lp],
                None,
                past_kv=past,
                labels=x[:, start : start + Lp],
            )
            pieces.append(out.token_nll)
        return torch.cat(pieces, dim=1)

    def __call__(
        self,
        model: Denoiser,
        x: torch.Tensor,
        generator: torch.Generator | None,
        schedule: NoiseSchedule | None = None,
        naive: bool = False,
    ) -> LossTerms:
        noised = self.noise(x, generator, schedule)
        return self.loss(model, x, noised, naive)

    def loss(self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch, naive: bool = False) -> LossTerms:
        nll = (self.token_nll_naive if naive else self.token_nll)(model, x, noised)
        terms = weighted_nll(nll, noised)
        return LossTerms(terms.mean(), terms.detach().sum(), terms.numel())


class AutoregressiveObjective:
    """Next-token NLL (Eq. 1) with a causal mask on the same transformer: the AR baseline."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.mask = AttentionMask.causal(seq_len - 1)

    def __call__(self, model: Denoiser, x: torch.Tensor, generator: torch.Generator | None = None, **_) -> LossTerms:
        positions = torch.arange(self.seq_len - 1, device=x.device)
        nll = model(x[:, :-1], positions, self.mask, labels=x[:, 1:]).token_nll
        return LossTerms(nll.mean(), nll.detach().sum(), nll.numel())


def build_objective(
    kind: str, seq_len: int, block_size: int, schedule: NoiseSchedule, mask_id: int, antithetic: bool = True
):
    """The configured objective: `sad3` (any L', MDLM at L' = L) or `ar`."""
    if kind == "ar":
        return AutoregressiveObjective(seq_len)
    return BlockDiffusionObjective(seq_len, block_size, schedule, mask_id, antithetic)
