"""Packing by document: the block-diffusion mask AND "same document", checked against rows that
hold the document alone (RoPE is relative, so where a document sits in the row does not matter)."""

import torch

from sad3_megatron.core.attention import attend
from sad3_megatron.core.masks import AttentionMask, DocumentMask, document_window_ids
from sad3_megatron.core.noising import NoisedBatch
from sad3_megatron.core.objectives import BlockDiffusionObjective
from sad3_megatron.core.schedules import make_schedule

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


def test_a_document_is_scored_as_if_it_were_alone_in_its_row(tiny):
    model = tiny.model(seed=7)
    doc_a, doc_b, doc_c = tiny.tokens(1, 8, seed=1), tiny.tokens(1, 8, seed=2), tiny.tokens(1, 8, seed=3)
    masked_b = torch.tensor([[True, False, True, True, False, True, False, True]])
    objective = BlockDiffusionObjective(L, BLOCK, make_schedule("linear"), tiny.mask_id)

    # Row 1: A ⊕ B, attention kept inside documents; B occupies positions 8..15.
    packed = torch.cat([doc_a, doc_b], dim=1)
    masked = torch.cat([torch.zeros(1, 8, dtype=torch.bool), masked_b], dim=1)
    x_t = torch.where(masked, tiny.mask_id, packed)
    ids = torch.tensor([[0] * 8 + [1] * 8])
    with torch.no_grad():
        nll_packed = objective.token_nll(model, packed, noised(x_t, packed, masked), document_ids=ids)

    # Row 2: B ⊕ C with no document mask; B occupies positions 0..7 and, being first, sees only itself.
    alone = torch.cat([doc_b, doc_c], dim=1)
    masked2 = torch.cat([masked_b, torch.zeros(1, 8, dtype=torch.bool)], dim=1)
    x_t2 = torch.where(masked2, tiny.mask_id, alone)
    with torch.no_grad():
        nll_alone = objective.token_nll(model, alone, noised(x_t2, alone, masked2))

    assert (nll_packed[:, 8:] - nll_alone[:, :8]).abs().max() <= 1e-5
    # Without the document mask B would see A, and its predictions would change.
    with torch.no_grad():
        nll_leaky = objective.token_nll(model, packed, noised(x_t, packed, masked))
    assert (nll_leaky[:, 8:] - nll_alone[:, :8]).abs().max() > 1e-4


def test_held_out_bound_keeps_document_ids_of_a_prefix_of_rows(tiny):
    """Evaluating the first rows of a document-packed split scores them with the document mask."""
    import numpy as np

    from sad3_megatron.config import DataConfig
    from sad3_megatron.core.likelihood import estimate_bound
    from sad3_megatron.core.schedules import evaluation_schedule
    from sad3_megatron.data.corpus import load_corpus
    from sad3_megatron.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("bert-base-uncased")
    val = load_corpus(DataConfig(packing="document"), tokenizer, L).val
    model = tiny.model(seed=5)
    rows = torch.as_tensor(val[:4]) % tiny.mask_id
    ids = torch.as_tensor(val.batch(np.arange(4)).document_ids)
    assert (ids[:, -1] > 0).any()  # some row does hold several documents

    class Rows:  # the split's first rows, re-mapped into the tiny vocabulary, with their document ids
        document_ids = True

        def __len__(self):
            return 4

        def batch(self, index):
            from types import SimpleNamespace

            return SimpleNamespace(tokens=rows[index].numpy(), document_ids=ids[index].numpy())

    objective = BlockDiffusionObjective(L, BLOCK, make_schedule("linear"), tiny.mask_id)
    bound = estimate_bound(model, objective, Rows(), torch.device("cpu"), batch_size=2, draws=1, max_sequences=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = objective(model, rows[:2], generator, schedule=evaluation_schedule(), document_ids=ids[:2])
        second = objective(model, rows[2:3], generator, schedule=evaluation_schedule(), document_ids=ids[2:3])
    expected = (first.nll_sum + second.nll_sum).item() / (first.num_tokens + second.num_tokens)
    assert bound.sequences == 3 and abs(bound.nelbo_per_token - expected) < 1e-6


def test_one_micro_batch_builds_each_document_mask_window_once(tiny, monkeypatch):
    """The per-batch document mask is built once for all layers (twice: the last layer keeps only the
    noisy rows), not once per layer, on the dense SDPA path and the Flex BlockMask path alike."""
    import torch.nn.attention.flex_attention as flex_module

    builds = {"dense": 0, "flex": 0}
    dense = DocumentMask.dense

    def counted_dense(self, device="cpu"):
        builds["dense"] += 1
        return dense(self, device)

    real_block_mask = flex_module.create_block_mask

    def counted_block_mask(*args, **kwargs):
        builds["flex"] += 1
        return real_block_mask(*args, **kwargs)

    monkeypatch.setattr(DocumentMask, "dense", counted_dense)
    monkeypatch.setattr(flex_module, "create_block_mask", counted_block_mask)
    ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    x = tiny.tokens(2, L, seed=4)
    objective = BlockDiffusionObjective(L, BLOCK, make_schedule("linear"), tiny.mask_id)
    outputs = []
    for backend in ("sdpa", "flex"):
        model = tiny.model(seed=5, layers=4, backend=backend)
        with torch.no_grad():  # Flex has no backward on CPU
            outputs.append(objective(model, x, torch.Generator().manual_seed(0), document_ids=ids).loss)
        assert builds[backend if backend == "flex" else "dense"] == 2, builds
    assert abs(outputs[0] - outputs[1]) <= 1e-5


def reference_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """flash_attn_varlen_func's contract written out: each segment [cu[i], cu[i+1]) of the flattened
    [tokens, heads, dim] tensors attends only to itself (causally if asked)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        piece = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [heads, n, dim]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*piece, is_causal=causal).transpose(0, 1)
    return out


def test_flash_varlen_layout_of_document_packed_ar_and_mdlm_rows_equals_the_document_mask():
    """The cu_seqlens glue of the flash backend (runnable here with a reference kernel of the same
    contract) against SDPA under the document mask, for the two masks flash expresses exactly."""
    from sad3_megatron.core.attention import document_segments, varlen_attention

    ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16, [0] * 3 + [1] * 13])
    mdlm = AttentionMask.doubled(L, L).first_rows(L).first_cols(L)
    for base in (AttentionMask.causal(L), mdlm):
        mask = DocumentMask(base, ids)
        assert base.is_causal or base.is_full
        q, k, v = (torch.randn(3, 2, L, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
        expected = attend(q, k, v, mask, "sdpa")
        got = varlen_attention(q, k, v, mask, reference_varlen_kernel)
        assert (got - expected).abs().max() <= 1e-5
    cu, longest = document_segments(DocumentMask(mdlm, ids), L)
    assert cu.tolist() == [0, 5, 12, 16, 32, 35, 48] and longest == 16
    assert not AttentionMask.doubled(L, BLOCK).is_full and not AttentionMask.block_causal(L, BLOCK).is_full
