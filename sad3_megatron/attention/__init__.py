"""The block-diffusion mask (one function) and the attention kernels that run it.

Both live in the standalone package `sad3_megatron.hf` (`masks.py`, `attention.py`), whose files the
HuggingFace export writes verbatim, so the trainer, the sampler and an exported model share one definition."""

from sad3_megatron.hf.attention import BACKENDS, attend, resolve_backend
from sad3_megatron.hf.masks import (
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
