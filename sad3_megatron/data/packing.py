"""Concatenate-and-wrap (Suppl. F), in one of two framings, no padding, no truncation:

- `rows` (the default; MDLM's and the paper's, bd3lms `_group_texts` with `insert_eos`): every document is
  followed by EOS, the documents are laid end to end, the stream is cut into chunks of L - 2 tokens and every
  row is `[BOS] chunk [EOS]`. Position 0 of every row is the BOS, which the objectives keep as clean,
  unscored context; the row-final EOS is a target like any token.
- `documents`: documents framed as [BOS] doc [EOS] — one separator when BOS = EOS, as for GPT-2 — laid end to end
  and cut into rows of L tokens.

A document longer than a row simply continues in the next row. The final partial row is not used and its tokens
are counted.

Rows are assembled on demand from the shards' flat token arrays (memory-mapped), so a corpus of any size costs
one int64 per document in memory. With `document_ids=True` each row also carries, per position, the index of the
document it belongs to (0, 1, ... within the row; separators belong to their document), so attention can be kept
inside documents. With per-token `scored` flags (chat data, data/chat.py: the answers), each row also carries
which positions are scored; a separator BOS is not, a document's closing EOS is scored when the document's last
token is (an answer's end is the end of the conversation), and in `rows` framing the row-final EOS follows the
position before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PackingStats:
    seq_len: int
    documents: int
    tokens: int  # document tokens, separators excluded
    separators: int  # BOS/EOS tokens added between documents
    rows: int
    tail_tokens: int  # tokens of the stream's final partial row (not used; counted, not silently lost)
    documents_longer_than_context: int  # framed length > a row's content: spread over several rows
    framing: str = "documents"
    row_specials: int = 0  # `rows` framing: the BOS and EOS that open and close every row

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    tokens: np.ndarray  # [b, L] int64
    document_ids: np.ndarray | None  # [b, L] int64: which document (counted from 0 in each row) a position is in
    scored: np.ndarray | None = None  # [b, L] bool: positions whose tokens are scored (None: all of them)


class PackedSequences:
    """The wrapped rows of one split. Indexing with an int, a slice or an index array returns the token rows
    (a numpy array, so it drops into code that expects `[n, L]` arrays); `batch(...)` adds the document ids."""

    def __init__(
        self,
        parts: Sequence[np.ndarray],
        lengths: Sequence[np.ndarray],
        seq_len: int,
        bos: int,
        eos: int,
        document_ids: bool = False,
        framing: str = "rows",
        scored: Sequence[np.ndarray] | None = None,
    ):
        if framing not in ("rows", "documents"):
            raise ValueError(f"framing must be rows or documents, got {framing!r}")
        if seq_len < (3 if framing == "rows" else 1):
            raise ValueError(f"seq_len {seq_len} too short for framing {framing!r}")
        self.seq_len, self.bos, self.eos, self.document_ids = seq_len, bos, eos, document_ids
        self.framing = framing
        self._content = seq_len - 2 if framing == "rows" else seq_len  # stream tokens per row
        self._parts = list(parts)
        self._scored = None if scored is None else [np.asarray(p, dtype=bool) for p in scored]
        if self._scored is not None and [len(p) for p in self._scored] != [len(p) for p in self._parts]:
            raise ValueError("scored flags must match the tokens part by part")
        self._part_starts = np.concatenate([[0], np.cumsum([len(p) for p in self._parts])]).astype(np.int64)
        doc_lengths = np.concatenate([np.asarray(x, np.int64) for x in lengths]) if lengths else np.zeros(0, np.int64)
        if doc_lengths.sum() != self._part_starts[-1]:
            raise ValueError("document lengths do not add up to the tokens given")
        self._k = 1 if bos == eos or framing == "rows" else 2  # separators per document
        # _frame_starts[d]: where document d's frame ([BOS] tokens EOS, or tokens EOS) starts in the stream.
        self._frame_starts = np.concatenate([[0], np.cumsum(doc_lengths + self._k)]).astype(np.int64)
        total, width = int(self._frame_starts[-1]), self._content
        self.stats = PackingStats(
            seq_len=seq_len,
            documents=len(doc_lengths),
            tokens=int(doc_lengths.sum()),
            separators=self._k * len(doc_lengths),
            rows=total // width,
            tail_tokens=total % width,
            documents_longer_than_context=int(((doc_lengths + self._k) > width).sum()),
            framing=framing,
            row_specials=2 * (total // width) if framing == "rows" else 0,
        )

    def __len__(self) -> int:
        return self.stats.rows

    @property
    def has_scored(self) -> bool:
        """Whether rows carry a scored mask (only some tokens are targets)."""
        return self._scored is not None

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return self.batch(np.array([index])).tokens[0]
        return self.batch(index).tokens

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)

    def _rows(self, index) -> np.ndarray:
        n = len(self)
        if isinstance(index, slice):
            return np.arange(*index.indices(n), dtype=np.int64)
        rows = np.asarray(index, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return np.where(rows < 0, rows + n, rows)

    def _gather(self, flat: np.ndarray, parts: list[np.ndarray] | None = None, dtype=np.int64) -> np.ndarray:
        """Values (tokens, or `parts`' values) at positions of the concatenation of all parts."""
        parts = self._parts if parts is None else parts
        if len(parts) == 1:
            return np.asarray(parts[0][flat], dtype=dtype)
        out = np.empty(flat.shape, dtype)
        part = np.searchsorted(self._part_starts, flat, side="right") - 1
        for p in np.unique(part):
            here = part == p
            out[here] = parts[p][flat[here] - self._part_starts[p]]
        return out

    def batch(self, index) -> Batch:
        tokens, docs, scored = self._stream_window(self._rows(index))
        if self.framing == "rows":  # [BOS] chunk [EOS]; the specials belong to the chunk's first / last document
            b = len(tokens)
            tokens = np.hstack([np.full((b, 1), self.bos), tokens, np.full((b, 1), self.eos)])
            docs = np.hstack([docs[:, :1], docs, docs[:, -1:]])
            if scored is not None:
                scored = np.hstack([np.zeros((b, 1), bool), scored, scored[:, -1:]])
        return Batch(tokens, docs if self.document_ids else None, scored)

    def _stream_window(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The stream tokens of `rows` [b, content], per position its document counted from 0 in the row, and
        (with scored flags) which positions are scored."""
        b, L, k, V = len(rows), self._content, self._k, self._frame_starts
        starts = rows * L
        first = np.searchsorted(V, starts, side="right") - 1  # document at each row's first position
        last = np.searchsorted(V, starts + L - 1, side="right") - 1
        # Document index per position: the first document plus the document starts passed so far.
        marks = np.zeros((b, L), np.int64)
        starts_inside = last - first
        if starts_inside.sum():
            row_of = np.repeat(np.arange(b), starts_inside)
            nth = np.arange(len(row_of)) - np.repeat(np.cumsum(starts_inside) - starts_inside, starts_inside)
            doc = first[row_of] + 1 + nth
            marks[row_of, V[doc] - starts[row_of]] = 1
        docs = first[:, None] + np.cumsum(marks, axis=1)
        offset = starts[:, None] + np.arange(L) - V[docs]  # position inside the document's frame
        frame = V[docs + 1] - V[docs]
        is_eos = offset == frame - 1
        is_bos = (offset == 0) if k == 2 else np.zeros_like(is_eos)
        tokens = np.empty((b, L), np.int64)
        tokens[is_eos] = self.eos
        tokens[is_bos] = self.bos
        inner = ~(is_eos | is_bos)
        # Token position in the flat arrays: the document's first token (frame start minus the separators
        # of earlier documents) plus the offset past its BOS.
        flat = V[docs] - k * docs + offset - (k - 1)
        tokens[inner] = self._gather(flat[inner])
        scored = None
        if self._scored is not None:
            scored = np.zeros((b, L), bool)
            scored[inner] = self._gather(flat[inner], self._scored, bool)
            # A document's EOS follows its last token (offset frame - 2; none when the document is empty).
            closes = is_eos & (frame > k)
            last = V[docs] - k * docs + frame - 2 - (k - 1)
            scored[closes] = self._gather(last[closes], self._scored, bool)
        return tokens, docs - first[:, None], scored


def pack_documents(
    documents: Sequence[Sequence[int]],
    seq_len: int,
    bos: int,
    eos: int,
    document_ids: bool = False,
    framing: str = "rows",
    scored: Sequence[Sequence[bool]] | None = None,
) -> PackedSequences:
    """Pack token lists held in memory (tests, small evaluation sets, chat data) exactly as shards are
    packed; `scored` gives per-token flags of the same shape as `documents`."""
    lengths = np.array([len(d) for d in documents], np.int64)
    flat = np.fromiter((t for d in documents for t in d), np.int64, count=int(lengths.sum()))
    flags = None
    if scored is not None:
        flags = [np.fromiter((f for d in scored for f in d), bool, count=int(lengths.sum()))]
    return PackedSequences([flat], [lengths], seq_len, bos, eos, document_ids, framing, flags)
