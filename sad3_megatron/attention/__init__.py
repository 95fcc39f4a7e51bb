"""The block-diffusion mask (one function) and the attention kernels that run it."""

from sad3_megatron.attention.backends import BACKENDS, attend, resolve_backend
from sad3_megatron.attention.masks import (
    AttentionMask,
    DocumentMask,
    block_diffusion_visible,
    document_window_ids,
    doubled_positions,
)

__all__ = [
    "BACKENDS",
    "AttentionMask",
    "DocumentMask",
    "attend",
    "block_diffusion_visible",
    "document_window_ids",
    "doubled_positions",
    "resolve_backend",
]
