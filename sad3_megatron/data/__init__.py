"""Tokenizers, the text → token-sequence path, and the deterministic batch sampler."""

from sad3_megatron.data.corpus import Corpus, CorpusStats, load_corpus, pack, pack_files
from sad3_megatron.data.sampler import batch_rows
from sad3_megatron.data.tokenizers import Tokenizer, load_tokenizer

__all__ = ["Corpus", "CorpusStats", "Tokenizer", "batch_rows", "load_corpus", "load_tokenizer", "pack", "pack_files"]
