"""Packing by document: the block-diffusion mask AND "same document", checked against rows that
hold the document alone (RoPE is relative, so where a document sits in the row does not matter)."""

import torch
from conftest import MASK_ID, random_tokens, tiny_model

from sad3_megatron.attention import AttentionMask, DocumentMask, attend, document_window_ids
from sad3_megatron.diffusion import BlockDiffusionObjective, NoisedBatch, make_schedule

L, BLOCK = 16, 4


def test_document_mask_is_the_block_mask_and_same_document():
    ids = torch.tensor([[0] * 6 + [1] * 10])
    mask = DocumentMask(AttentionMask.doubled(L, BLOCK), document_window_ids(ids, doubled=True))
    doubled_ids = torch.cat([ids, ids], dim=1)[0]
    expected = AttentionMask.doubled(L, BLOCK).dense() & (doubled_ids[:, None] == doubled_ids[None, :])
    assert torch.equal(mask.dense()[0, 0], expected)
    assert mask.dense()[0, 0].any(dim=1).all()  # no empty softmax row


def test_flex_and_sdpa_agree_with_document_mask():
    torch.manual_seed(0)
    ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    mask = DocumentMask(AttentionMask.doubled(L, BLOCK), document_window_ids(ids, doubled=True))
    q, k, v = (torch.randn(2, 2, 2 * L, 8) for _ in range(3))
    assert (attend(q, k, v, mask, "sdpa") - attend(q, k, v, mask, "flex")).abs().max() <= 1e-5


def noised(x_t, x, masked):
    weight = torch.ones_like(x, dtype=torch.float32)
    return NoisedBatch(torch.ones(x.shape[0], L // BLOCK), x_t, masked, weight)


def test_a_document_is_scored_as_if_it_were_alone_in_its_row():
    model = tiny_model(seed=7)
    doc_a, doc_b, doc_c = random_tokens(1, 8, seed=1), random_tokens(1, 8, seed=2), random_tokens(1, 8, seed=3)
    masked_b = torch.tensor([[True, False, True, True, False, True, False, True]])
    objective = BlockDiffusionObjective(L, BLOCK, make_schedule("linear"), MASK_ID)

    # Row 1: A ⊕ B, attention kept inside documents; B occupies positions 8..15.
    packed = torch.cat([doc_a, doc_b], dim=1)
    masked = torch.cat([torch.zeros(1, 8, dtype=torch.bool), masked_b], dim=1)
    x_t = torch.where(masked, MASK_ID, packed)
    ids = torch.tensor([[0] * 8 + [1] * 8])
    with torch.no_grad():
        nll_packed = objective.token_nll(model, packed, noised(x_t, packed, masked), document_ids=ids)

    # Row 2: B ⊕ C with no document mask; B occupies positions 0..7 and, being first, sees only itself.
    alone = torch.cat([doc_b, doc_c], dim=1)
    masked2 = torch.cat([masked_b, torch.zeros(1, 8, dtype=torch.bool)], dim=1)
    x_t2 = torch.where(masked2, MASK_ID, alone)
    with torch.no_grad():
        nll_alone = objective.token_nll(model, alone, noised(x_t2, alone, masked2))

    assert (nll_packed[:, 8:] - nll_alone[:, :8]).abs().max() <= 1e-5
    # Without the document mask B would see A, and its predictions would change.
    with torch.no_grad():
        nll_leaky = objective.token_nll(model, packed, noised(x_t, packed, masked))
    assert (nll_leaky[:, 8:] - nll_alone[:, :8]).abs().max() > 1e-4
