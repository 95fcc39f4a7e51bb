"""Zero-shot sets and detokenizers on local copies, the training corpus facade, and the `sad3 data prepare` /
`sad3 eval` command lines. Local files only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402

from sad3_megatron.cli import main  # noqa: E402
from sad3_megatron.config import DataConfig  # noqa: E402
from sad3_megatron.data.corpus import load_corpus, load_eval_sequences
from sad3_megatron.data.detokenizers import DETOKENIZERS  # noqa: E402
from sad3_megatron.data.tokenizers import load_tokenizer
from sad3_megatron.data.zero_shot import ZERO_SHOT  # noqa: E402


@pytest.mark.parametrize(
    "name,raw,clean",
    [
        (
            "wikitext",
            " The 1 @,@ 000 @-@ year old ( big ) tree , he said . \n",
            " The 1,000-year old (big) tree, he said.\n",
        ),
        ("wikitext", " = = Early life = = \n", " == Early life ==\n"),
        ("ptb", "the company 's shares rose N N to $ N a share", "the company's shares rose 1 1 to $1 a share"),
        ("ptb", "he did n't say \\/ <unk>", "he didn't say / ?"),
        ("lm1b", 'He said " hello , world " ( quietly ) today .', 'He said "hello, world" (quietly) today.'),
        ("lm1b", "See http : / / example.com ; it 's $ 5", "See http://example.com; it's $5"),
        ("lambada", "\u201cyes ,\u201d she said  ", '\n"yes ," she said'),
        ("scientific_papers", "the result ( @xmath0 ) holds .", "the result (@xmath0) holds."),
    ],
)
def test_detokenizers(name, raw, clean):
    assert DETOKENIZERS[name](raw) == clean


def test_zero_shot_registry_names_the_suite():
    assert set(ZERO_SHOT) == {"ptb", "wikitext2", "wikitext103", "lambada", "ag_news", "pubmed", "arxiv", "lm1b"}
    assert ZERO_SHOT["ptb"].text_field == "sentence" and ZERO_SHOT["arxiv"].text_field == "article"


def test_zero_shot_from_a_saved_dataset_and_from_raw_text(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    gpt2 = load_tokenizer("gpt2")
    lines = [" = Tree = \n", "", " The 1 @,@ 000 @-@ year old tree , it said . \n"] * 20
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": lines})}).save_to_disk(tmp_path / "wt2")
    saved = load_eval_sequences(
        gpt2, 32, zero_shot="wikitext2", zero_shot_path=str(tmp_path / "wt2"), cache_dir=tmp_path
    )
    text = gpt2.decode(saved[0].tolist())
    assert "1,000-year old tree, it said." in text and "@" not in text
    (tmp_path / "wiki.valid.raw").write_text("".join(lines))  # the original release: one line per document
    raw = load_eval_sequences(
        gpt2, 32, zero_shot="wikitext2", zero_shot_path=str(tmp_path / "wiki.valid.raw"), cache_dir=tmp_path
    )
    assert len(raw) > 0 and "1,000-year old tree" in gpt2.decode(raw[:].ravel().tolist())


def test_lambada_from_json_lines(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path = tmp_path / "lambada_test.jsonl"
    path.write_text("".join(json.dumps({"text": f"\u201cpassage {i} ends,\u201d she said"}) + "\n" for i in range(30)))
    gpt2 = load_tokenizer("gpt2")
    sequences = load_eval_sequences(gpt2, 16, zero_shot="lambada", zero_shot_path=str(path), cache_dir=tmp_path)
    assert '\n"passage 0 ends," she said' in gpt2.decode(sequences[:].ravel().tolist())


def test_training_corpus_from_text_files_and_from_the_austen_recipe(tmp_path):
    bert = load_tokenizer("bert-base-uncased")
    files = DataConfig(cache_dir=str(tmp_path), min_val_sequences=1)
    corpus = load_corpus(files, bert, 128)
    assert len(corpus.train) > 1000 and len(corpus.val) > 8 and corpus.stats.packing == "wrap"
    assert corpus.train[0][:2].tolist() == [bert.bos_id, bert.encode("emma")[0]]
    recipe = DataConfig(recipe="configs/data/austen.yaml", cache_dir=str(tmp_path), packing="document")
    by_recipe = load_corpus(recipe, bert, 128)
    assert by_recipe.stats.tokens == corpus.stats.tokens  # the same paragraphs, cut into smaller shards
    batch = by_recipe.train.batch([0, 1])
    assert batch.document_ids.shape == (2, 128) and batch.document_ids[0, 0] == 0
    ends = batch.document_ids[:, 1:] != batch.document_ids[:, :-1]  # the last position of each document
    assert ends.any() and (batch.tokens[:, :-1][ends] == bert.eos_id).all()
    json.dumps(vars(by_recipe.stats))  # the trainer writes it as data_stats.json


def test_data_prepare_command(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one paragraph\n\nanother paragraph\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: tiny\ntokenizer: gpt2\nsource: {{path: {tmp_path / 'a.txt'}}}\nsplits: {{train: {{}}}}\n")
    argv = ["data", "prepare", str(recipe), "--no-progress", f"output_dir={tmp_path / 'out'}", "workers=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train 2 docs" in out and "1 shard(s) built" in out and (tmp_path / "out" / "manifest.json").is_file()
    assert main(argv) == 0 and "0 shard(s) built, 1 kept" in capsys.readouterr().out


def test_data_prepare_caches_a_zero_shot_set_from_a_local_copy(tmp_path, capsys):
    (tmp_path / "ptb.valid.txt").write_text(" the company 's shares rose N N \n stocks fell \n" * 10)
    argv = ["data", "prepare", "ptb", f"source.path={tmp_path / 'ptb.valid.txt'}", "--cache-dir", str(tmp_path)]
    assert main(argv + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot-ptb (gpt2)" in out and "validation 20 docs" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["data", "prepare", "/no/such/recipe.yaml"], "not found"),
        (["data", "prepare", "configs/data/owt.yaml", "source.documents=words"], "unknown splits.train.documents"),
        (["data", "prepare", "configs/data/owt.yaml", "--workers", "3"], "unrecognized arguments"),
        (["eval", "/no/such/run", "--split", "val", "--zero-shot-path", "/tmp"], "--zero-shot-path needs --zero-shot"),
        (["eval", "/no/such/run", "--zero-shot", "penn"], "unknown zero-shot set 'penn'"),
        (["train", "configs/demo.yaml", "data.packing=tight"], "unknown data.packing"),
        (["train", "configs/demo.yaml", "data.recipe=/no/such.yaml"], "data.recipe='/no/such.yaml' not found"),
    ],
)
def test_bad_data_commands_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sad3: error:") and needle in err, err
