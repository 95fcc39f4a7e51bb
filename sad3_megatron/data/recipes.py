"""Data recipes: where each split's documents come from, how their text is cleaned, and which tokenizer turns
them into tokens. Recipes are YAML files (configs/data/*.yaml) plus `key=value` overrides; the same recipe reads
a hub dataset by name or, offline, a local copy (`path`: a saved dataset directory or data files).

A recipe's `source` mapping holds the settings shared by all splits; `splits.<name>` overrides them per split.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.data.detokenizers import DETOKENIZERS

DOCUMENT_MODES = ("paragraph", "line", "file")  # how a plain-text file is cut into documents


@dataclass
class SourceSpec:
    """One split's documents, in a fixed order."""

    dataset: str = ""  # hub name for datasets.load_dataset (used when `path` is empty)
    config: str | None = None  # hub configuration name
    revision: str | None = None  # hub revision, e.g. refs/convert/parquet for script-only repositories
    split: str = "train"  # hub split, or the split of a saved DatasetDict
    path: list[str] = field(default_factory=list)  # local copy: a saved dataset directory, or files/globs
    text_field: str = "text"  # column holding the text (datasets and json/parquet/csv files)
    documents: str = "paragraph"  # plain-text files: paragraph (blank-line separated) | line | file
    select: list[int | None] | None = (
        None  # [start, stop] document slice (Python semantics; negatives count from the end)
    )
    fraction: list[float] | None = None  # [start, stop] as fractions of the document count
    per_file: bool = False  # apply select/fraction to each text file separately instead of to their concatenation

    def document_range(self, count: int) -> tuple[int, int]:
        """The [start, stop) documents this split takes out of `count`."""
        if self.select is not None:
            start, stop, _ = slice(*self.select).indices(count)
            return start, max(start, stop)
        if self.fraction is not None:
            # Both splits of a recipe round the same boundary the same way, so they partition the documents.
            start, stop = (int(math.floor(f * count + 0.5)) for f in self.fraction)
            return start, max(start, stop)
        return 0, count


@dataclass
class DataRecipe:
    name: str
    tokenizer: str  # bundled name (bert-base-uncased | gpt2) or a local tokenizer directory
    splits: dict[str, SourceSpec]
    detokenizer: str | None = None  # wikitext | ptb | lm1b | lambada | scientific_papers
    collapse_whitespace: bool = False  # join hard-wrapped lines: "a\n  b" → "a b"
    shard_documents: int = 50_000  # documents per shard: the unit of parallel work and of resumption
    workers: int = 0  # processes for tokenization (0 = all cores)
    output_dir: str = ""  # "" = <data cache>/<name>-<fingerprint>

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_RECIPE_KEYS = {f.name for f in fields(DataRecipe)} | {"source"}
_SOURCE_FIELDS = {f.name: str(f.type) for f in fields(SourceSpec)}


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise Sad3Error(f"recipe override {dotted!r}: {key!r} is not a mapping")
        node = child
    node[keys[-1]] = value


def _source(values: dict, where: str) -> SourceSpec:
    spec = SourceSpec()
    for key, value in values.items():
        if key not in _SOURCE_FIELDS:
            raise Sad3Error(f"unknown recipe key {where}.{key}: known keys are {', '.join(_SOURCE_FIELDS)}")
        annotation = _SOURCE_FIELDS[key]
        if key == "path":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise Sad3Error(f"{where}.path must be a path or a list of paths, got {value!r}")
        elif key in ("select", "fraction"):
            if value is not None and (not isinstance(value, list) or len(value) != 2):
                raise Sad3Error(f"{where}.{key} must be a [start, stop] pair, got {value!r}")
        elif key == "per_file":
            if not isinstance(value, bool):
                raise Sad3Error(f"{where}.per_file must be true or false, got {value!r}")
        elif value is not None or "None" not in annotation:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise Sad3Error(f"{where}.{key} must be a string, got {value!r}")
            value = str(value)
        setattr(spec, key, value)
    if spec.documents not in DOCUMENT_MODES:
        raise Sad3Error(f"unknown {where}.documents {spec.documents!r}: choose one of {', '.join(DOCUMENT_MODES)}")
    if spec.select is not None and spec.fraction is not None:
        raise Sad3Error(f"{where} sets both select and fraction: keep one")
    if spec.select is not None and not all(
        v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in spec.select
    ):
        raise Sad3Error(f"{where}.select must hold integers or null, got {spec.select!r}")
    if spec.fraction is not None:
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in spec.fraction):
            raise Sad3Error(f"{where}.fraction must hold numbers in [0, 1], got {spec.fraction!r}")
        if spec.fraction[0] > spec.fraction[1]:
            raise Sad3Error(f"{where}.fraction start {spec.fraction[0]} exceeds its stop {spec.fraction[1]}")
    if not spec.dataset and not spec.path:
        raise Sad3Error(f"{where} names no data: set dataset (hub name) or path (local copy)")
    return spec


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> DataRecipe:
    """Validate a recipe mapping (as read from YAML) into a DataRecipe; every mistake is one line."""
    if not isinstance(raw, dict):
        raise Sad3Error(f"{where} must be a mapping of recipe keys")
    unknown = set(raw) - _RECIPE_KEYS
    if unknown:
        raise Sad3Error(
            f"unknown recipe key {sorted(unknown)[0]!r} in {where}: known keys are {', '.join(sorted(_RECIPE_KEYS))}"
        )
    for key in ("name", "tokenizer"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise Sad3Error(f"{where} needs a `{key}` string")
    shared = raw.get("source") or {}
    splits_raw = raw.get("splits")
    if not isinstance(shared, dict):
        raise Sad3Error(f"{where}: source must be a mapping")
    if not isinstance(splits_raw, dict) or not splits_raw:
        raise Sad3Error(f"{where} needs `splits`, a mapping such as train: {{...}}, validation: {{...}}")
    splits = {}
    for name, values in splits_raw.items():
        if values is not None and not isinstance(values, dict):
            raise Sad3Error(f"{where}: splits.{name} must be a mapping")
        splits[str(name)] = _source({**shared, **(values or {})}, f"splits.{name}")
    recipe = DataRecipe(name=raw["name"], tokenizer=raw["tokenizer"], splits=splits)
    for key in ("detokenizer", "collapse_whitespace", "shard_documents", "workers", "output_dir"):
        if key in raw and raw[key] is not None:
            setattr(recipe, key, raw[key])
    if recipe.detokenizer is not None and recipe.detokenizer not in DETOKENIZERS:
        raise Sad3Error(f"unknown detokenizer {recipe.detokenizer!r}: choose one of {', '.join(DETOKENIZERS)}")
    if not isinstance(recipe.collapse_whitespace, bool):
        raise Sad3Error(f"collapse_whitespace must be true or false, got {recipe.collapse_whitespace!r}")
    for key in ("shard_documents", "workers"):
        value = getattr(recipe, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "shard_documents" else 0):
            raise Sad3Error(
                f"{key} must be a {'positive' if key == 'shard_documents' else 'non-negative'} integer, got {value!r}"
            )
    recipe.output_dir = str(recipe.output_dir)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DataRecipe:
    """Read a recipe YAML and apply `key=value` overrides (dotted keys, e.g. source.path=/data/lm1b)."""
    path = Path(path)
    if not path.is_file():
        raise Sad3Error(f"data recipe {str(path)!r} not found: pass a YAML file such as configs/data/lm1b.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise Sad3Error(f"data recipe {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    return recipe_from_dict(apply_overrides(raw, overrides), str(path))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of a recipe mapping with `key=value` overrides applied (values parsed as YAML)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise Sad3Error(f"recipe override {item!r} must look like key=value (e.g. source.path=/data/owt)")
        key, text = item.split("=", 1)
        if not isinstance(raw, dict):
            break
        _set_dotted(raw, key, yaml.safe_load(text) if text else None)
    return raw


def files_recipe(patterns: list[str], tokenizer: str, val_fraction: float | None, name: str = "files") -> DataRecipe:
    """Plain-text files cut into paragraphs. With `val_fraction`, the last fraction of each file's paragraphs is the
    validation split and the rest the training split; without it, every paragraph is in one `validation` split."""
    base = {"path": list(patterns), "documents": "paragraph", "per_file": True}
    if val_fraction is None:
        splits = {"validation": _source(base, "files")}
    else:
        cut = 1.0 - val_fraction
        splits = {
            "train": _source({**base, "fraction": [0.0, cut]}, "files"),
            "validation": _source({**base, "fraction": [cut, 1.0]}, "files"),
        }
    return DataRecipe(name=name, tokenizer=tokenizer, splits=splits, collapse_whitespace=True, workers=1)
