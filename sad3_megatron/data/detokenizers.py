"""Detokenizers for benchmark corpora distributed pre-tokenized ("don 't", "3 @.@ 5"): they restore ordinary
text before our tokenizer sees it, as the zero-shot evaluations of MDLM and SEDD do. Each is an ordered list of
rewrite rules; the order matters (e.g. digits separators before generic punctuation)."""

from __future__ import annotations

import re
from collections.abc import Callable

from sad3_megatron.core.errors import Sad3Error

Rule = tuple[str, str, bool]  # (pattern, replacement, is_regex)


def _apply(rules: list[Rule], text: str) -> str:
    for pattern, replacement, is_regex in rules:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


# Enclosing pairs written "( a b )" → "(a b)"; shared by the WikiText and LM1B rules.
_WIKITEXT_RULES: list[Rule] = [
    ("s '", "s'", False),  # plural possessive
    (r"/' [0-9]/", r"/'[0-9]/", True),
    (" @-@ ", "-", False),  # WikiText escapes separators inside numbers and compounds
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),  # section markers
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \u00b0 ", "\u00b0", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
]

_PTB_RULES: list[Rule] = [
    (" 's", "'s", False),
    ("s ' ", "s' ", False),
    (" n't", "n't", False),
    (" \n ", "\n", False),
    ("\\/", "/", False),
    *[(" N ", " 1 ", False)] * 10,  # PTB replaces numbers by N; repeated because matches overlap ("N N N")
    ("$ 1", "$1", False),
    ("# 1", "#1", False),
    ("<unk>", "?", False),
]

_LM1B_RULES: list[Rule] = [
    ("http : / / ", "http://", False),
    ("https : / / ", "https://", False),
    (r" '(\w+)", r"'\1", True),  # clitics: "don 't" → "don't"
    (r" (\w+) \. ", r" \1. ", True),
    (r" (\w+) \.$", r" \1.", True),
    (" ? ", "? ", False),
    (r" \?$", "?", True),
    (" ! ", "! ", False),
    (r" \!$", "!", True),
    (" , ", ", ", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" / ", "/", False),
    (r"\" ([^\"]+) \"", r'"\1"', True),
    (r"' ([^']+) '", r"'\1'", True),
    (r"\( ([^\(\)]+) \)", r"(\1)", True),
    (r"\[ ([^\[\]]+) \]", r"[\1]", True),
    ("$ ", "$", False),
    ("\u00a3 ", "\u00a3", False),
]


def wikitext_detokenizer(text: str) -> str:
    return _apply(_WIKITEXT_RULES, text)


def ptb_detokenizer(text: str) -> str:
    return _apply(_PTB_RULES, text)


def lm1b_detokenizer(text: str) -> str:
    return _apply(_LM1B_RULES, text)


def lambada_detokenizer(text: str) -> str:
    """LAMBADA (OpenAI version) uses typographic quotes; each passage starts on a new line."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers_detokenizer(text: str) -> str:
    """arXiv / PubMed articles are tokenized like WikiText and LM1B at once."""
    return lm1b_detokenizer(wikitext_detokenizer(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenizer,
    "ptb": ptb_detokenizer,
    "lm1b": lm1b_detokenizer,
    "lambada": lambada_detokenizer,
    "scientific_papers": scientific_papers_detokenizer,
}


def get_detokenizer(name: str | None) -> Callable[[str], str] | None:
    if name is None:
        return None
    if name not in DETOKENIZERS:
        raise Sad3Error(f"unknown detokenizer {name!r}: choose one of {', '.join(DETOKENIZERS)}")
    return DETOKENIZERS[name]
