"""The one mask function against Suppl. D written out by hand, and the backends against each other."""

import pytest
import torch

from sad3_megatron.core.attention import attend
from sad3_megatron.core.masks import AttentionMask

# Suppl. D, L = 6, L' = 2: rows/cols 0-5 are x_t (blocks {0,1},{2,3},{4,5}), 6-11 are x.
#            x_t: 0 1 2 3 4 5   x: 6 7 8 9 10 11
HAND_WRITTEN = [
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
]


def test_doubled_mask_matches_suppl_d_by_hand():
    expected = torch.tensor(HAND_WRITTEN, dtype=torch.bool)
    assert torch.equal(AttentionMask.doubled(6, 2).dense(), expected)


def test_windows_are_quadrants_of_the_one_mask():
    full = AttentionMask.doubled(8, 2).dense()
    assert torch.equal(AttentionMask.block_causal(8, 2).dense(), full[8:, 8:])
    assert torch.equal(AttentionMask.causal(8).dense(), torch.tril(torch.ones(8, 8, dtype=torch.bool)))
    assert torch.equal(AttentionMask.doubled(8, 2).first_rows(8).dense(), full[:8])
    # L' = L: noisy tokens see all of x_t and no clean token (MDLM); clean tokens see all of x.
    mdlm = AttentionMask.doubled(8, 8).dense()
    assert mdlm[:8, :8].all() and not mdlm[:8, 8:].any() and mdlm[8:, 8:].all()


def test_mask_mod_and_dense_agree():
    mask = AttentionMask.doubled(12, 3)
    q = torch.arange(24)[:, None]
    kv = torch.arange(24)[None, :]
    assert torch.equal(mask.mask_mod()(0, 0, q, kv), mask.dense())
    assert AttentionMask.causal(5).is_causal and not AttentionMask.block_causal(6, 2).is_causal


@pytest.mark.parametrize("seq_len,block_size", [(6, 2), (16, 4), (64, 1), (64, 64), (200, 8)])
def test_flex_matches_sdpa_forward(seq_len, block_size):
    torch.manual_seed(0)
    mask = AttentionMask.doubled(seq_len, block_size)
    q, k, v = (torch.randn(2, 3, 2 * seq_len, 16) for _ in range(3))
    reference = attend(q, k, v, mask, "sdpa")
    flex = attend(q, k, v, mask, "flex")
    assert (reference - flex).abs().max() <= 1e-5


def test_flex_refuses_cpu_backward_with_clear_error():
    from sad3_megatron.core.errors import Sad3Error

    q = torch.randn(1, 1, 8, 8, requires_grad=True)
    with pytest.raises(Sad3Error, match="sdpa"):
        attend(q, q, q, AttentionMask.doubled(4, 2), "flex")
