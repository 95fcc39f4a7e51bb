"""The block-diffusion mask (one function) and the attention kernels that run it."""

from sad3_megatron.attention.backends import BACKENDS, attend, resolve_backend
from sad3_megatron.attention.masks import AttentionMask, block_diffusion_visible, doubled_positions

__all__ = ["BACKENDS", "AttentionMask", "attend", "block_diffusion_visible", "doubled_positions", "resolve_backend"]
