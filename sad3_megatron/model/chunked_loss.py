"""Cross-entropy of the output layer without materialising the [tokens, vocabulary] logits.

The output layer is the largest activation of a language model: at L = 1024 with the GPT-2 vocabulary,
16 sequences hold 0.8 G logits, 3.3 GB in fp32 plus the softmax the loss keeps for backward. Here the
projection and the loss are one autograd function that walks the tokens in chunks: forward computes a
chunk's logits, reduces them to the log-normaliser and the target's logit, and drops them; backward
recomputes each chunk's logits and turns them straight into the gradients of the hidden states and the
weight. Peak memory is one chunk of logits; the price is one more logits matmul in backward.

It is vocabulary-parallel like megatron-core's `vocab_parallel_cross_entropy`: each tensor-parallel rank
holds a slice of the vocabulary, and the max, the normaliser and the target logit are summed (or maxed)
over the TP group, so the result equals the unchunked loss on every layout. Blocked ids (padding rows
and the mask token, SUBS) get probability 0, as in `OutputHead`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    logits = torch.matmul(h.to(dtype), weight.to(dtype).t()).float()
    logits[:, blocked] = float("-inf")
    return logits


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, blocked, vocab_start, chunk, dtype, group):
        local = labels - vocab_start
        here = (local >= 0) & (local < weight.shape[0])
        local = local.clamp(0, weight.shape[0] - 1)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        target = torch.empty_like(lse)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(h[rows], weight, blocked, dtype)
            peak = _reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, group)
            total = _reduce((logits - peak[:, None]).exp().sum(dim=1), dist.ReduceOp.SUM, group)
            lse[rows] = peak + total.log()
            picked = logits.gather(1, local[rows, None])[:, 0]
            target[rows] = _reduce(torch.where(here[rows], picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(h, weight, local, here, blocked, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return lse - target

    @staticmethod
    def backward(ctx, grad_nll):
        h, weight, local, here, blocked, lse = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = (_chunk_logits(h[rows], weight, blocked, ctx.dtype) - lse[rows, None]).exp()
            hit = torch.nonzero(here[rows]).flatten()
            probs[hit, local[rows][hit]] -= 1.0  # d(-log p_target)/d logits = softmax - onehot
            g = (probs * grad_nll[rows, None].float()).to(ctx.dtype)
            grad_h[rows] = torch.matmul(g, weight.to(ctx.dtype)).to(h.dtype)
            grad_w += torch.matmul(g.t(), h[rows].to(ctx.dtype)).float()
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None


def chunked_vocab_parallel_nll(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    blocked_ids: torch.Tensor,
    vocab_start: int = 0,
    chunk_tokens: int = 4096,
    group=None,
) -> torch.Tensor:
    """-log softmax(h Wᵀ)[label] per row of `h` [tokens, hidden], with W [V/TP, hidden] this rank's slice
    of the vocabulary starting at id `vocab_start`; `labels` [tokens] are global ids. The matmuls run
    in the autocast dtype when autocast is on (bf16 logits), the normaliser in fp32. Call it on
    `copy_to_tensor_model_parallel_region(h)` under TP, so the input gradient is summed over ranks."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):
        return _ChunkedNLL.apply(h, weight, labels, blocked_ids, vocab_start, chunk_tokens, dtype, group)
