"""Token shards: prepare → read back equals direct tokenization; the manifest's counts and checksums; parallel
preparation; resumption after an interruption, a deleted shard or a corrupted one gives the identical manifest;
the shipped recipes run on local copies (text files, saved datasets, json files). Local files only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sad3_megatron.core.errors import Sad3Error  # noqa: E402
from sad3_megatron.data import preparation as prepare_module  # noqa: E402
from sad3_megatron.data.preparation import prepare
from sad3_megatron.data.recipes import (
    load_recipe,  # noqa: E402
    recipe_from_dict,  # noqa: E402
)
from sad3_megatron.data.shards import (
    open_prepared,
    sha256_file,  # noqa: E402
)
from sad3_megatron.data.tokenizers import load_tokenizer

WORDS = "the of and to a in that it was her not be as he his had with for you she which".split()


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture
def corpus(tmp_path):
    """Three text files of paragraphs (one with Windows line ends), returned as {path: [paragraph, ...]}."""
    rng = np.random.default_rng(0)
    files = {}
    for i, n in enumerate([9, 4, 12]):
        paragraphs = [
            "\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(rng.integers(1, 4)))
            for _ in range(n)
        ]
        path = tmp_path / "src" / f"book{i}.txt"
        path.parent.mkdir(exist_ok=True)
        text = "\n\n".join(paragraphs) + "\n"
        path.write_bytes((text.replace("\n", "\r\n") if i == 1 else text).encode())
        files[path] = paragraphs
    return files


def text_recipe(tmp_path, out="out", **extra):
    raw = {
        "name": "books",
        "tokenizer": "gpt2",
        "shard_documents": 4,
        "output_dir": str(tmp_path / out),
        "source": {"path": str(tmp_path / "src" / "*.txt"), "per_file": True},
        "splits": {"train": {"fraction": [0.0, 0.75]}, "validation": {"fraction": [0.75, 1.0]}},
    }
    raw.update(extra)
    return recipe_from_dict(raw)


def expected_split(corpus, train: bool):
    docs = []
    for paragraphs in corpus.values():
        cut = int(np.floor(0.75 * len(paragraphs) + 0.5))
        docs += paragraphs[:cut] if train else paragraphs[cut:]
    return docs


def read_back(root, split):
    documents = open_prepared(root).split(split)
    return [documents.document(i).tolist() for i in range(documents.documents)]


def test_prepare_reads_back_the_direct_tokenization(tmp_path, corpus, gpt2):
    result = prepare(text_recipe(tmp_path), gpt2, workers=1)
    root, manifest = result.root, result.manifest
    for split, train in (("train", True), ("validation", False)):
        assert read_back(root, split) == [gpt2.encode(p) for p in expected_split(corpus, train)]
    # The shards are megatron-core indexed datasets: its reader sees the same documents.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    first = IndexedDataset(str(root / manifest["splits"]["train"]["shards"][0]["name"]))
    assert first[0].tolist() == gpt2.encode(expected_split(corpus, True)[0]) and first[0].dtype == np.uint16
    # Manifest: counts, tokenizer identity, checksums of the files on disk.
    assert manifest["complete"] and manifest["tokenizer"]["name"] == "gpt2"
    assert manifest["tokenizer"]["vocab_hash"] == gpt2.vocab_hash
    assert manifest["documents"] == sum(len(p) for p in corpus.values())
    assert manifest["tokens"] == sum(len(gpt2.encode(p)) for ps in corpus.values() for p in ps)
    assert manifest["skipped"] == {
        "empty_documents": 0,
        "documents_without_tokens": 0,
        "undecodable_bytes": 0,
        "empty_files": 0,
    }
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert [s["documents"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 4, 4, 3]  # 7 + 3 + 9
    assert [s["documents"] for s in manifest["splits"]["validation"]["shards"]] == [4, 2]
    for shard in shards:
        assert sha256_file(root / (shard["name"] + ".bin")) == shard["bin_sha256"]
        assert sha256_file(root / (shard["name"] + ".idx")) == shard["idx_sha256"]
    assert json.loads((root / "manifest.json").read_text()) == manifest


def test_parallel_preparation_gives_the_same_shards(tmp_path, corpus, gpt2):
    serial = prepare(text_recipe(tmp_path, "serial"), gpt2, workers=1).manifest
    parallel = prepare(text_recipe(tmp_path, "parallel"), gpt2, workers=2).manifest
    assert parallel == serial


def test_interrupted_preparation_resumes_to_identical_checksums(tmp_path, corpus, gpt2, monkeypatch):
    clean = prepare(text_recipe(tmp_path, "clean"), gpt2, workers=1).manifest
    root = tmp_path / "resumed"

    # 1. Killed while writing the third shard: two shards are complete, the third is a partial file.
    real, calls = prepare_module.build_shard, []

    def dies_on_third(job):
        calls.append(job.name)
        if len(calls) == 3:
            (root / job.name).parent.mkdir(parents=True, exist_ok=True)
            (root / (job.name + ".partial.bin")).write_bytes(b"\x01\x02")
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prepare_module, "build_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(text_recipe(tmp_path, "resumed"), gpt2, workers=1)
    monkeypatch.setattr(prepare_module, "build_shard", real)
    with pytest.raises(Sad3Error, match="no manifest.json"):
        open_prepared(root)
    result = prepare(text_recipe(tmp_path, "resumed"), gpt2, workers=1)
    assert len(result.reused) == 2 and len(result.built) == 5
    assert result.manifest == clean
    assert not list(root.rglob("*.partial.*"))

    # 2. The last shard deleted.
    last = clean["splits"]["validation"]["shards"][-1]["name"]
    (root / (last + ".bin")).unlink()
    result = prepare(text_recipe(tmp_path, "resumed"), gpt2, workers=1)
    assert result.built == [last] and result.manifest == clean

    # 3. A shard corrupted in place (same size): sizes pass, checksums do not.
    victim = root / (clean["splits"]["train"]["shards"][1]["name"] + ".bin")
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    open_prepared(root)  # the quick check (sizes) cannot see it ...
    with pytest.raises(Sad3Error, match="missing or damaged"):
        open_prepared(root, verify=True)  # ... the checksums can
    result = prepare(text_recipe(tmp_path, "resumed"), gpt2, workers=1, verify=True)
    assert result.built == [clean["splits"]["train"]["shards"][1]["name"]] and result.manifest == clean


def test_a_changed_recipe_rebuilds_and_stale_shards_go(tmp_path, corpus, gpt2):
    prepare(text_recipe(tmp_path), gpt2, workers=1)
    result = prepare(text_recipe(tmp_path, shard_documents=100), gpt2, workers=1)
    assert len(result.built) == 2 and not result.reused
    names = sorted(p.name for p in (tmp_path / "out").rglob("*") if re.search(r"-\d{5}\.", p.name))
    assert names == sorted(f"{s}-00000.{ext}" for s in ("train", "validation") for ext in ("bin", "idx", "json"))


def test_cache_directory_is_keyed_by_content(tmp_path, corpus, gpt2):
    first = prepare(text_recipe(tmp_path, output_dir=""), gpt2, cache_dir=tmp_path / "cache", workers=1)
    again = prepare(text_recipe(tmp_path, output_dir=""), gpt2, cache_dir=tmp_path / "cache", workers=1)
    assert again.root == first.root and again.reused and not again.built
    path = next(iter(corpus))
    path.write_text(path.read_text() + "\n\none more paragraph\n")
    changed = prepare(text_recipe(tmp_path, output_dir=""), gpt2, cache_dir=tmp_path / "cache", workers=1)
    assert changed.root != first.root and changed.root.parent == first.root.parent


def saved_dataset(tmp_path, name, splits):
    import datasets

    datasets.disable_progress_bars()
    path = tmp_path / name
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(path)
    return path


def test_owt_recipe_on_a_saved_dataset_holds_out_the_last_documents(tmp_path, gpt2):
    texts = [f"Document {i} says something." for i in range(10)]
    texts[4], texts[6] = "", None  # empty documents: counted, not tokenized
    path = saved_dataset(tmp_path, "owt", {"train": texts})
    recipe = load_recipe(
        "configs/data/owt.yaml",
        [f"source.path={path}", "splits.train.select=[null, -3]", "splits.validation.select=[-3, null]"],
    )
    recipe.output_dir = str(tmp_path / "owt-gpt2")
    result = prepare(recipe, gpt2, workers=1)
    assert read_back(result.root, "validation") == [gpt2.encode(t) for t in texts[-3:]]
    assert read_back(result.root, "train") == [gpt2.encode(t) for t in texts[:7] if t]
    assert result.manifest["splits"]["train"]["skipped"]["empty_documents"] == 2


def test_lm1b_recipe_on_a_saved_dataset_dict_detokenizes(tmp_path):
    bert = load_tokenizer("bert-base-uncased")
    path = saved_dataset(tmp_path, "lm1b", {"train": ["I don 't know , he said ."], "test": ["It costs $ 5 ."]})
    recipe = load_recipe("configs/data/lm1b.yaml", [f"source.path={path}", f"output_dir={tmp_path / 'lm1b'}"])
    result = prepare(recipe, bert, workers=1)
    assert read_back(result.root, "train") == [bert.encode("I don't know, he said.")]
    assert read_back(result.root, "validation") == [bert.encode("It costs $5.")]


def test_json_lines_files_through_datasets(tmp_path, gpt2, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rows = [{"body": f"row {i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_from_dict(
        {
            "name": "json",
            "tokenizer": "gpt2",
            "output_dir": str(tmp_path / "out"),
            "source": {"path": str(tmp_path / "a.jsonl"), "text_field": "body"},
            "splits": {"train": {"fraction": [0, 0.6]}, "validation": {"fraction": [0.6, 1]}},
        }
    )
    result = prepare(recipe, gpt2, workers=1)
    assert read_back(result.root, "train") == [gpt2.encode(f"row {i}") for i in range(3)]
    assert read_back(result.root, "validation") == [gpt2.encode(f"row {i}") for i in (3, 4)]
