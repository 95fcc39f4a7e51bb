"""Attention kernels behind one interface, all driven by the one mask of `masks.py`.

- ``sdpa``: torch's scaled_dot_product_attention with the dense boolean mask. The reference,
  and the only backend with a CPU backward in torch 2.13.
- ``flex``: FlexAttention with a block-sparse BlockMask built from the same mask_mod, with an
  explicit BLOCK_SIZE (fully masked tiles are skipped, which is what makes the doubled sequence
  cost about as much attention work as full attention over L). Compiled on GPU.
- ``flash``: flash-attn (an optional extra). It has no arbitrary masks, so it runs the windows it
  can express natively: no mask (KV-cache sampling, where a block sees its cache and itself) and
  the causal mask (the AR baseline). The doubled training mask asks for ``flex``.

Tensors are [batch, heads, seq, head_dim]; a mask of None means every query sees every key. Keys and
values may have fewer heads than queries (grouped-query attention): query head j reads key/value head
j // (query heads / key-value heads), as transformers' `repeat_kv` does, without copying them.
"""

from __future__ import annotations

import functools
from typing import get_args

import torch
import torch.nn.functional as F

from .errors import Sad3Error
from .masks import AttentionMask, DocumentMask, RowsMask
from .model_config import AttentionBackend

BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
FLEX_BLOCK_SIZE = 128


def resolve_backend(name: str, device: torch.device) -> str:
    """Pick the kernel for `auto` (flex on CUDA, sdpa elsewhere) and check the choice can run."""
    if name not in BACKENDS:
        raise Sad3Error(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name == "flash":
        _flash_attn_func()
        if device.type != "cuda":
            raise Sad3Error("attention backend 'flash' runs on CUDA only: use 'sdpa' on CPU")
    return name


@functools.lru_cache(maxsize=64)
def _dense_mask(mask: AttentionMask, device: str) -> torch.Tensor:
    return mask.dense(device)


@functools.lru_cache(maxsize=64)
def _block_mask(mask: AttentionMask, device: str, block_size: int):
    from torch.nn.attention.flex_attention import create_block_mask

    # BLOCK_SIZE is passed explicitly: the tile size must match the kernel's, never a silent default.
    return create_block_mask(mask.mask_mod(), None, None, mask.q_len, mask.kv_len, device=device, BLOCK_SIZE=block_size)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _grouped(q: torch.Tensor, k: torch.Tensor) -> bool:
    return k.shape[1] != q.shape[1]


def _sdpa(q, k, v, mask):
    if isinstance(mask, (DocumentMask, RowsMask)):
        dense = mask.memo("dense", q.device, lambda: mask.dense(q.device))  # once per micro-batch
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=_grouped(q, k))
    attn_mask = None if mask is None else _dense_mask(mask, str(q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=_grouped(q, k))


def _flex(q, k, v, mask):
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise Sad3Error("FlexAttention has no backward on CPU: train with attention_backend=sdpa")
    if isinstance(mask, (DocumentMask, RowsMask)):  # built once per micro-batch, shared by the layers
        from torch.nn.attention.flex_attention import create_block_mask

        batch = None if getattr(mask, "document_ids", None) is None else q.shape[0]  # RowsMask: per rank
        block_mask = mask.memo(
            "flex",
            q.device,
            lambda: create_block_mask(
                mask.mask_mod(), batch, None, mask.q_len, mask.kv_len, device=str(q.device),
                BLOCK_SIZE=FLEX_BLOCK_SIZE,
            ),
        )  # fmt: skip
    else:
        block_mask = None if mask is None else _block_mask(mask, str(q.device), FLEX_BLOCK_SIZE)
    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return kernel(q, k, v, block_mask=block_mask, enable_gqa=_grouped(q, k))


def _flash_attn_func():
    # Inside try: transformers' remote-code loader then does not require flash-attn to be installed.
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise Sad3Error(
            "attention backend 'flash' needs the flash-attn package: pip install flash-attn, or use 'flex'"
        ) from err
    return flash_attn_func


def _flash_varlen_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise Sad3Error("attention backend 'flash' needs the flash-attn package: pip install flash-attn") from err
    return flash_attn_varlen_func


def document_segments(mask: DocumentMask, length: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, [segments + 1]) of the rows flattened one after another, a segment being a
    run of one document inside one row, and the longest segment: flash-attn's varlen layout."""
    ids = mask.document_ids[:, :length]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]  # every row starts a segment: none crosses rows
    bounds = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([bounds, bounds.new_tensor([ids.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_attention(q, k, v, mask: DocumentMask, kernel) -> torch.Tensor:
    """Document-packed rows as independent sequences (cu_seqlens), for the masks that are, inside
    each document, exactly what flash-attn computes natively: causal (AR) or full (MDLM over x_t).
    `kernel` has flash_attn_varlen_func's signature; q/k/v are [b, h, s, d]."""
    b, h, s, d = q.shape
    cu, longest = document_segments(mask, s)
    flat = [t.transpose(1, 2).reshape(b * s, h, d) for t in (q, k, v)]
    out = kernel(*flat, cu.to(q.device), cu.to(q.device), longest, longest, causal=mask.base.is_causal)
    return out.reshape(b, s, h, d).transpose(1, 2)


def _flash(q, k, v, mask):
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16  # flash-attn: half only
    if isinstance(mask, DocumentMask) and mask.q_len == mask.kv_len and (mask.base.is_causal or mask.base.is_full):
        out = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, _flash_varlen_func())
        return out.to(q.dtype)
    flash_attn_func = _flash_attn_func()
    if mask is not None and (isinstance(mask, DocumentMask) or not mask.is_causal):
        raise Sad3Error(
            "flash-attn cannot express the block-diffusion training mask: use attention_backend=flex "
            "(flash serves KV-cache sampling, the causal AR baseline and document-packed AR / MDLM rows)"
        )
    # flash-attn wants [batch, seq, heads, head_dim] in half precision.
    out = flash_attn_func(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)), causal=mask is not None)
    return out.transpose(1, 2).to(q.dtype)


_KERNELS = {"sdpa": _sdpa, "flex": _flex, "flash": _flash}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask | DocumentMask | RowsMask | None,
    backend: str,
) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v with the named kernel; q/k/v are [b, h, s, d]."""
    if mask is not None and (mask.q_len, mask.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(f"mask window {mask.q_len}x{mask.kv_len} does not match q/k lengths {q.shape[2]}x{k.shape[2]}")
    return _KERNELS[backend](q, k, v, mask)
