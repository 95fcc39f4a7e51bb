"""Plain text files → documents → tokens → concatenated and wrapped sequences of length L (Suppl. F).

Documents are paragraphs (blank-line separated). The last `val_fraction` of each file's documents
is held out, so no validation sequence shares text with training. Nothing is dropped silently:
empty documents and the tokens of the final partial sequence are counted in `CorpusStats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sad3_megatron.data.tokenizers import Tokenizer
from sad3_megatron.errors import Sad3Error


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    dropped_tail_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Corpus:
    train: np.ndarray  # [n, L] int64
    val: np.ndarray  # [m, L] int64
    stats: CorpusStats


def read_documents(path: Path, stats: CorpusStats) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise Sad3Error(f"data file {str(path)!r} is not UTF-8 text (byte {err.start}): convert it to UTF-8") from None
    docs = []
    for block in text.split("\n\n"):
        doc = " ".join(block.split())
        if doc:
            docs.append(doc)
        elif block.strip("\n"):
            stats.empty_documents += 1  # whitespace-only paragraphs
    stats.files += 1
    stats.documents += len(docs)
    return docs


def pack(documents: list[list[int]], seq_len: int, bos: int, eos: int) -> tuple[np.ndarray, int]:
    """Concatenate [bos] doc [eos] (eos only when bos == eos) and wrap into rows of `seq_len`.

    Returns the rows and the number of tokens in the final partial row, which is not used.
    """
    prefix = [] if bos == eos else [bos]
    stream = [tok for doc in documents for tok in (*prefix, *doc, eos)]
    rows = len(stream) // seq_len
    return np.asarray(stream[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len), len(stream) - rows * seq_len


def _tokenized_files(files: list[Path], tokenizer: Tokenizer, stats: CorpusStats):
    for path in files:
        docs = tokenizer.encode_batch(read_documents(path, stats))
        stats.tokens += sum(len(d) for d in docs)
        yield docs


def pack_files(files: list[Path], tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, CorpusStats]:
    """Every document of `files` packed into sequences (for evaluating on held-out text)."""
    stats = CorpusStats()
    docs = [doc for file_docs in _tokenized_files(files, tokenizer, stats) for doc in file_docs]
    rows, stats.dropped_tail_tokens["eval"] = pack(docs, seq_len, tokenizer.bos_id, tokenizer.eos_id)
    if len(rows) == 0:
        raise Sad3Error(
            f"{[str(f) for f in files]} hold {stats.tokens} tokens, fewer than one sequence of {seq_len}: give more text"
        )
    return rows, stats


def load_corpus(
    files: list[Path], tokenizer: Tokenizer, seq_len: int, val_fraction: float, min_val_sequences: int = 1
) -> Corpus:
    """Training and held-out sequences; the held-out part is the tail of each file's documents."""
    stats = CorpusStats()
    train_docs: list[list[int]] = []
    val_docs: list[list[int]] = []
    for docs in _tokenized_files(files, tokenizer, stats):
        n_val = max(1, round(len(docs) * val_fraction)) if len(docs) > 1 else 0
        train_docs.extend(docs[: len(docs) - n_val])
        val_docs.extend(docs[len(docs) - n_val :])
    if stats.documents == 0:
        raise Sad3Error(
            f"data files {[str(f) for f in files]} hold no text: point data.train_files at a non-empty corpus"
        )
    train, stats.dropped_tail_tokens["train"] = pack(train_docs, seq_len, tokenizer.bos_id, tokenizer.eos_id)
    val, stats.dropped_tail_tokens["val"] = pack(val_docs, seq_len, tokenizer.bos_id, tokenizer.eos_id)
    if len(train) == 0:
        raise Sad3Error(
            f"the corpus has {stats.tokens} tokens, too few for one training sequence of {seq_len}: add text or lower model.seq_len"
        )
    if len(val) < min_val_sequences:
        raise Sad3Error(
            f"the held-out split has {len(val)} sequences of {seq_len} tokens (need {min_val_sequences}): raise data.val_fraction or add text"
        )
    return Corpus(train, val, stats)
