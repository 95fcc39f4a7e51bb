"""Chat / instruction data (`data.chat_files`): JSONL conversations rendered with the tokenizer's own
chat template, prompts clean and unscored, answers noised and scored (SDAR's and dllm's SFT framing).

Each line is `{"messages": [{"role": "system" | "user" | "assistant" | ..., "content": "..."}, ...]}`.
A conversation is rendered once with `tokenizer.apply_chat_template`; the answer of assistant turn k is
the text between the rendering of the turns before it with the generation prompt and the rendering
through turn k (whatever the template adds around an answer, e.g. its end-of-turn token, belongs to the
answer when the template puts it there). The rendered text is tokenized once, with character offsets,
and a token is scored when it starts inside an answer. Templates whose partial renderings are not
prefixes of the whole rendering cannot be split this way and are refused, naming the line.

A line that is not JSON, has no `messages` list of {role, content} strings, has no assistant turn, or
that the template cannot render is skipped, counted and reported with its file and line number
(`ChatData.malformed`, written to data_stats.json and printed when training starts): never dropped
silently. Conversations are packed like any documents ([BOS] conversation [EOS] in `documents`
framing), with the document mask under `data.packing=document`; a conversation longer than a row
continues in the next row. The held-out split is the last `data.val_fraction` of each file's lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.data.tokenizers import Tokenizer


class ChatLineError(ValueError):
    """Why one line cannot be used (reported with its file and line number)."""


@dataclass
class Conversation:
    tokens: list[int]
    scored: list[bool]  # True on answer tokens


@dataclass
class ChatData:
    train: list[Conversation] = field(default_factory=list)
    validation: list[Conversation] = field(default_factory=list)
    lines: int = 0  # non-empty lines read
    malformed: list[str] = field(default_factory=list)  # "file:line: reason", in file order

    def report(self) -> str:
        """One line: what was used and which lines were skipped (the first few named)."""
        shown = "; ".join(self.malformed[:5]) + (f"; … {len(self.malformed) - 5} more" if len(self.malformed) > 5 else "")
        skipped = f"{len(self.malformed)} malformed line(s) skipped: {shown}" if self.malformed else "no malformed lines"
        return (f"chat data: {len(self.train)} train / {len(self.validation)} held-out conversations from "
                f"{self.lines} lines; {skipped}")  # fmt: skip


def parse_messages(line: str) -> list[dict]:
    """The `messages` of one JSONL line, checked; raises ChatLineError saying what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ChatLineError(f"not JSON ({err.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ChatLineError('no "messages" list')
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ChatLineError('every message needs string "role" and "content"')
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatLineError("no assistant turn (nothing to score)")
    return messages


def _render(hf, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises anything a template's raise_exception says
        raise ChatLineError(f"the chat template cannot render it ({type(err).__name__}: {str(err)[:80]})") from None


def answer_spans(hf, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of every assistant answer in the rendered `text`."""
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(hf, messages[:k], generation_prompt=True) if k else ""
        through = _render(hf, messages[: k + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatLineError("the chat template's partial renderings are not prefixes of the whole: cannot tell the answers apart")
        spans.append((len(before), len(through)))
    return spans


def check_template(tokenizer: Tokenizer) -> None:
    if not getattr(tokenizer.hf, "chat_template", None):
        raise Sad3Error(
            f"tokenizer {tokenizer.name!r} has no chat template: data.chat_files needs a tokenizer directory whose "
            "tokenizer_config.json sets chat_template"
        )


def render_conversation(tokenizer: Tokenizer, messages: list[dict]) -> Conversation:
    """Token ids of the rendered conversation and, per token, whether it is part of an answer."""
    hf = tokenizer.hf
    text = _render(hf, messages)
    spans = answer_spans(hf, messages, text)
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    scored = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    if not any(scored):
        raise ChatLineError("the answers render to no tokens")
    return Conversation(list(encoded["input_ids"]), scored)


def chat_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """`sad3 sample --chat`: one user message with the template's generation prompt, after BOS."""
    check_template(tokenizer)
    rendered = _render(tokenizer.hf, [{"role": "user", "content": text}], generation_prompt=True)
    return [tokenizer.bos_id] + tokenizer.hf(rendered, add_special_tokens=False)["input_ids"]


def load_chat(files: list[Path], tokenizer: Tokenizer, val_fraction: float) -> ChatData:
    """Every file's conversations, the last `val_fraction` of each file's lines held out."""
    check_template(tokenizer)
    data = ChatData()
    for path in files:
        lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        data.lines += len(lines)
        cut = len(lines) - int(round(val_fraction * len(lines)))
        for index, (number, line) in enumerate(lines):
            try:
                conversation = render_conversation(tokenizer, parse_messages(line))
            except ChatLineError as err:
                data.malformed.append(f"{path}:{number}: {err}")
                continue
            (data.train if index < cut else data.validation).append(conversation)
    return data
