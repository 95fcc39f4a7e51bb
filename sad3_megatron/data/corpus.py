"""Training and evaluation sequences. Every way of naming data — a config's text files, a recipe YAML, a prepared
directory, text files to evaluate on, a zero-shot set — goes through the same path: prepare into token shards
(on first use, into a cache directory keyed by the content's fingerprint; later uses only check it), then pack.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.data.chat import load_chat
from sad3_megatron.data.packing import PackedSequences, pack_documents
from sad3_megatron.data.preparation import default_cache_dir, prepare
from sad3_megatron.data.recipes import DataRecipe, files_recipe, load_recipe
from sad3_megatron.data.shards import MANIFEST, PreparedData, open_prepared
from sad3_megatron.data.sources import REPO_ROOT, expand_paths
from sad3_megatron.data.tokenizers import Tokenizer, load_tokenizer
from sad3_megatron.data.zero_shot import zero_shot_recipe

if TYPE_CHECKING:
    from sad3_megatron.config import DataConfig

PACKINGS = ("wrap", "document")  # document: rows carry document ids so attention can stay inside documents


@dataclass
class CorpusStats:
    """What the run trained on; written to the run directory as data_stats.json."""

    prepared: str  # the prepared directory (its manifest.json lists shards, checksums and skipped counts)
    fingerprint: str
    tokenizer: str
    packing: str
    framing: str
    documents: int
    tokens: int
    skipped: dict
    train: dict  # PackingStats of the training split
    val: dict


@dataclass
class Corpus:
    train: PackedSequences
    val: PackedSequences
    stats: CorpusStats


def _check_tokenizer(prepared: PreparedData, tokenizer: Tokenizer) -> None:
    made = prepared.manifest["tokenizer"]
    if (made["vocab_hash"], made["bos_id"], made["eos_id"]) != (
        tokenizer.vocab_hash,
        tokenizer.bos_id,
        tokenizer.eos_id,
    ):
        raise Sad3Error(
            f"{str(prepared.root)!r} was prepared with tokenizer {made['name']!r}, the model uses {tokenizer.name!r}: set data.tokenizer={made['name']} or prepare again"
        )


def prepared_data(source: DataRecipe | Path, tokenizer: Tokenizer, cache_dir: str | Path | None = None) -> PreparedData:
    """Open a prepared directory, or prepare a recipe first (a no-op beyond size checks when already complete)."""
    if isinstance(source, Path):
        prepared = open_prepared(source)
    else:
        if source.tokenizer != tokenizer.name and load_tokenizer(source.tokenizer).vocab_hash != tokenizer.vocab_hash:
            raise Sad3Error(
                f"recipe {source.name!r} tokenizes with {source.tokenizer!r}, the model uses {tokenizer.name!r}: set data.tokenizer={source.tokenizer}"
            )
        result = prepare(source, tokenizer, cache_dir or default_cache_dir(), verify=False)
        prepared = PreparedData(result.root, result.manifest)
    _check_tokenizer(prepared, tokenizer)
    return prepared


def resolve_source(recipe: str, train_files: list[str], tokenizer: str, val_fraction: float) -> DataRecipe | Path:
    """data.recipe (a recipe YAML or a prepared directory) if set, else the text files of data.train_files."""
    if not recipe:
        return files_recipe(train_files, tokenizer, val_fraction)
    for path in (Path(recipe).expanduser(), REPO_ROOT / recipe):
        if path.is_dir():
            if not (path / MANIFEST).is_file():
                raise Sad3Error(
                    f"data.recipe={recipe!r} is a directory without {MANIFEST}: point it at a prepared directory or a recipe YAML"
                )
            return path
        if path.is_file():
            return load_recipe(path)
    raise Sad3Error(
        f"data.recipe={recipe!r} not found: give a recipe YAML (configs/data/*.yaml) or a prepared directory"
    )


def packed_split(
    prepared: PreparedData, split: str, seq_len: int, document_ids: bool = False, framing: str = "rows"
) -> PackedSequences:
    documents = prepared.split(split)
    tok = prepared.manifest["tokenizer"]
    return PackedSequences(
        documents.parts, documents.lengths, seq_len, tok["bos_id"], tok["eos_id"], document_ids, framing
    )


def load_chat_corpus(data: DataConfig, tokenizer: Tokenizer, seq_len: int) -> Corpus:
    """data.chat_files: conversations rendered with the chat template (data/chat.py), answers scored."""
    files = expand_paths(data.chat_files, "data.chat_files")
    chat = load_chat(files, tokenizer, data.val_fraction)
    by_document = data.packing == "document"

    def pack(conversations) -> PackedSequences:
        return pack_documents([c.tokens for c in conversations], seq_len, tokenizer.bos_id, tokenizer.eos_id,
                              by_document, data.framing, [c.scored for c in conversations])  # fmt: skip

    train, val = pack(chat.train), pack(chat.validation)
    if len(train) == 0 or len(val) < data.min_val_sequences:
        raise Sad3Error(
            f"chat data gives {len(train)} train / {len(val)} held-out rows of {seq_len} tokens (need 1 / "
            f"{data.min_val_sequences}): add conversations, raise data.val_fraction or lower model.seq_len ({chat.report()})"
        )
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    stats = CorpusStats(
        prepared="in memory (data.chat_files)", fingerprint=f"chat:sha256:{digest}", tokenizer=tokenizer.name,
        packing=data.packing, framing=data.framing, documents=len(chat.train) + len(chat.validation),
        tokens=train.stats.tokens + val.stats.tokens,
        skipped={"malformed_lines": len(chat.malformed), "lines": chat.malformed, "report": chat.report()},
        train=train.stats.to_dict(), val=val.stats.to_dict(),
    )  # fmt: skip
    return Corpus(train, val, stats)


def load_corpus(data: DataConfig, tokenizer: Tokenizer, seq_len: int) -> Corpus:
    """The training and validation splits named by a DataConfig, packed into rows of `seq_len`."""
    if data.packing not in PACKINGS:
        raise Sad3Error(f"unknown data.packing {data.packing!r}: choose one of {', '.join(PACKINGS)}")
    if data.chat_files:
        return load_chat_corpus(data, tokenizer, seq_len)
    source = resolve_source(data.recipe, data.train_files, data.tokenizer, data.val_fraction)
    prepared = prepared_data(source, tokenizer, data.cache_dir or None)
    manifest = prepared.manifest
    if manifest["documents"] == 0:
        raise Sad3Error(
            f"the data in {str(prepared.root)!r} holds no text ({manifest['skipped']}): point data.train_files or data.recipe at a non-empty corpus"
        )
    by_document = data.packing == "document"
    train = packed_split(prepared, "train", seq_len, by_document, data.framing)
    val = packed_split(prepared, "validation", seq_len, by_document, data.framing)
    if len(train) == 0:
        raise Sad3Error(
            f"the training split has {train.stats.tokens} tokens, too few for one sequence of {seq_len}: add text or lower model.seq_len"
        )
    if len(val) < data.min_val_sequences:
        raise Sad3Error(
            f"the held-out split has {len(val)} sequences of {seq_len} tokens (need {data.min_val_sequences}): raise data.val_fraction or add text"
        )
    stats = CorpusStats(
        prepared=str(prepared.root),
        fingerprint=manifest["fingerprint"],
        tokenizer=manifest["tokenizer"]["name"],
        packing=data.packing,
        framing=data.framing,
        documents=manifest["documents"],
        tokens=manifest["tokens"],
        skipped=manifest["skipped"],
        train=train.stats.to_dict(),
        val=val.stats.to_dict(),
    )
    return Corpus(train, val, stats)


def load_eval_sequences(
    tokenizer: Tokenizer,
    seq_len: int,
    files: list[str] | None = None,
    zero_shot: str | None = None,
    zero_shot_path: str | None = None,
    cache_dir: str | Path | None = None,
    framing: str = "rows",
) -> PackedSequences:
    """Every document of `files` (paragraphs), or zero-shot set `zero_shot` (hub, or `zero_shot_path` offline),
    prepared with the model's tokenizer and packed like the training data (`framing`: the model's data.framing)."""
    if zero_shot:
        recipe = zero_shot_recipe(zero_shot, tokenizer.name, zero_shot_path)
    elif files:
        expand_paths(files, "--data")  # name the flag in the message if a file is missing
        recipe = files_recipe(files, tokenizer.name, None, name="eval-files")
    else:
        raise Sad3Error("nothing to evaluate on: give files or a zero-shot set")
    sequences = packed_split(prepared_data(recipe, tokenizer, cache_dir), "validation", seq_len, framing=framing)
    if len(sequences) == 0:
        raise Sad3Error(
            f"{zero_shot or files} holds {sequences.stats.tokens} tokens, fewer than one sequence of {seq_len}: give more text"
        )
    return sequences
