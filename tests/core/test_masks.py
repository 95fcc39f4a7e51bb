"""The one mask function against Suppl. D written out by hand, and the backends against each other."""

import pytest
import torch

from sad3_megatron.core.attention import attend
from sad3_megatron.core.masks import AttentionMask, DocumentMask, RowsMask

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


def test_rows_mask_is_the_hand_written_mask_at_any_query_and_key_rows():
    """Context parallelism's window: queries and keys at arbitrary positions, in any order."""
    hand = torch.tensor(HAND_WRITTEN, dtype=torch.bool)
    q_rows, kv_rows = torch.tensor([4, 0, 9, 11, 2]), torch.tensor([10, 6, 2, 3, 0, 8, 1, 4, 5, 7, 9, 11])
    mask = RowsMask(AttentionMask.doubled(6, 2), q_rows, kv_rows)
    assert torch.equal(mask.dense(), hand[q_rows][:, kv_rows])
    assert torch.equal(mask.first_rows(2).dense(), hand[q_rows[:2]][:, kv_rows])
    q, kv = torch.arange(5)[:, None], torch.arange(12)[None, :]
    assert torch.equal(mask.mask_mod()(0, 0, q, kv), hand[q_rows][:, kv_rows])


def test_rows_mask_with_documents_is_the_document_mask_at_those_rows():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    ids = torch.cat([docs, docs], dim=1)
    whole = DocumentMask(AttentionMask.doubled(6, 2), ids).dense()  # [b, 1, 12, 12]
    q_rows, kv_rows = torch.tensor([5, 1, 7, 10]), torch.randperm(12, generator=torch.Generator().manual_seed(0))
    mask = RowsMask(AttentionMask.doubled(6, 2), q_rows, kv_rows, ids)
    assert torch.equal(mask.dense(), whole[:, :, q_rows][:, :, :, kv_rows])
    b, q, kv = torch.arange(2)[:, None, None], torch.arange(4)[None, :, None], torch.arange(12)[None, None, :]
    assert torch.equal(mask.mask_mod()(b, 0, q, kv), whole[:, 0][:, q_rows][:, :, kv_rows])


def test_a_row_past_the_causal_window_is_the_next_causal_row():
    """The AR baseline's L-1 rows padded to L under context parallelism: the pad row is row L-1 of the
    causal mask over L, which no earlier row sees."""
    rows = torch.arange(6)
    assert torch.equal(RowsMask(AttentionMask.causal(5), rows, rows).dense(), torch.tril(torch.ones(6, 6, dtype=torch.bool)))


def test_flex_with_a_rows_mask_matches_sdpa_forward():
    torch.manual_seed(0)
    q_rows, kv_rows = torch.randperm(64)[:16], torch.randperm(64)
    mask = RowsMask(AttentionMask.doubled(32, 4), q_rows, kv_rows)
    q, k, v = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 64, 16), torch.randn(2, 3, 64, 16)
    assert (attend(q, k, v, mask, "sdpa") - attend(q, k, v, mask, "flex")).abs().max() <= 1e-5
