"""Concatenate-and-wrap on hand-made corpora: document boundaries, BOS/EOS placement, the partial last row, and
the document ids of document-bounded packing, checked against a plain list-based reference; the `rows` framing
(MDLM's `[BOS] chunk [EOS]`) against rows written out by hand."""

import numpy as np
import pytest

from sad3_megatron.data.packing import PackedSequences, pack_documents
from sad3_megatron.data.tokenizers import load_tokenizer

BOS, EOS = 100, 101


def reference_stream(docs, bos, eos):
    """[bos] doc [eos] per document (one separator when bos == eos), with the document index of each token."""
    tokens, ids = [], []
    for i, doc in enumerate(docs):
        frame = ([] if bos == eos else [bos]) + list(doc) + [eos]
        tokens += frame
        ids += [i] * len(frame)
    return tokens, ids


def test_wrap_places_bos_eos_and_counts_the_partial_last_row():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    packed = pack_documents(docs, seq_len=4, bos=BOS, eos=EOS, document_ids=True, framing="documents")
    # stream: 100 1 2 3 101 | 100 4 101 | 100 5 6 7 8 9 101  (15 tokens → 3 rows of 4, 3 left over)
    assert packed[:].tolist() == [[100, 1, 2, 3], [101, 100, 4, 101], [100, 5, 6, 7]]
    assert packed.batch([0, 1, 2]).document_ids.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]]
    s = packed.stats
    assert (s.rows, s.tail_tokens, s.documents, s.tokens, s.separators) == (3, 3, 3, 9, 6)
    assert s.documents_longer_than_context == 2  # framed lengths 5 and 7 exceed L = 4: they span rows
    assert s.rows * s.seq_len + s.tail_tokens == s.tokens + s.separators  # every token accounted for


def test_one_separator_when_bos_equals_eos():
    packed = pack_documents(
        [[1, 2], [3, 4, 5], [6]], seq_len=3, bos=EOS, eos=EOS, document_ids=True, framing="documents"
    )
    assert packed[:].tolist() == [[1, 2, 101], [3, 4, 5], [101, 6, 101]]
    assert packed.batch(slice(None)).document_ids.tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert packed.stats.tail_tokens == 0


@pytest.mark.parametrize("bos", [BOS, EOS])
@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_matches_the_reference_on_random_corpora(bos, seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(0, 50, rng.integers(1, 40)).tolist() for _ in range(60)]
    stream, ids = reference_stream(docs, bos, EOS)
    rows = len(stream) // seq_len
    packed = pack_documents(docs, seq_len, bos, EOS, document_ids=True, framing="documents")
    assert len(packed) == rows and packed.stats.tail_tokens == len(stream) - rows * seq_len
    order = rng.permutation(rows)
    batch = packed.batch(order)
    for r, got, got_ids in zip(order, batch.tokens, batch.document_ids, strict=True):
        want = stream[r * seq_len : (r + 1) * seq_len]
        want_ids = np.asarray(ids[r * seq_len : (r + 1) * seq_len])
        assert got.tolist() == want
        assert (got_ids == want_ids - want_ids[0]).all()  # same partition of the row, numbered from 0
    assert packed[-1].tolist() == stream[(rows - 1) * seq_len : rows * seq_len]
    assert np.array_equal(np.asarray(packed), packed[np.arange(rows)])


def test_several_shards_pack_like_one():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, rng.integers(1, 30)).tolist() for _ in range(40)]
    whole = pack_documents(docs, 8, BOS, EOS)
    cuts = [0, 7, 7, 25, 40]  # includes an empty shard
    parts = [np.array([t for d in docs[a:b] for t in d], np.uint16) for a, b in zip(cuts, cuts[1:], strict=False)]
    lengths = [np.array([len(d) for d in docs[a:b]]) for a, b in zip(cuts, cuts[1:], strict=False)]
    sharded = PackedSequences(parts, lengths, 8, BOS, EOS)
    assert len(sharded) == len(whole)
    assert np.array_equal(sharded[:], whole[:]) and sharded[:].dtype == np.int64


def test_hello_world_is_one_framed_row_with_the_reference_ids():
    tok = load_tokenizer("bert-base-uncased")
    packed = pack_documents([tok.encode("Hello world")], 4, tok.bos_id, tok.eos_id, framing="documents")
    assert packed[0].tolist() == [101, 7592, 2088, 102]


def test_wrap_mode_has_no_document_ids_and_bad_indices_fail():
    packed = pack_documents([[1, 2, 3, 4]], 2, BOS, EOS, framing="documents")
    assert packed.batch([0]).document_ids is None
    with pytest.raises(IndexError):
        packed[[5]]


def test_rows_framing_reproduces_mdlm_rows_by_hand():
    """MDLM / bd3lms wrapping: EOS after every document, the stream cut into chunks of L - 2, every row
    [BOS] chunk [EOS]; the partial last chunk is dropped and counted."""
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    packed = pack_documents(docs, seq_len=5, bos=BOS, eos=EOS, document_ids=True)
    # stream: 1 2 3 101 4 101 5 6 7 8 9 101 (12 tokens) → chunks of 3: [1 2 3] [101 4 101] [5 6 7] [8 9 101]
    assert packed[:].tolist() == [
        [100, 1, 2, 3, 101],
        [100, 101, 4, 101, 101],
        [100, 5, 6, 7, 101],
        [100, 8, 9, 101, 101],
    ]
    assert packed.batch([1, 3]).document_ids.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    s = packed.stats
    assert (s.rows, s.tail_tokens, s.separators, s.row_specials, s.framing) == (4, 0, 3, 8, "rows")
    assert s.rows * (s.seq_len - 2) + s.tail_tokens == s.tokens + s.separators


def test_rows_framing_with_one_special_token_and_a_partial_tail():
    """GPT-2 style (BOS = EOS = <|endoftext|>): the same rows, every special the one id."""
    packed = pack_documents([[1, 2], [3, 4, 5]], seq_len=4, bos=EOS, eos=EOS)
    # stream: 1 2 101 3 4 5 101 (7 tokens) → chunks of 2: [1 2] [101 3] [4 5], 1 token left
    assert packed[:].tolist() == [[101, 1, 2, 101], [101, 101, 3, 101], [101, 4, 5, 101]]
    assert packed.stats.tail_tokens == 1


def test_hello_world_row_in_the_paper_framing():
    tok = load_tokenizer("bert-base-uncased")
    packed = pack_documents([tok.encode("Hello world")], 5, tok.bos_id, tok.eos_id)
    assert packed[0].tolist() == [101, 7592, 2088, 102, 102]  # [CLS] hello world [SEP] | row-final [SEP]


@pytest.mark.parametrize("seq_len", [3, 7, 16])
def test_rows_framing_matches_a_list_reference_on_random_corpora(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(0, 50, rng.integers(1, 40)).tolist() for _ in range(60)]
    stream = [t for doc in docs for t in [*doc, EOS]]
    width = seq_len - 2
    want = [[BOS, *stream[r * width : (r + 1) * width], EOS] for r in range(len(stream) // width)]
    packed = pack_documents(docs, seq_len, BOS, EOS, document_ids=True)
    assert packed[:].tolist() == want and packed.stats.tail_tokens == len(stream) % width
