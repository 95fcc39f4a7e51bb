"""Where documents come from: plain-text files (read as bytes here, so undecodable bytes are counted, not lost)
and HuggingFace `datasets` (hub by name, a directory saved with `save_to_disk`, or json/parquet/csv files).

A source is a list of *units* — one per text file, one per dataset — each a fixed-order run of documents that
can be read by index range in any process. That is what lets preparation split work into shards.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.data.recipes import SourceSpec

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_PARAGRAPH_BREAK = re.compile(rb"\r?\n(?:[ \t\f\v]*\r?\n)+")  # one or more blank (whitespace-only) lines
_READ_BATCH = 1000


@dataclass
class Unit:
    """One text file or one dataset: `count` documents addressable by index."""

    kind: str  # "text" | "dataset"
    key: str  # a path (text) or a description of the dataset, for messages and the manifest
    fingerprint: str  # changes whenever the documents could have changed
    count: int
    ref: dict  # how a worker reopens it (picklable)
    starts: np.ndarray | None = None  # text: byte offset where each document starts
    ends: np.ndarray | None = None  # text: byte offset where each document ends


# ---- counting undecodable bytes ------------------------------------------------------------------------------

_BAD_BYTES = [0]


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _BAD_BYTES[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("sad3-count", _count_and_replace)


def decode_counting(raw: bytes) -> tuple[str, int]:
    """UTF-8 text with each undecodable byte run replaced by U+FFFD, and how many bytes were replaced."""
    before = _BAD_BYTES[0]
    text = raw.decode("utf-8", errors="sad3-count")
    return text, _BAD_BYTES[0] - before


# ---- plain-text files ----------------------------------------------------------------------------------------


def document_spans(data: bytes, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte [start, end) of every document in `data`. Paragraphs are separated by blank lines; lines by newlines
    (a trailing newline does not open an empty last line); `file` is the whole text as one document. Readers strip
    paragraphs and lines of surrounding whitespace; a whitespace-only one is an empty document (counted)."""
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if mode == "file":
        return np.array([0], np.int64), np.array([len(data)], np.int64)
    if mode == "line":
        newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == 10).astype(np.int64)
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [len(data)]])
        if data.endswith(b"\n"):
            starts, ends = starts[:-1], ends[:-1]
        return starts, ends
    breaks = [(m.start(), m.end()) for m in _PARAGRAPH_BREAK.finditer(data)]
    starts = np.array([0] + [e for _, e in breaks], np.int64)
    ends = np.array([s for s, _ in breaks] + [len(data)], np.int64)
    keep = ends > starts  # a break at the very start or end of the file bounds no document
    return starts[keep], ends[keep]


def expand_paths(patterns: list[str], where: str) -> list[Path]:
    """Globs (relative to the working directory, then to the repository) → existing paths, in sorted order."""
    paths: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(pattern)) or sorted(glob.glob(str(REPO_ROOT / pattern)))
        if not matches:
            raise Sad3Error(f"{where}: {pattern!r} not found: point it at existing files or a saved dataset directory")
        paths.extend(Path(m) for m in matches)
    return paths


def _text_unit(path: Path, mode: str) -> Unit:
    data = path.read_bytes()
    starts, ends = document_spans(data, mode)
    digest = hashlib.sha256(data).hexdigest()
    return Unit(
        "text", str(path), f"sha256:{digest}:{mode}", len(starts), {"path": str(path), "mode": mode}, starts, ends
    )


def read_text_documents(ref: dict, byte_start: int, byte_end: int, count: int) -> Iterator[tuple[str, int]]:
    """The `count` documents in bytes [byte_start, byte_end) of a text file, with undecodable bytes per document."""
    with open(ref["path"], "rb") as f:
        f.seek(byte_start)
        data = f.read(byte_end - byte_start)
    starts, ends = document_spans(data, ref["mode"])
    if len(starts) != count:
        raise Sad3Error(f"{ref['path']!r} changed while it was being prepared: run the preparation again")
    strip = ref["mode"] != "file"  # a paragraph or line does not own the whitespace around it
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        text, bad = decode_counting(data[s:e])
        text = text.replace("\r\n", "\n")  # universal newlines, as Python's text mode reads files
        yield (text.strip() if strip else text), bad


# ---- datasets --------------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@lru_cache(maxsize=8)
def _open_dataset(ref_items: tuple):
    """A `datasets.Dataset` for a unit's ref (cached per process; forked workers inherit the parent's)."""
    try:
        import datasets
    except ImportError:
        raise Sad3Error(
            "reading hub datasets, saved datasets or json/parquet/csv files needs `pip install datasets`"
        ) from None

    ref = dict(ref_items)
    paths = list(ref["path"])
    try:
        if paths and Path(paths[0]).is_dir():
            loaded = datasets.load_from_disk(paths[0])
            if isinstance(loaded, datasets.DatasetDict):
                if ref["split"] not in loaded:
                    raise Sad3Error(
                        f"saved dataset {paths[0]!r} has splits {sorted(loaded)}, not {ref['split']!r}: set the split"
                    )
                loaded = loaded[ref["split"]]
        elif paths:
            builder = DATASET_BUILDERS[Path(paths[0]).suffix.lower()]
            loaded = datasets.load_dataset(builder, data_files=paths, split="train")
        else:
            loaded = datasets.load_dataset(ref["dataset"], ref["config"], split=ref["split"], revision=ref["revision"])
    except Sad3Error:
        raise
    except Exception as err:  # hub unreachable, missing split, malformed files: one line that says what to do
        if paths:
            raise Sad3Error(f"could not read {paths[0]!r} as a dataset ({_first_line(err)}): check the files") from None
        raise Sad3Error(
            f"could not load {ref['dataset']!r} from the hub ({_first_line(err)}): use a local copy (a saved dataset "
            "directory or files) through the recipe's source.path, or --zero-shot-path for sad3 eval"
        ) from None
    if ref["text_field"] not in loaded.column_names:
        raise Sad3Error(
            f"dataset {where_of(ref)} has no column {ref['text_field']!r} (columns: {loaded.column_names}): set text_field"
        )
    return loaded.select_columns([ref["text_field"]])


def where_of(ref: dict) -> str:
    return repr(ref["path"][0]) if ref["path"] else f"{ref['dataset']!r} ({ref['config'] or 'default'}, {ref['split']})"


def _dataset_unit(spec: SourceSpec, paths: list[Path]) -> Unit:
    ref = {
        "path": tuple(str(p) for p in paths),
        "dataset": spec.dataset,
        "config": spec.config,
        "revision": spec.revision,
        "split": spec.split,
        "text_field": spec.text_field,
    }
    ds = _open_dataset(tuple(sorted(ref.items())))
    return Unit("dataset", where_of(ref), f"datasets:{ds._fingerprint}:{spec.text_field}", len(ds), ref)


def read_dataset_documents(ref: dict, start: int, stop: int) -> Iterator[tuple[str, int]]:
    """Documents [start, stop) of a dataset unit; a missing (null) text is an empty document."""
    ds = _open_dataset(tuple(sorted(ref.items())))
    field_name = ref["text_field"]
    for lo in range(start, stop, _READ_BATCH):
        for text in ds[lo : min(stop, lo + _READ_BATCH)][field_name]:
            if text is not None and not isinstance(text, str):
                raise Sad3Error(
                    f"column {field_name!r} of {where_of(ref)} holds {type(text).__name__}, not text: set text_field"
                )
            yield text or "", 0


def open_units(spec: SourceSpec, where: str) -> list[Unit]:
    """The units of one split's source, in document order."""
    if not spec.path:
        return [_dataset_unit(spec, [])]
    paths = expand_paths(spec.path, f"{where}.path")
    dirs = [p for p in paths if p.is_dir()]
    if dirs:
        if len(paths) > 1:
            raise Sad3Error(f"{where}.path mixes a saved dataset directory with other paths: give one directory")
        return [_dataset_unit(spec, dirs)]
    suffixes = {p.suffix.lower() for p in paths}
    if suffixes <= set(DATASET_BUILDERS) and len({DATASET_BUILDERS[s] for s in suffixes}) == 1:
        return [_dataset_unit(spec, paths)]
    if suffixes & set(DATASET_BUILDERS):
        raise Sad3Error(f"{where}.path mixes file types {sorted(suffixes)}: give plain-text files or one data format")
    return [_text_unit(p, spec.documents) for p in paths]
