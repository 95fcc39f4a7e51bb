"""Zero-shot benchmark sets (Table 5 and the usual GPT-2 suite) as `datasets` recipes: hub name, configuration,
split and text field, plus the detokenizer that undoes their pre-tokenization. Splits follow MDLM's evaluation
(validation where one exists; test for LM1B, AG News and LAMBADA). Offline, `path` points at a local copy: a saved
dataset directory, json/parquet/csv files, or plain-text files with one document per line (e.g. wiki.valid.raw).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.data.recipes import DataRecipe, apply_overrides, load_recipe, recipe_from_dict


@dataclass(frozen=True)
class ZeroShotSet:
    dataset: str
    config: str | None
    split: str
    text_field: str
    detokenizer: str | None
    revision: str | None = None  # refs/convert/parquet where the hub repository only holds a loading script


ZERO_SHOT: dict[str, ZeroShotSet] = {
    "ptb": ZeroShotSet(
        "ptb-text-only/ptb_text_only", "penn_treebank", "validation", "sentence", "ptb", "refs/convert/parquet"
    ),
    "wikitext2": ZeroShotSet("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "text", "wikitext"),
    "wikitext103": ZeroShotSet("Salesforce/wikitext", "wikitext-103-raw-v1", "validation", "text", "wikitext"),
    "lambada": ZeroShotSet("EleutherAI/lambada_openai", "default", "test", "text", "lambada"),
    "ag_news": ZeroShotSet("fancyzhx/ag_news", None, "test", "text", None),
    # Scientific Papers (Cohan et al., 2018): the article bodies, as in MDLM's Table 5 setup; text_field=abstract
    # through a recipe override evaluates the abstracts instead.
    "pubmed": ZeroShotSet(
        "armanc/scientific_papers", "pubmed", "validation", "article", "scientific_papers", "refs/convert/parquet"
    ),
    "arxiv": ZeroShotSet(
        "armanc/scientific_papers", "arxiv", "validation", "article", "scientific_papers", "refs/convert/parquet"
    ),
    "lm1b": ZeroShotSet("billion-word-benchmark/lm1b", "plain_text", "test", "text", "lm1b", "refs/convert/parquet"),
}


def zero_shot_raw(name: str, tokenizer: str) -> dict:
    """Zero-shot set `name` as a recipe mapping (one `validation` split), ready for `key=value` overrides such as
    source.path=/data/wikitext-2 (a local copy instead of the hub)."""
    if name not in ZERO_SHOT:
        raise Sad3Error(f"unknown zero-shot set {name!r}: choose one of {', '.join(ZERO_SHOT)}")
    z = ZERO_SHOT[name]
    source = {
        "dataset": z.dataset,
        "config": z.config,
        "revision": z.revision,
        "split": z.split,
        "text_field": z.text_field,
        "documents": "line",  # local plain-text copies of these sets hold one document (line/sentence) per line
    }
    return {
        "name": f"zero-shot-{name}",
        "tokenizer": tokenizer,
        "detokenizer": z.detokenizer,
        "source": source,
        "splits": {"validation": {}},
    }


def zero_shot_recipe(name: str, tokenizer: str, path: str | None = None) -> DataRecipe:
    """Zero-shot set `name` read from the hub, or from the local copy at `path`."""
    return recipe_from_dict(apply_overrides(zero_shot_raw(name, tokenizer), [f"source.path={path}"] if path else []))


def recipe_by_name(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DataRecipe:
    """`sad3 data prepare NAME`: a recipe YAML, or a zero-shot set by name (to cache it ahead)."""
    if not Path(name).is_file() and name in ZERO_SHOT:
        return recipe_from_dict(apply_overrides(zero_shot_raw(name, "gpt2"), overrides), f"zero-shot set {name}")
    return load_recipe(name, overrides)
