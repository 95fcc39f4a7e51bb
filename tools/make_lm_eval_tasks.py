"""Write the offline lm-evaluation-harness tasks' data (configs/lm_eval/*.jsonl) from the bundled Austen
corpus: only held-out paragraphs, the last 2% of each novel's paragraphs, which the demo config
(data.val_fraction 0.02) never trains on. Deterministic: the same files on every run.

- sad3_austen_cloze: a sentence without its last word, and four choices for that word (the right
  one and the last words of three other sentences), multiple choice.
- sad3_austen_ppl: whole paragraphs, for rolling (wikitext-style) perplexity.
- sad3_austen_gen: the first words of a sentence, and its next word, for generate_until.

    .venv/bin/python tools/make_lm_eval_tasks.py [--out configs/lm_eval]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path

from sad3_megatron.data.sources import document_spans

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "sad3_megatron/assets/corpora/austen"
VAL_FRACTION = 0.02  # configs/demo.yaml data.val_fraction: the held-out split is the last 2% of each file
SENTENCE = re.compile(r"[A-Z][^.!?]*[.!?]")
WORD = re.compile(r"^(.*\S)\s+([A-Za-z]+)[.!?]$")


def held_out_paragraphs() -> list[str]:
    """The validation paragraphs of `data.train_files` austen/*.txt, as the data recipe cuts them
    (paragraphs at blank lines, whitespace collapsed, the last fraction of each file's paragraphs)."""
    paragraphs = []
    for path in sorted(CORPUS.glob("*.txt")):
        data = path.read_bytes()
        starts, ends = document_spans(data, "paragraph")
        first = int(math.floor((1.0 - VAL_FRACTION) * len(starts) + 0.5))
        for s, e in zip(starts[first:].tolist(), ends[first:].tolist(), strict=True):
            text = " ".join(data[s:e].decode("utf-8", errors="replace").split())
            if text:
                paragraphs.append(text)
    return paragraphs


def cloze_items(paragraphs: list[str], count: int, rng: random.Random) -> list[dict]:
    """Sentences of 8-40 words ending in a plain word: context, four choices, the right one's index."""
    pairs = []
    for paragraph in paragraphs:
        for sentence in SENTENCE.findall(paragraph):
            match = WORD.match(sentence)
            if match and 8 <= len(sentence.split()) <= 40 and '"' not in sentence:
                pairs.append((match.group(1), match.group(2)))
    rng.shuffle(pairs)
    words = sorted({w for _, w in pairs})
    items = []
    for context, answer in pairs[:count]:
        distractors = rng.sample([w for w in words if w.lower() != answer.lower()], 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


def generation_items(paragraphs: list[str], count: int, rng: random.Random) -> list[dict]:
    """The first 6-12 words of a sentence and the word that follows."""
    items = []
    for paragraph in paragraphs:
        for sentence in SENTENCE.findall(paragraph):
            words = sentence.split()
            if len(words) >= 14 and '"' not in sentence:
                cut = rng.randint(6, 12)
                answer = re.sub(r"[^A-Za-z']", "", words[cut])
                if answer:
                    items.append({"prompt": " ".join(words[:cut]), "answer": answer})
    rng.shuffle(items)
    return items[:count]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{path}: {len(rows)} documents")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "configs/lm_eval"))
    args = parser.parse_args()
    out = Path(args.out)
    paragraphs = held_out_paragraphs()
    long = [p for p in paragraphs if len(p.split()) >= 60]
    write_jsonl(out / "sad3_austen_cloze.jsonl", cloze_items(paragraphs, 100, random.Random(0)))
    write_jsonl(out / "sad3_austen_ppl.jsonl", [{"text": p} for p in long[:: max(1, len(long) // 20)][:20]])
    write_jsonl(out / "sad3_austen_gen.jsonl", generation_items(paragraphs, 20, random.Random(1)))


if __name__ == "__main__":
    main()
