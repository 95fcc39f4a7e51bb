"""The bundled tokenizers: reference ids, decode(encode(text)) round trips, and the identity shards record."""

import pytest

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.data.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def bert():
    return load_tokenizer("bert-base-uncased")


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def test_reference_ids(bert, gpt2):
    assert bert.hf("Hello world")["input_ids"] == [101, 7592, 2088, 102]  # with special tokens
    assert [bert.bos_id, *bert.encode("Hello world"), bert.eos_id] == [101, 7592, 2088, 102]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.mask_id, gpt2.vocab_size) == (50256, 50256, 50257, 50258)
    assert (bert.mask_id, bert.vocab_size) == (103, 30522)


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "It is a truth universally acknowledged, that a single man in possession of a good fortune...",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "Unicode: café — naïve “quotes” 東京 🙂",
        "<|endoftext|> and [MASK] written in the text",
    ],
)
def test_gpt2_round_trip_is_exact(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    ["hello world", "it is a truth universally acknowledged, that a single man.", "unaffable wordpieces recombine"],
)
def test_bert_round_trip_of_normalized_text(bert, text):
    assert bert.decode(bert.encode(text)) == text  # bert-base-uncased lower-cases and splits punctuation
    assert bert.decode(bert.encode(text.upper())) == text


def test_special_token_strings_in_text_stay_text(bert, gpt2):
    assert bert.mask_id not in bert.encode("a [MASK] b")
    assert gpt2.eos_id not in gpt2.encode("a <|endoftext|> b")


def test_identity_names_the_vocabulary(bert, gpt2):
    ids = bert.identity(), gpt2.identity()
    assert [i["name"] for i in ids] == ["bert-base-uncased", "gpt2"]
    assert ids[0]["vocab_hash"] != ids[1]["vocab_hash"] and len(ids[0]["vocab_hash"]) == 64
    assert load_tokenizer("gpt2").vocab_hash == ids[1]["vocab_hash"]  # stable across loads


def test_unknown_tokenizer_is_one_line(tmp_path):
    with pytest.raises(Sad3Error, match="neither bundled"):
        load_tokenizer(str(tmp_path / "nope"))
