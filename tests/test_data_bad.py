"""Bad data is counted or refused with one clear line, never lost silently: missing files, empty corpora,
non-UTF-8 bytes, empty documents, documents longer than the context, wrong columns, an unreachable hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sad3_megatron.config import DataConfig  # noqa: E402
from sad3_megatron.core.errors import Sad3Error  # noqa: E402
from sad3_megatron.data.corpus import (
    load_corpus,  # noqa: E402
    packed_split,  # noqa: E402
)
from sad3_megatron.data.preparation import prepare
from sad3_megatron.data.recipes import (
    load_recipe,
    recipe_from_dict,  # noqa: E402
)
from sad3_megatron.data.shards import open_prepared
from sad3_megatron.data.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def recipe(tmp_path, path, **source):
    return recipe_from_dict(
        {
            "name": "bad",
            "tokenizer": "gpt2",
            "output_dir": str(tmp_path / "out"),
            "source": {"path": str(path), **source},
            "splits": {"train": {}},
        }
    )


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_missing_file_is_one_line(tmp_path, gpt2):
    with pytest.raises(Sad3Error) as err:
        prepare(recipe(tmp_path, tmp_path / "nowhere.txt"), gpt2)
    assert "not found" in one_line(err)
    with pytest.raises(Sad3Error) as err:
        load_corpus(DataConfig(recipe=str(tmp_path / "nowhere.yaml")), gpt2, 16)
    assert "not found" in one_line(err)


def test_empty_corpus_is_counted_then_refused_for_training(tmp_path, gpt2):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\n\t\n")
    result = prepare(recipe(tmp_path, tmp_path / "*.txt"), gpt2)
    assert result.manifest["documents"] == 0
    assert sorted(os.path.basename(f) for f in result.manifest["splits"]["train"]["skipped"]["empty_files"]) == [
        "blank.txt",
        "empty.txt",
    ]
    data = DataConfig(train_files=[str(tmp_path / "*.txt")], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(Sad3Error) as err:
        load_corpus(data, load_tokenizer("bert-base-uncased"), 16)
    assert "holds no text" in one_line(err)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, gpt2):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 au lait\n\nfine paragraph\n\nbroken \xff\xfe twice\n")
    result = prepare(recipe(tmp_path, path), gpt2)
    skipped = result.manifest["skipped"]
    assert skipped["undecodable_bytes"] == 3
    assert result.manifest["splits"]["train"]["shards"][0]["undecodable_bytes_by_source"] == {str(path): 3}
    docs = open_prepared(result.root).split("train")
    assert gpt2.decode(docs.document(0).tolist()) == "caf\ufffd au lait"
    assert docs.documents == 3  # kept, with U+FFFD where the bytes were


def test_empty_documents_are_counted(tmp_path, gpt2):
    path = tmp_path / "lines.txt"
    path.write_text("first line\n\n   \nsecond line\n")
    result = prepare(recipe(tmp_path, path, documents="line"), gpt2)
    assert result.manifest["documents"] == 2
    assert result.manifest["skipped"]["empty_documents"] == 2


def test_a_document_longer_than_the_context_is_wrapped_not_truncated(tmp_path, gpt2):
    long = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "long.txt").write_text(f"short one\n\n{long}\n\nshort two\n")
    result = prepare(recipe(tmp_path, tmp_path / "long.txt"), gpt2)
    packed = packed_split(open_prepared(result.root), "train", 64, framing="documents")
    stats = packed.stats
    assert stats.documents_longer_than_context == 1
    stream = [t for text in ("short one", long, "short two") for t in (*gpt2.encode(text), gpt2.eos_id)]
    assert len(stream) == stats.rows * 64 + stats.tail_tokens
    assert np.asarray(packed).ravel().tolist() == stream[: stats.rows * 64]


def test_dataset_without_the_text_column_is_one_line(tmp_path, gpt2):
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "saved")
    with pytest.raises(Sad3Error) as err:
        prepare(recipe(tmp_path, tmp_path / "saved"), gpt2)
    assert "no column 'text'" in one_line(err) and "text_field" in str(err.value)


def test_unreachable_hub_says_to_use_a_local_copy(tmp_path, gpt2):
    with pytest.raises(Sad3Error) as err:
        prepare(load_recipe("configs/data/owt.yaml", [f"output_dir={tmp_path}"]), gpt2)
    assert "source.path" in one_line(err)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("source.documents=sentence", "unknown splits.train.documents"),
        ("splits.train.fraction=[0, 0.5]", "both select and fraction"),
        ("shard_documents=0", "shard_documents must be a positive integer"),
        ("detokenizer=moses", "unknown detokenizer"),
        ("source.colour=red", "unknown recipe key splits.train.colour"),
        ("tokenizr=gpt2", "unknown recipe key 'tokenizr'"),
    ],
)
def test_recipe_mistakes_are_one_line(override, needle):
    with pytest.raises(Sad3Error) as err:
        load_recipe("configs/data/owt.yaml", [override])
    assert needle in one_line(err)


def test_prepared_with_another_tokenizer_is_refused(tmp_path, gpt2):
    (tmp_path / "a.txt").write_text("some text\n\nmore text\n")
    result = prepare(recipe(tmp_path, tmp_path / "a.txt"), gpt2)
    with pytest.raises(Sad3Error) as err:
        load_corpus(DataConfig(recipe=str(result.root)), load_tokenizer("bert-base-uncased"), 4)
    assert "set data.tokenizer=gpt2" in one_line(err)


def test_recipe_for_another_tokenizer_is_refused_before_any_work():
    with pytest.raises(Sad3Error) as err:
        load_corpus(DataConfig(recipe="configs/data/owt.yaml"), load_tokenizer("bert-base-uncased"), 16)
    assert "set data.tokenizer=gpt2" in one_line(err)
