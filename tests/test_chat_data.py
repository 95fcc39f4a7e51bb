"""Chat / instruction data (data/chat.py): which tokens are scored, checked against a conversation framed
by hand; malformed lines counted and reported with their line numbers; the packed rows' scored mask."""

import json
from pathlib import Path

import numpy as np
import pytest

from sad3_megatron.config import DataConfig
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.data.chat import chat_prompt, load_chat, render_conversation
from sad3_megatron.data.corpus import load_corpus
from sad3_megatron.data.packing import pack_documents
from sad3_megatron.data.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The bundled GPT-2 tokenizer with a simple chat template (the bundled ones have none)."""
    from transformers import GPT2TokenizerFast

    path = tmp_path_factory.mktemp("chat_tok")
    hf = GPT2TokenizerFast.from_pretrained(str(ROOT / "sad3_megatron/assets/tokenizers/gpt2"))
    hf.chat_template = TEMPLATE
    hf.save_pretrained(str(path))
    return load_tokenizer(str(path))


def test_answer_tokens_are_scored_and_the_prompt_is_not_by_a_hand_framed_example(chat_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Very well, thank you."},
        {"role": "user", "content": "And Mr. Darcy?"},
        {"role": "assistant", "content": "Proud."},
    ]
    tok = chat_tokenizer
    eos = tok.eos_id

    def enc(text):
        return tok.hf(text, add_special_tokens=False)["input_ids"]

    # Framed by hand: role prefixes and every turn before an answer unscored; the answer with its
    # closing <|endoftext|> scored (the template puts it at the end of the assistant's turn).
    pieces = [
        (enc("system: Be brief.") + [eos] + enc("user: How are you?") + [eos] + enc("assistant:"), False),
        (enc(" Very well, thank you.") + [eos], True),
        (enc("user: And Mr. Darcy?") + [eos] + enc("assistant:"), False),
        (enc(" Proud.") + [eos], True),
    ]
    expected_ids = [t for ids, _ in pieces for t in ids]
    expected_scored = [flag for ids, flag in pieces for _ in ids]
    conversation = render_conversation(tok, messages)
    assert conversation.tokens == expected_ids
    assert conversation.scored == expected_scored
    assert chat_prompt(tok, "Hello") == [tok.bos_id] + enc("user: Hello") + [eos] + enc("assistant:")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def good(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                    {"role": "assistant", "content": f"Answer number {i}."}]})  # fmt: skip


def test_malformed_lines_are_counted_and_reported_with_their_line_numbers(chat_tokenizer, tmp_path):
    lines = [good(0), "{not json", good(1), json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             "", json.dumps({"text": "no messages"}), json.dumps({"messages": [{"role": "user"}]}), good(2)]  # fmt: skip
    path = write_lines(tmp_path / "chat.jsonl", lines)
    data = load_chat([path], chat_tokenizer, val_fraction=0.25)
    assert data.lines == 7  # the empty line is not a record
    assert [m.split(": ", 1)[0] for m in data.malformed] == [f"{path}:{n}" for n in (2, 4, 6, 7)]
    assert "not JSON" in data.malformed[0] and "no assistant turn" in data.malformed[1]
    assert 'no "messages" list' in data.malformed[2] and "role" in data.malformed[3]
    assert len(data.train) + len(data.validation) == 3
    assert "4 malformed line(s) skipped" in data.report() and f"{path}:2" in data.report()


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [good(0)])
    with pytest.raises(Sad3Error, match="no chat template"):
        load_chat([path], load_tokenizer("gpt2"), 0.5)


@pytest.mark.parametrize("framing", ["documents", "rows"])
def test_packed_rows_carry_the_scored_mask(framing):
    """Separators: BOS unscored; a document's EOS scored when its last token is (the answer's end)."""
    docs = [[5, 6, 7], [8, 9]]
    flags = [[False, True, True], [True, False]]
    packed = pack_documents(docs, 6 if framing == "rows" else 5, bos=1, eos=2, document_ids=True, framing=framing,
                            scored=flags)  # fmt: skip
    batch = packed.batch(np.arange(len(packed)))
    if framing == "documents":  # [1 5 6 7 2] [1 8 9 2 ...]: rows of 5
        assert batch.tokens[0].tolist() == [1, 5, 6, 7, 2]
        assert batch.scored[0].tolist() == [False, False, True, True, True]
    else:  # [BOS] chunk of 4 [EOS]: stream 5 6 7 2 | 8 9 2
        assert batch.tokens[0].tolist() == [1, 5, 6, 7, 2, 2]
        assert batch.scored[0].tolist() == [False, False, True, True, True, True]


def test_chat_corpus_feeds_the_scored_mask_to_training_rows(chat_tokenizer, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [good(i) for i in range(40)] + ["{broken"])
    data = DataConfig(tokenizer=str(chat_tokenizer.name), chat_files=[str(path)], val_fraction=0.25,
                      min_val_sequences=2, packing="document", framing="documents")  # fmt: skip
    corpus = load_corpus(data, chat_tokenizer, 32)
    batch = corpus.train.batch(np.arange(2))
    assert batch.scored is not None and batch.document_ids is not None
    assert batch.scored.any() and not batch.scored.all() and not batch.scored[:, 0].any()
    assert corpus.stats.skipped["malformed_lines"] == 1 and f"{path}:41" in corpus.stats.skipped["lines"][0]


def test_sample_chat_renders_the_prompt_as_a_user_message(chat_tokenizer, tmp_path):
    """`sad3 sample --chat --prompt TEXT` continues [BOS] + the template's rendering of one user message with
    its generation prompt (an untrained tiny model with the chat tokenizer)."""
    import contextlib
    import io

    import torch
    from safetensors.torch import save_file

    from sad3_megatron.cli import main
    from sad3_megatron.config import load_config, save_config
    from sad3_megatron.engine.build import build_components

    cfg = load_config(ROOT / "configs/demo.yaml", [
        "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64",
        "model.seq_len=32", "diffusion.shift=true", f"data.tokenizer={chat_tokenizer.name}"])  # fmt: skip
    parts = build_components(cfg, torch.device("cpu"), "sdpa")
    save_file({k: v.contiguous() for k, v in parts.model.state_dict().items() if torch.is_tensor(v)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    save_config(cfg, tmp_path / "config.yaml")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["sample", str(tmp_path), "--chat", "--prompt", "Who is Emma?", "--num-tokens", "8",
                     "--steps", "2", "--json"]) == 0  # fmt: skip
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert result["prompt_tokens"] == len(chat_prompt(chat_tokenizer, "Who is Emma?"))
    assert result["samples"][0]["length"] == 8
