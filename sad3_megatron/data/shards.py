"""Token shards on disk: megatron-core's indexed_dataset format (`.bin` = the documents' tokens back to back,
`.idx` = per-document lengths and offsets), so shards interoperate with Megatron tooling, plus a JSON sidecar per
shard (counts, checksums) and one manifest per prepared directory.

Layout of a prepared directory:
    manifest.json                  written last; `complete: true` means every shard below is final
    <split>/<split>-00000.bin|.idx  one shard
    <split>/<split>-00000.json      its sidecar, written after the shard is renamed into place (= shard complete)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sad3_megatron.core.errors import Sad3Error

MANIFEST = "manifest.json"
FORMAT = "sad3-token-shards/1 (megatron-core indexed_dataset .bin/.idx, one sequence per document)"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype for the ids (uint16 for both bundled tokenizers: 2 bytes per token)."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    """Readers see the old file or the whole new one, never half of it (the rename is atomic)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class ShardWriter:
    """Writes one shard under temporary names and renames it into place on `close`, so an interrupted
    write never leaves a file that looks finished."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self._tmp = prefix.with_name(prefix.name + ".partial")
        self._builder = IndexedDatasetBuilder(str(self._tmp) + ".bin", dtype=dtype.type)
        self.documents = 0
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        import torch

        self._builder.add_item(torch.from_numpy(ids))
        self._builder.end_document()
        self.documents += 1
        self.tokens += len(ids)

    def close(self) -> dict:
        self._builder.finalize(str(self._tmp) + ".idx")
        for ext in (".bin", ".idx"):
            os.replace(str(self._tmp) + ext, str(self.prefix) + ext)
        bin_path, idx_path = Path(str(self.prefix) + ".bin"), Path(str(self.prefix) + ".idx")
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "bin_bytes": bin_path.stat().st_size,
            "idx_bytes": idx_path.stat().st_size,
            "bin_sha256": sha256_file(bin_path),
            "idx_sha256": sha256_file(idx_path),
        }


def shard_files(prefix: Path) -> list[Path]:
    return [Path(str(prefix) + ext) for ext in (".bin", ".idx", ".json")]


def shard_is_intact(prefix: Path, sidecar: dict, verify: bool) -> bool:
    """Sizes always; checksums too when `verify` (catches corruption that keeps the size)."""
    bin_path, idx_path, _ = shard_files(prefix)
    if not (bin_path.is_file() and idx_path.is_file()):
        return False
    if bin_path.stat().st_size != sidecar["bin_bytes"] or idx_path.stat().st_size != sidecar["idx_bytes"]:
        return False
    return not verify or (
        sha256_file(bin_path) == sidecar["bin_sha256"] and sha256_file(idx_path) == sidecar["idx_sha256"]
    )


@dataclass
class ShardedSplit:
    """One split's documents, read back from its shards: flat token views and per-document lengths."""

    parts: list[np.ndarray]  # per shard: every token of its documents, back to back (memory-mapped)
    lengths: list[np.ndarray]  # per shard: the length of each document

    @property
    def documents(self) -> int:
        return sum(len(x) for x in self.lengths)

    def document(self, index: int) -> np.ndarray:
        """Tokens of document `index` (counting across shards): for checks and inspection."""
        for part, lengths in zip(self.parts, self.lengths, strict=True):
            if index < len(lengths):
                start = int(lengths[:index].sum())
                return np.asarray(part[start : start + lengths[index]])
            index -= len(lengths)
        raise IndexError(index)


def read_shard(prefix: Path, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document lengths) of one shard through megatron-core's reader; tokens stay memory-mapped."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    bin_path = Path(str(prefix) + ".bin")
    empty = bin_path.stat().st_size == 0  # a split too small to hold a token: an empty file cannot be mapped
    dataset = IndexedDataset(str(prefix), mmap=not empty)
    lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    if dataset.index.dtype != dtype.type:
        raise Sad3Error(f"shard {str(prefix)!r} stores {np.dtype(dataset.index.dtype)}, the manifest says {dtype}")
    if empty:
        tokens = np.zeros(0, dtype)
    else:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")  # the same view megatron's mmap reader takes
    if len(tokens) != lengths.sum():
        raise Sad3Error(f"shard {str(prefix)!r} holds {len(tokens)} tokens, its index {lengths.sum()}: prepare again")
    return tokens, lengths


@dataclass
class PreparedData:
    """A prepared directory: its manifest and, per split, the documents read back from the shards."""

    root: Path
    manifest: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def split(self, name: str) -> ShardedSplit:
        splits = self.manifest["splits"]
        if name not in splits:
            raise Sad3Error(
                f"prepared data {str(self.root)!r} has splits {sorted(splits)}, not {name!r}: add it to the recipe"
            )
        parts, lengths = [], []
        for shard in splits[name]["shards"]:
            tokens, lens = read_shard(self.root / shard["name"], self.dtype)
            parts.append(tokens)
            lengths.append(lens)
        return ShardedSplit(parts, lengths)


def open_prepared(root: str | Path, verify: bool = False) -> PreparedData:
    """Open a prepared directory after checking its manifest says it is complete and its shards are intact."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise Sad3Error(f"{str(root)!r} holds no {MANIFEST}: run `sad3 data prepare RECIPE` to create it")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise Sad3Error(f"{str(path)!r} is not valid JSON ({err.msg}): run `sad3 data prepare` again") from None
    if not manifest.get("complete"):
        raise Sad3Error(f"{str(root)!r} was not fully prepared: run `sad3 data prepare` again to finish it")
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if not shard_is_intact(root / shard["name"], shard, verify):
                raise Sad3Error(
                    f"shard {shard['name']!r} in {str(root)!r} is missing or damaged: run `sad3 data prepare` again"
                )
    return PreparedData(root, manifest)
