"""The GPU-only paths against their CPU-testable references. Skipped where no CUDA device is present;
run them on a GPU with `python -m pytest -q -m gpu tests`.

- FlexAttention's compiled forward and backward under the block-diffusion masks, against SDPA in
  float64 on the same dense mask;
- context parallelism's kernels: each CP rank's rows against all keys on Flex, under a `RowsMask`
  whose BlockMask captures index tensors, put back together against the unsplit attention;
- the whole vectorized x_t ⊕ x pass on Flex, against the naive Alg. 1 loop on SDPA;
- fp8 GEMMs through cuBLAS `_scaled_mm`, against the quantize–dequantize reference in float64.
"""

import pytest
import torch

from sad3_megatron.core.attention import attend
from sad3_megatron.core.masks import AttentionMask, DocumentMask, RowsMask
from sad3_megatron.core.objectives import BlockDiffusionObjective
from sad3_megatron.core.schedules import make_schedule
from sad3_megatron.model.fp8 import E4M3, E5M2, Fp8Linear, require_fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


MASKS = {
    "doubled L'=4": AttentionMask.doubled(256, 4),
    "doubled L'=16": AttentionMask.doubled(256, 16),
    "noisy rows of the last layer": AttentionMask.doubled(256, 16).first_rows(256),
    "causal": AttentionMask.causal(256),
}


FP32, BF16 = (torch.float32, 2e-3), (torch.bfloat16, 2e-2)  # tolerances: Flex's fp32 dots may use tf32


@pytest.mark.parametrize(
    "name,dtype,tolerance",
    [(name, *FP32) for name in MASKS] + [("doubled L'=4", *BF16)],  # each case compiles a kernel: keep few
)
def test_flex_forward_and_backward_equal_float64_sdpa(rel, name, dtype, tolerance):
    mask = MASKS[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, n, 64, device="cuda", generator=g, dtype=dtype).requires_grad_()
        for n in (mask.q_len, mask.kv_len, mask.kv_len)
    )
    out = attend(q, k, v, mask, "flex")
    grad_out = torch.randn(out.shape, device="cuda", generator=g, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attend(*ref_in, mask, "sdpa")
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    assert rel(out, ref) < tolerance
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel(got, want) < tolerance


@pytest.mark.parametrize("documents", [False, True])
def test_context_parallel_ranks_on_flex_together_equal_the_unsplit_attention(rel, documents):
    """CP = 2 at L = 256, L' = 4: each rank attends with its zig-zag rows to every key in gather order on
    compiled Flex, under a RowsMask (the BlockMask's mask_mod captures the index tensors, and the
    document ids). The ranks' outputs, put back in place, and the sum of their gradients equal float64
    SDPA over the unsplit 2L × 2L mask (with documents, the DocumentMask of the packed rows); the
    noisy rows the last layer keeps (a BlockMask of their own) equal those rows of the unsplit pass."""
    from sad3_megatron.model.context_parallel import RowLayout

    L, cp = 256, 2
    unsplit, ids = AttentionMask.doubled(L, 4), None
    if documents:  # two rows of four packed documents each, boundaries off the blocks and the tiles
        doc = torch.bucketize(torch.arange(L), torch.tensor([37, 130, 201]))
        ids = torch.stack([doc, doc.flip(0)]).repeat(1, 2).cuda()
    reference_mask = unsplit if ids is None else DocumentMask(unsplit, ids)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2 * L, 64, device="cuda", generator=g).requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, 4, 2 * L, 64, device="cuda", generator=g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attend(*ref_in, reference_mask, "sdpa")
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())

    layouts = [RowLayout(2 * L, L, cp, rank) for rank in range(cp)]
    outs, lasts = [], []
    for layout in layouts:
        rows, keys = layout.local.cuda(), layout.keys.cuda()
        mask = RowsMask(unsplit, rows, keys, ids)
        outs.append(attend(q[:, :, rows], k[:, :, keys], v[:, :, keys], mask, "flex"))
        with torch.no_grad():
            keep = mask.first_rows(layout.keep)
            lasts.append(attend(q[:, :, rows[: layout.keep]], k[:, :, keys], v[:, :, keys], keep, "flex"))
    order = torch.cat([layout.local for layout in layouts]).cuda()
    assert sorted(order.tolist()) == list(range(2 * L))  # the ranks hold every row once
    out = torch.cat(outs, dim=2)
    grads = torch.autograd.grad(out, (q, k, v), grad_out[:, :, order])
    assert rel(out, ref[:, :, order]) < FP32[1]
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel(got, want) < FP32[1]
    noisy = torch.cat([layout.local[: layout.keep] for layout in layouts]).cuda()
    assert rel(torch.cat(lasts, dim=2), ref[:, :, noisy]) < FP32[1]  # attention is row by row


@pytest.mark.parametrize("block_size", [4, 16])
def test_vectorized_pass_on_flex_equals_the_naive_loop(rel, tiny, block_size):
    L = 128
    flex, sdpa = tiny.model(hidden=64, backend="flex").cuda(), tiny.model(hidden=64).cuda()
    x = tiny.tokens(4, L).cuda()
    objective = BlockDiffusionObjective(L, block_size, make_schedule("linear"), tiny.mask_id)
    noised = objective.noise(x, torch.Generator().manual_seed(block_size))

    def loss_and_grads(model, naive):
        model.zero_grad()
        loss = objective.loss(model, x, noised, naive=naive).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    fast, fast_grad = loss_and_grads(flex, naive=False)
    slow, slow_grad = loss_and_grads(sdpa, naive=True)
    assert abs(fast - slow) / slow < 1e-4
    assert rel(fast_grad, slow_grad) < 1e-3


def test_fp8_gemms_on_the_gpu_equal_the_quantized_reference(dequantized, rel):
    require_fp8(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 768, device="cuda", generator=g).requires_grad_()
    w = torch.randn(2304, 768, device="cuda", generator=g).requires_grad_()
    y = Fp8Linear.apply(x, w, torch.float32)
    dy = torch.randn(y.shape, device="cuda", generator=g)
    y.backward(dy)
    # Hopper's fp8 tensor cores accumulate with fewer bits than fp32 (measured 1.3e-4 on an H200).
    assert rel(y, dequantized(x, E4M3) @ dequantized(w, E4M3).T) < 1e-3
    assert rel(x.grad, dequantized(dy, E5M2) @ dequantized(w, E4M3)) < 1e-3
    assert rel(w.grad, dequantized(dy, E5M2).T @ dequantized(x, E4M3)) < 1e-3
