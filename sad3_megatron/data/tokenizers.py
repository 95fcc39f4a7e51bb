"""Tokenizers from local files only: the bundled bert-base-uncased (LM1B recipe) and GPT-2 (OWT recipe),
or any HuggingFace tokenizer directory. Each gets a [MASK] id for the absorbing state of the diffusion."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from transformers import AutoTokenizer, BertTokenizerFast, GPT2TokenizerFast, PreTrainedTokenizerFast

from sad3_megatron.core.errors import Sad3Error

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = ("bert-base-uncased", "gpt2")


@dataclass
class Tokenizer:
    name: str
    hf: PreTrainedTokenizerFast
    mask_id: int
    bos_id: int  # put before every document when packing (Suppl. F)
    eos_id: int  # put after every document

    @property
    def vocab_size(self) -> int:
        """Ids the model must cover: the tokenizer's vocabulary including the mask token."""
        return max(len(self.hf), self.mask_id + 1)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @cached_property
    def vocab_hash(self) -> str:
        """sha256 of the vocabulary (tokens in id order): what token shards must agree on."""
        vocab = self.hf.get_vocab()
        tokens = sorted(vocab, key=vocab.__getitem__)
        return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode()).hexdigest()

    def identity(self) -> dict:
        """Name, vocabulary hash and special ids, recorded in every shard manifest."""
        return {
            "name": self.name,
            "vocab_hash": self.vocab_hash,
            "vocab_size": len(self.hf),
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "mask_id": self.mask_id,
        }


def tokenizer_from_directory(path: str | Path) -> PreTrainedTokenizerFast:
    """A local tokenizer directory, by the class its tokenizer_config.json names. AutoTokenizer would
    first read the directory's config.json, which for a sad3 export names remote code, and ask whether
    to trust it; the tokenizer itself is a standard class and needs none."""
    import transformers

    config = Path(path) / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    cls = getattr(transformers, name, None) if name else None
    return (cls or AutoTokenizer).from_pretrained(str(path), local_files_only=True)


def load_tokenizer(name: str) -> Tokenizer:
    """A bundled tokenizer by name, or a local HuggingFace tokenizer directory."""
    if name == "bert-base-uncased":
        hf = BertTokenizerFast.from_pretrained(str(ASSETS / "tokenizers/bert-base-uncased"), local_files_only=True)
        return Tokenizer(name, hf, mask_id=hf.mask_token_id, bos_id=hf.cls_token_id, eos_id=hf.sep_token_id)
    if name == "gpt2":
        hf = GPT2TokenizerFast.from_pretrained(str(ASSETS / "tokenizers/gpt2"), local_files_only=True)
        eos = hf.convert_tokens_to_ids("<|endoftext|>")
        # GPT-2 has no mask token: the absorbing state is one extra id after the vocabulary.
        return Tokenizer(name, hf, mask_id=len(hf), bos_id=eos, eos_id=eos)
    path = Path(name)
    if not path.is_dir():
        raise Sad3Error(f"tokenizer {name!r} is neither bundled ({', '.join(BUNDLED)}) nor a local tokenizer directory")
    hf = tokenizer_from_directory(path)
    mask = hf.mask_token_id if hf.mask_token_id is not None else len(hf)
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    bos = hf.bos_token_id if hf.bos_token_id is not None else (hf.cls_token_id if hf.cls_token_id is not None else eos)
    if eos is None:
        raise Sad3Error(f"tokenizer {name!r} has no EOS or SEP token to separate documents")
    return Tokenizer(str(path), hf, mask_id=mask, bos_id=bos, eos_id=eos)
