"""Rotary position embeddings (Su et al., 2021), with positions passed explicitly, and the frequency
scalings of the bases sad3 imports.

Explicit positions let both halves of x_t ⊕ x use 0..L-1 and let the sampler keep positions
consistent past the training context. Written here because megatron-core's RoPE needs CUDA, and
its llama3 scaling hard-codes three of the four parameters that Llama 3.x checkpoints set.

Frequencies follow transformers' `modeling_rope_utils` (so an imported model computes what the
base computes): inv_freq_i = θ^(-2i/d), then
- ``linear``: inv_freq / factor (positions interpolated by `factor`);
- ``llama3``: wavelengths 2π / inv_freq longer than original / low_freq_factor are divided by
  `factor`, those shorter than original / high_freq_factor are kept, and the band between is a
  smooth interpolation of the two. Neither rescales cos/sin (attention factor 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are scaled (ModelConfig's rope_* fields)."""

    kind: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


def inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """inv_freq [head_dim / 2] in fp32, scaled as `scaling` says."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = scaling or RopeScaling()
    if scaling.kind == "none":
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind == "llama3":
        return _llama3(inv, scaling)
    raise ValueError(f"unknown rope scaling {scaling.kind!r}")


def _llama3(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelength = s.original_max_positions / s.low_freq_factor  # longer than this: divide by factor
    high_wavelength = s.original_max_positions / s.high_freq_factor  # shorter than this: keep
    wavelength = 2 * math.pi / inv
    scaled = torch.where(wavelength > low_wavelength, inv / s.factor, inv)
    smooth = (s.original_max_positions / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, base, scaling), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [seq, 1, 1, head_dim] for the [s, b, h, d] layout."""
        freqs = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [s, b, h, d] by the angles of its positions (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
