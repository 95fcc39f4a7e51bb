"""`sad3 data prepare`: a recipe's documents → token shards, in parallel, resumable, with a manifest.

The plan cuts every split into shards of at most `shard_documents` documents, each with a fingerprint of exactly
what goes into it (source fingerprints, document ranges, tokenizer, text cleaning). A shard whose sidecar carries
the same fingerprint and whose files are intact is kept; anything else is rebuilt. The same recipe therefore gives
the same shards, checksums and manifest whether it ran once, was interrupted, or was resumed with other settings
for `workers`. Nothing is dropped silently: empty documents, documents that tokenize to nothing, undecodable bytes
(replaced by U+FFFD) and empty files are counted in the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.data.detokenizers import get_detokenizer
from sad3_megatron.data.recipes import DataRecipe
from sad3_megatron.data.shards import (
    FORMAT,
    MANIFEST,
    ShardWriter,
    shard_files,
    shard_is_intact,
    token_dtype,
    write_json_atomic,
)
from sad3_megatron.data.sources import Unit, open_units, read_dataset_documents, read_text_documents
from sad3_megatron.data.tokenizers import Tokenizer, load_tokenizer

_ENCODE_BATCH = 256  # documents per tokenizer call
# Bump when the text → document → token rules change, so fingerprints (and cached preparations) change with them.
PROCESSING_VERSION = 1
SKIP_KEYS = ("empty_documents", "documents_without_tokens", "undecodable_bytes")


def default_cache_dir() -> Path:
    """Where recipes without an output_dir are prepared: $SAD3_DATA_CACHE, else ~/.cache/sad3/data."""
    return Path(os.environ.get("SAD3_DATA_CACHE") or Path.home() / ".cache" / "sad3" / "data").expanduser()


@dataclass
class Piece:
    unit: int  # index into Plan.units
    start: int  # documents [start, stop) of that unit
    stop: int
    byte_start: int = 0  # text units: the bytes holding those documents
    byte_end: int = 0


@dataclass
class ShardTask:
    split: str
    index: int
    pieces: list[Piece]
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return f"{self.split}/{self.split}-{self.index:05d}"

    @property
    def documents(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)


@dataclass
class Plan:
    units: list[Unit]
    tasks: list[ShardTask]
    split_sources: dict[str, list[str]]
    empty_files: dict[str, list[str]]
    settings: dict
    fingerprint: str = ""


@dataclass
class PrepareResult:
    root: Path
    manifest: dict
    built: list[str] = field(default_factory=list)  # shards written by this call
    reused: list[str] = field(default_factory=list)  # complete shards kept from an earlier call

    def summary(self, name: str) -> str:
        """One line: documents and tokens per split, shards built and kept, what was skipped."""
        m = self.manifest
        splits = ", ".join(
            f"{split} {s['documents']:,} docs / {s['tokens']:,} tokens in {len(s['shards'])} shard(s)"
            for split, s in m["splits"].items()
        )
        skipped = ", ".join(f"{v if isinstance(v, int) else len(v)} {k.replace('_', ' ')}" for k, v in m["skipped"].items())
        return (
            f"{name} ({m['tokenizer']['name']}) -> {self.root}: {splits}; {len(self.built)} shard(s) built, "
            f"{len(self.reused)} kept; skipped: {skipped}; manifest {self.root / 'manifest.json'}"
        )


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _settings(recipe: DataRecipe, tokenizer: Tokenizer) -> dict:
    """Everything besides the source documents that decides a shard's bytes."""
    return {
        "format": FORMAT,
        "processing": PROCESSING_VERSION,
        "tokenizer": tokenizer.identity(),
        "dtype": token_dtype(len(tokenizer.hf)).name,
        "detokenizer": recipe.detokenizer,
        "collapse_whitespace": recipe.collapse_whitespace,
    }


def _cut_into_shards(split: str, selected: list[tuple[int, Unit, int, int]], size: int) -> list[ShardTask]:
    """Consecutive shards of at most `size` documents over the selected (unit, start, stop) ranges, in order;
    a shard may span units. An empty split still gets one (empty) shard, so every split has a file to read."""
    shards: list[ShardTask] = []
    pieces: list[Piece] = []
    room = size
    for u, unit, start, stop in selected:
        while start < stop:
            take = min(stop - start, room)
            piece = Piece(u, start, start + take)
            if unit.kind == "text":
                piece.byte_start, piece.byte_end = int(unit.starts[start]), int(unit.ends[start + take - 1])
            pieces.append(piece)
            start, room = start + take, room - take
            if room == 0:
                shards.append(ShardTask(split, len(shards), pieces))
                pieces, room = [], size
    if pieces or not shards:
        shards.append(ShardTask(split, len(shards), pieces))
    return shards


def make_plan(recipe: DataRecipe, tokenizer: Tokenizer) -> Plan:
    """Open every split's sources and cut their selected documents into shard tasks."""
    units: list[Unit] = []
    seen: dict[tuple[str, str], int] = {}
    tasks: list[ShardTask] = []
    sources: dict[str, list[str]] = {}
    empty_files: dict[str, list[str]] = {}
    settings = _settings(recipe, tokenizer)
    for split, spec in recipe.splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise Sad3Error(f"split name {split!r} must be letters, digits or underscores")
        split_units = []
        for unit in open_units(spec, f"splits.{split}"):
            key = (unit.key, unit.fingerprint)
            if key not in seen:
                seen[key] = len(units)
                units.append(unit)
            split_units.append(seen[key])
        sources[split] = [units[u].key for u in split_units]
        empty_files[split] = [units[u].key for u in split_units if units[u].kind == "text" and units[u].count == 0]
        counts = [units[u].count for u in split_units]
        if spec.per_file:
            ranges = [spec.document_range(c) for c in counts]
        else:  # one slice of the concatenation, intersected with each unit
            lo, hi = spec.document_range(sum(counts))
            offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
            ranges = [(min(max(lo - o, 0), c), min(max(hi - o, 0), c)) for o, c in zip(offsets, counts, strict=False)]
        tasks += _cut_into_shards(
            split, [(u, units[u], a, b) for u, (a, b) in zip(split_units, ranges, strict=True)], recipe.shard_documents
        )
    for task in tasks:
        task.fingerprint = _digest(
            {"settings": settings, "pieces": [[units[p.unit].fingerprint, p.start, p.stop] for p in task.pieces]}
        )
    plan = Plan(units, tasks, sources, empty_files, settings)
    plan.fingerprint = _digest({"settings": settings, "shards": [[t.name, t.fingerprint] for t in tasks]})
    return plan


# ---- one shard (runs in a worker process) ------------------------------------------------------------------------


@dataclass
class _Job:
    root: str
    name: str
    fingerprint: str
    tokenizer: str
    dtype: str
    detokenizer: str | None
    collapse_whitespace: bool
    pieces: list[tuple[str, str, dict, int, int, int, int]]  # (kind, key, ref, start, stop, byte_start, byte_end)


_TOKENIZERS: dict[str, Tokenizer] = {}  # the caller's tokenizer, inherited by forked workers


def _worker_tokenizer(name: str) -> Tokenizer:
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def _documents(piece: tuple) -> Iterator[tuple[str, int]]:
    kind, _, ref, start, stop, byte_start, byte_end = piece
    if kind == "text":
        return read_text_documents(ref, byte_start, byte_end, stop - start)
    return read_dataset_documents(ref, start, stop)


def build_shard(job: _Job) -> dict:
    """Tokenize one shard's documents and write shard + sidecar; returns the sidecar."""
    tokenizer = _worker_tokenizer(job.tokenizer)
    detokenize = get_detokenizer(job.detokenizer)
    dtype = np.dtype(job.dtype)
    prefix = Path(job.root) / job.name
    prefix.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(prefix, dtype)
    skipped: Counter = Counter({k: 0 for k in SKIP_KEYS})
    undecodable: Counter = Counter()

    def flush(batch: list[str]) -> None:
        for ids in tokenizer.encode_batch(batch):
            if ids:
                writer.add(np.asarray(ids, dtype=dtype))
            else:
                skipped["documents_without_tokens"] += 1

    for piece in job.pieces:
        batch: list[str] = []
        for text, bad_bytes in _documents(piece):
            if bad_bytes:
                skipped["undecodable_bytes"] += bad_bytes
                undecodable[piece[1]] += bad_bytes
            if job.collapse_whitespace:
                text = " ".join(text.split())
            if detokenize is not None:
                text = detokenize(text)
            if not text.strip():
                skipped["empty_documents"] += 1
                continue
            batch.append(text)
            if len(batch) == _ENCODE_BATCH:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    sidecar = {
        "name": job.name,
        "fingerprint": job.fingerprint,
        **writer.close(),
        "skipped": dict(skipped),
        "undecodable_bytes_by_source": dict(sorted(undecodable.items())),
    }
    write_json_atomic(Path(str(prefix) + ".json"), sidecar)
    return sidecar


# ---- the whole recipe ----------------------------------------------------------------------------------------------


def _read_sidecar(prefix: Path) -> dict | None:
    try:
        return json.loads(Path(str(prefix) + ".json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _remove_strays(root: Path, plan: Plan) -> None:
    """Delete partial writes and shards no longer in the plan (only files named like ours)."""
    expected = {p.name for t in plan.tasks for p in shard_files(root / t.name)}
    for split_dir in (d for d in root.iterdir() if d.is_dir()):
        pattern = re.compile(rf"{re.escape(split_dir.name)}-\d{{5}}(\.partial)?\.(bin|idx|json)(\.tmp)?")
        for path in split_dir.iterdir():
            if pattern.fullmatch(path.name) and path.name not in expected:
                path.unlink()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One preparer per directory at a time (e.g. several ranks of one node starting together)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(jobs: list[_Job], workers: int, done: Callable[[dict], None]) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            done(build_shard(job))
        return
    # fork: workers inherit the loaded tokenizer and any opened dataset instead of re-importing everything.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; no thread pool per process
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context(method)) as pool:
            futures = [pool.submit(build_shard, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    done(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _job(root: Path, task: ShardTask, plan: Plan, recipe: DataRecipe, tokenizer: Tokenizer) -> _Job:
    pieces = []
    for p in task.pieces:
        unit = plan.units[p.unit]
        pieces.append((unit.kind, unit.key, unit.ref, p.start, p.stop, p.byte_start, p.byte_end))
    return _Job(
        str(root),
        task.name,
        task.fingerprint,
        tokenizer.name,
        plan.settings["dtype"],
        recipe.detokenizer,
        recipe.collapse_whitespace,
        pieces,
    )


def _manifest(recipe: DataRecipe, plan: Plan, sidecars: dict[str, dict]) -> dict:
    provenance = {k: v for k, v in recipe.to_dict().items() if k not in ("workers", "output_dir")}
    splits: dict[str, dict] = {}
    totals: Counter = Counter({k: 0 for k in SKIP_KEYS})
    for split in recipe.splits:
        shards = [sidecars[t.name] for t in plan.tasks if t.split == split]
        skipped: Counter = Counter({k: 0 for k in SKIP_KEYS})
        for shard in shards:
            skipped.update(shard["skipped"])
        totals.update(skipped)
        splits[split] = {
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "sources": plan.split_sources[split],
            "skipped": {**dict(skipped), "empty_files": plan.empty_files[split]},
            "shards": shards,
        }
    totals["empty_files"] = sum(len(v) for v in plan.empty_files.values())
    return {
        "format": FORMAT,
        "name": recipe.name,
        "fingerprint": plan.fingerprint,
        "complete": True,
        "tokenizer": plan.settings["tokenizer"],
        "dtype": plan.settings["dtype"],
        "recipe": provenance,
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "skipped": dict(totals),
        "splits": splits,
    }


def prepare(
    recipe: DataRecipe,
    tokenizer: Tokenizer | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    verify: bool = True,
    progress: bool = False,
) -> PrepareResult:
    """Prepare (or finish preparing) `recipe` into its output directory and return the manifest.

    `verify` re-hashes kept shards (catches corruption that keeps file sizes); without it only sizes are checked.
    """
    tokenizer = tokenizer or load_tokenizer(recipe.tokenizer)
    _TOKENIZERS[tokenizer.name] = tokenizer
    plan = make_plan(recipe, tokenizer)
    root = Path(recipe.output_dir).expanduser() if recipe.output_dir else None
    root = root or Path(cache_dir or default_cache_dir()) / f"{recipe.name}-{plan.fingerprint[:16]}"
    workers = workers if workers is not None else recipe.workers
    workers = workers or os.cpu_count() or 1
    result = PrepareResult(root, {})
    with _locked(root):
        _remove_strays(root, plan)
        sidecars: dict[str, dict] = {}
        pending: list[ShardTask] = []
        for task in plan.tasks:
            sidecar = _read_sidecar(root / task.name)
            if (
                sidecar
                and sidecar.get("fingerprint") == task.fingerprint
                and shard_is_intact(root / task.name, sidecar, verify)
            ):
                sidecars[task.name] = sidecar
                result.reused.append(task.name)
            else:
                for path in reversed(shard_files(root / task.name)):  # sidecar first: it marks completeness
                    path.unlink(missing_ok=True)
                pending.append(task)
        if pending:  # the directory is incomplete until the new manifest is written
            (root / MANIFEST).unlink(missing_ok=True)
        jobs = [_job(root, task, plan, recipe, tokenizer) for task in pending]
        from tqdm.auto import tqdm

        total = sum(t.documents for t in plan.tasks)
        with tqdm(
            total=total, unit="doc", desc=f"prepare {recipe.name}", disable=not progress, dynamic_ncols=True
        ) as bar:
            bar.update(sum(t.documents for t in plan.tasks if t.name in sidecars))
            sizes = {t.name: t.documents for t in pending}

            def done(sidecar: dict) -> None:
                sidecars[sidecar["name"]] = sidecar
                result.built.append(sidecar["name"])
                bar.update(sizes[sidecar["name"]])

            _run(jobs, workers, done)
        manifest = _manifest(recipe, plan, sidecars)
        path = root / MANIFEST
        if not path.is_file() or json.loads(path.read_text()) != manifest:
            write_json_atomic(path, manifest)
    result.manifest = manifest
    return result
