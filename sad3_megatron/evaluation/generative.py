"""Metrics of generated samples (Sec. 6.3, Table 6): generative perplexity under an external
causal LM, unigram entropy, NFEs and tokens/s.

Generative perplexity, the protocol of the reference code (`record_generative_perplexity`): a
sample is its documents, the text of each EOS-separated piece of its tokens (`split_documents`),
re-tokenized with the evaluator's own tokenizer (no special tokens added) and framed for the
evaluator as the reference's decode-without-skipping frames a GPT-2 sample: its BOS first (EOS
when it has none), then the documents joined by its EOS (EOS + BOS when they differ). So any pair
of tokenizers keeps the sample's document boundaries, every generated token is scored given the
start of a document, and the separators are context, never scored targets. Scoring uses sliding
windows of `max_length` tokens advancing by `stride` (1024 / 512 by default; the window is
clipped to the evaluator's context, and a stride that would leave no overlap becomes half the
window): every token after the first is scored exactly once, with at least max_length - stride
tokens of context once the sample is longer than a window. The reported value is
exp(total NLL / scored tokens) over all samples; per-sample values are given too.

The evaluator is any local HuggingFace model directory (`AutoModelForCausalLM`), loaded without
network access: e.g. a `sad3 export` of the AR baseline (`diffusion.objective=ar`). A sad3 AR
checkpoint is exported on the fly, so it is scored through the same interface.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.stopping import unigram_entropy
from sad3_megatron.evaluation.samples import SampleFile


@dataclass
class GenerativePerplexity:
    ppl: float
    nll_per_token: float
    scored_tokens: int
    per_sample_ppl: list[float]  # nan for a sample with no scored token
    max_length: int
    stride: int


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def load_evaluator(path: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) of a local causal-LM directory, in eval mode. A `sad3 export` of the AR
    baseline loads with the package's own classes (no remote code); a sad3 AR checkpoint is exported
    to a temporary directory first, so every evaluator is scored through the same HF interface."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from sad3_megatron.data.tokenizers import tokenizer_from_directory
    from sad3_megatron.engine.build import is_export

    hf_logging.disable_progress_bar()  # a local load is quick; keep the CLI output to its result
    path = Path(path)
    if _is_checkpoint(path):
        import tempfile

        from sad3_megatron.engine.export import export_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            export = export_checkpoint(path, Path(tmp) / "export")
            _refuse_diffusion(export.out_dir, f"{str(export.checkpoint)!r} is a diffusion checkpoint")
            return load_evaluator(export.out_dir, device)
    if not path.is_dir():
        raise Sad3Error(f"evaluator {str(path)!r} is not a directory: pass a local HuggingFace causal-LM directory")
    if is_export(path):
        from sad3_megatron.hf.modeling_sad3 import Sad3ForCausalLM

        _refuse_diffusion(path, f"{str(path)!r} is a diffusion model export")
        loader = Sad3ForCausalLM
    else:
        loader = AutoModelForCausalLM
    try:
        tokenizer = tokenizer_from_directory(path)
        model = loader.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise Sad3Error(f"cannot load a causal LM and its tokenizer from {str(path)!r}: {first_line}") from None
    return model.to(device).eval(), tokenizer


def _refuse_diffusion(export: Path, what: str) -> None:
    if json.loads((export / "config.json").read_text()).get("objective") != "ar":
        raise Sad3Error(f"evaluator {what}: pass an AR baseline or a HuggingFace causal LM")


def _context_size(model) -> int | None:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def frame_documents(documents: Sequence[str], tokenizer) -> tuple[list[int], set[int]]:
    """(evaluator ids of a sample, the separator ids that are never scored): BOS, then the
    re-tokenized documents joined by EOS (+ BOS when the evaluator's BOS differs from its EOS)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise Sad3Error("the evaluator's tokenizer has neither an EOS nor a BOS token to frame documents with")
    start = [eos if bos is None else bos]
    separator = [eos] if bos in (None, eos) else ([bos] if eos is None else [eos, bos])
    ids = list(start)
    for i, text in enumerate(documents):
        ids += (separator if i else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, {t for t in (bos, eos) if t is not None}


@torch.no_grad()
def sequence_nll(model, ids: list[int], unscored: Collection[int], max_length: int, stride: int) -> tuple[float, int]:
    """(summed NLL in nats, number of scored tokens) of one token sequence, by sliding windows;
    targets in `unscored` (the document separators) are context only."""
    if len(ids) < 2:
        return 0.0, 0
    device = next(model.parameters()).device
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
    total, count, scored_until = 0.0, 0, 1  # the first token has no context and is never scored
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids_t[begin:end]
        logits = model(window[None]).logits[0, :-1].float()
        targets = window[1:]
        logp = logits.log_softmax(dim=-1).gather(-1, targets[:, None])[:, 0]
        position = torch.arange(begin + 1, end, device=device)
        scored = position >= scored_until  # tokens earlier windows scored are context only
        if unscored:
            scored &= ~torch.isin(targets, torch.as_tensor(sorted(unscored), device=device))
        total -= logp[scored].sum().item()
        count += int(scored.sum())
        scored_until = end
        if end == len(ids):
            break
    return total, count


def generative_perplexity(
    samples: Sequence[str | Sequence[str]], model, tokenizer, max_length: int = 1024, stride: int = 512
) -> GenerativePerplexity:
    """Gen. PPL of `samples` under the evaluator `model` (see the module docstring). A sample is
    its list of documents; a plain string is one document."""
    context = _context_size(model)
    max_length = min(max_length, context) if context else max_length
    if stride >= max_length:  # windows must overlap, or each window's first token would go unscored
        stride = max(max_length // 2, 1)
    if max_length < 2 or stride < 1:
        raise Sad3Error(f"generative perplexity needs windows of at least 2 tokens (got {max_length}, stride {stride})")
    total, count, per_sample = 0.0, 0, []
    for sample in samples:
        ids, unscored = frame_documents([sample] if isinstance(sample, str) else sample, tokenizer)
        nll, n = sequence_nll(model, ids, unscored, max_length, stride)
        total, count = total + nll, count + n
        per_sample.append(math.exp(nll / n) if n else float("nan"))
    if count == 0:
        raise Sad3Error("the samples hold no token to score (each needs at least one evaluator token)")
    return GenerativePerplexity(math.exp(total / count), total / count, count, per_sample, max_length, stride)


def summarize_samples(
    samples: list, evaluator=None, tokenizer=None, max_length: int = 1024, stride: int = 512
) -> dict:
    """Mean unigram entropy (of each sample's own token ids), NFEs, lengths, tokens/s and rejected
    samples of `SampleRecord`s (evaluation/samples.py), plus the generative perplexity when an
    evaluator model and tokenizer are given (a sample's `documents`, or its `text` as one document
    in files written before they existed)."""

    def mean(key: str) -> float | None:
        values = [getattr(s, key) for s in samples if getattr(s, key) is not None]
        return sum(values) / len(values) if values else None

    entropies = [float(unigram_entropy(torch.as_tensor(s.tokens)[None])[0]) for s in samples if s.tokens]
    result = {
        "samples": len(samples),
        "mean_length": mean("length"),
        "mean_nfe": mean("nfe"),
        "mean_tokens_per_s": mean("tokens_per_s"),
        "mean_unigram_entropy": sum(entropies) / len(entropies) if entropies else None,
        "rejected_samples": sum(s.stop_reason == "rejected" for s in samples),
    }
    if evaluator is not None:
        documents = [s.documents or [s.text] for s in samples]
        gen = generative_perplexity(documents, evaluator, tokenizer, max_length, stride)
        result.update({f"gen_{k}": v for k, v in asdict(gen).items()})
    return result


def score_samples(path: str, evaluator: str | None = None, max_length: int = 1024, stride: int = 512) -> dict:
    """`sad3 eval-samples`: the summary of a samples file, with Gen. PPL under `evaluator` when given."""
    from sad3_megatron.engine.distributed import resolve_device

    if max_length < 2 or not 1 <= stride < max_length:
        raise Sad3Error(f"--max-length must be >= 2 and 1 <= --stride < --max-length (got {max_length}, {stride})")
    samples = SampleFile.read(path)
    model = tokenizer = None
    if evaluator:
        model, tokenizer = load_evaluator(evaluator, resolve_device("auto"))
    return {"samples_file": path, "evaluator": evaluator,
            **summarize_samples(samples, model, tokenizer, max_length, stride)}  # fmt: skip


def summary_line(summary: dict) -> str:
    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    line = (
        f"{summary['samples']} samples: mean length {fmt(summary['mean_length'], '.1f')}, "
        f"unigram entropy {fmt(summary['mean_unigram_entropy'], '.3f')} nats, "
        f"NFEs {fmt(summary['mean_nfe'], '.1f')}, {fmt(summary['mean_tokens_per_s'], '.1f')} tokens/s"
    )
    if summary.get("gen_ppl") is not None:
        line += (
            f"; Gen. PPL {summary['gen_ppl']:.2f} under {summary['evaluator']} "
            f"({summary['gen_scored_tokens']} tokens, windows {summary['gen_max_length']}/{summary['gen_stride']})"
        )
    return line
