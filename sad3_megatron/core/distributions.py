"""Shaping and drawing from the x-prediction p_θ(x | x_t): temperature, nucleus (top-p), and a
categorical draw from a CPU `torch.Generator`, so a seed gives the same samples on any device."""

from __future__ import annotations

import torch


def shape_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature), restricted to the nucleus of mass `top_p` and renormalised.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (Holtzman et
    al., 2020); the most likely token is always kept. The mask token's logit is -inf (SUBS), so it
    has probability 0 here and is never drawn."""
    if temperature != 1.0:
        logits = logits / temperature
    probs = logits.float().softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` [k, vocab]: argmax_v log p_v - log E_v with E_v ~ Exp(1) (the
    Gumbel-max trick), the noise drawn from the CPU `generator` whatever the device.

    Why not invert the CDF with one uniform: the normalizer's rounding shifts every CDF boundary,
    so two computations of x_θ that agree to 1e-6 (KV cache vs recompute) draw different tokens
    at a rate of about (vocabulary × 1e-7) per draw, a few times per thousand tokens with a 30k
    vocabulary. With Gumbel-max only a near-tie of the two best perturbed scores can flip."""
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=probs.device)
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64)
    exponential = (-torch.log1p(-u)).clamp_min_(torch.finfo(torch.float64).tiny)
    scores = torch.log(probs.double()) - torch.log(exponential).to(probs.device)
    return scores.argmax(dim=-1)
