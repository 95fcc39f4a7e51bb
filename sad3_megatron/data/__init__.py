"""Data: tokenizers, recipes and sources, token shards (prepare / read back), packing, and the batch sampler.

Importing this package stays light (no megatron, no `datasets`): those load when shards are written or read.
"""

from sad3_megatron.data.corpus import Corpus, CorpusStats, load_corpus, load_eval_sequences, prepared_data
from sad3_megatron.data.packing import Batch, PackedSequences, PackingStats, pack_documents
from sad3_megatron.data.preparation import PrepareResult, default_cache_dir, prepare
from sad3_megatron.data.recipes import DataRecipe, SourceSpec, files_recipe, load_recipe
from sad3_megatron.data.sampler import batch_rows
from sad3_megatron.data.shards import PreparedData, open_prepared
from sad3_megatron.data.tokenizers import Tokenizer, load_tokenizer
from sad3_megatron.data.zero_shot import ZERO_SHOT, zero_shot_recipe

__all__ = [
    "ZERO_SHOT",
    "Batch",
    "Corpus",
    "CorpusStats",
    "DataRecipe",
    "PackedSequences",
    "PackingStats",
    "PrepareResult",
    "PreparedData",
    "SourceSpec",
    "Tokenizer",
    "batch_rows",
    "default_cache_dir",
    "files_recipe",
    "load_corpus",
    "load_eval_sequences",
    "load_recipe",
    "load_tokenizer",
    "open_prepared",
    "pack_documents",
    "prepare",
    "prepared_data",
    "zero_shot_recipe",
]
