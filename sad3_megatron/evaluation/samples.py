"""`sad3 sample`: samples drawn from a checkpoint or an export, and the JSON file that holds them.

`SampleFile` is the file's one owner: `sad3 sample --json/--out` writes it, `sad3 eval-samples`
reads it back, and no other code touches its keys.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.generate import GenerationResult, Sample, SamplingConfig, generate
from sad3_megatron.core.registry import objective_entry
from sad3_megatron.data.chat import chat_prompt
from sad3_megatron.data.tokenizers import Tokenizer


@dataclass
class SampleRecord:
    text: str  # the sample decoded, documents run together (for display)
    tokens: list[int] = field(default_factory=list)  # generated ids, prompt excluded, truncated after EOS
    documents: list[str] = field(default_factory=list)  # the texts of its EOS-separated pieces (Gen. PPL)
    nfe: int | None = None  # calls of x_θ that denoised this sample's blocks (Table 6)
    length: int | None = None
    stop_reason: str | None = None  # core/stopping.py STOP_REASONS
    rejections: int = 0  # draws rejected by the paper's stop rule
    seconds: float | None = None
    tokens_per_s: float | None = None

    @classmethod
    def of(cls, sample: Sample, tokenizer: Tokenizer) -> SampleRecord:
        def decode(ids: list[int]) -> str:
            return tokenizer.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)

        documents = [decode(d) for d in split_documents(sample.tokens, tokenizer.eos_id)]
        return cls(decode(sample.tokens), sample.tokens, documents, sample.nfe, sample.length, sample.stop_reason,
                   sample.rejections, sample.seconds, sample.tokens_per_s)  # fmt: skip


@dataclass
class SampleFile:
    """Everything `sad3 sample` reports: the resolved settings, timings and the samples."""

    checkpoint: str
    objective: str
    tokenizer: str
    seq_len: int
    settings: dict  # SamplingConfig with every default filled in (core/generate.py)
    sampler: str  # the within-block sampler, or "autoregressive"
    window: int
    window_keep: int
    prompt_tokens: int
    sequence_length: int  # the longest sample with its prompt (BOS included): L by default (Table 6)
    entropy_window: int
    min_entropy: float
    rejections: int
    seconds: float
    tokens_per_s: float
    mean_nfe: float
    clean_passes: int  # batched forwards over clean tokens only (K/V appends and re-encodes)
    samples: list[SampleRecord]

    @classmethod
    def of(cls, result: GenerationResult, checkpoint: str, cfg, tokenizer: Tokenizer, prompt_len: int) -> SampleFile:
        config = result.config
        records = [SampleRecord.of(s, tokenizer) for s in result.samples]
        autoregressive = objective_entry(cfg.diffusion.objective).autoregressive
        window, floor = config.entropy_rule()
        return cls(
            str(checkpoint), cfg.diffusion.objective, cfg.data.tokenizer, cfg.model.seq_len, asdict(config),
            "autoregressive" if autoregressive else config.sampler, result.window.size, result.window.keep,
            prompt_len, prompt_len + config.num_tokens, window, floor, result.rejections, result.seconds,
            result.tokens_per_s, sum(r.nfe for r in records) / len(records), result.clean_passes, records,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """One flat JSON object: the resolved settings' fields, then the file's own (which win)."""
        record = asdict(self)
        return {**record.pop("settings"), **record}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> list[SampleRecord]:
        """The samples of a `sad3 sample --json` / `--out` file (older files without `documents` too)."""
        path = Path(path)
        if not path.is_file():
            raise Sad3Error(f"samples file {str(path)!r} not found: write one with `sad3 sample ... --out FILE`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise Sad3Error(f"samples file {str(path)!r} is not JSON ({err.msg} at line {err.lineno})") from None
        samples = data.get("samples") if isinstance(data, dict) else None
        if not isinstance(samples, list) or not all(isinstance(s, dict) and "text" in s for s in samples):
            raise Sad3Error(f"{str(path)!r} is not a `sad3 sample` output: expected an object with a `samples` list")
        if not samples:
            raise Sad3Error(f"{str(path)!r} holds no samples")
        known = {f.name for f in fields(SampleRecord)}
        return [SampleRecord(**{k: v for k, v in s.items() if k in known}) for s in samples]

    def lines(self) -> list[str]:
        """What `sad3 sample` prints without --json: each sample, then a summary."""
        out = []
        for i, s in enumerate(self.samples):
            out.append(f"--- sample {i}: {s.length} tokens, stop: {s.stop_reason}, {s.nfe} NFEs, {s.tokens_per_s:.1f} tokens/s")
            if s.stop_reason == "eos" and s.length <= 1:
                out.append("(stopped at EOS after 0 tokens: the model ended the document immediately; "
                           "use --ignore-eos or --prompt)")  # fmt: skip
            out.append(s.text)
        c = self.settings
        how = "AR, next-token" if self.sampler == "autoregressive" else f"L'={c['block_size']}, {self.sampler}, T={c['steps']}"
        cache = "KV cache" if c["kv_cache"] else "no KV cache"
        total = sum(s.length for s in self.samples)
        out.append(f"sad3 sample: {len(self.samples)} samples, {total} tokens in {self.seconds:.2f} s "
                   f"({self.tokens_per_s:.1f} tokens/s); {how}; {cache}, window {self.window} (keep {self.window_keep})")  # fmt: skip
        return out


def split_documents(tokens: Sequence[int], eos_id: int | None) -> list[list[int]]:
    """The EOS-separated pieces of a sample's tokens (EOS dropped; a final EOS ends the last piece)."""
    pieces: list[list[int]] = [[]]
    for token in tokens:
        if token == eos_id:
            pieces.append([])
        else:
            pieces[-1].append(token)
    return pieces[:-1] if len(pieces) > 1 and not pieces[-1] else pieces


def sample_checkpoint(
    checkpoint: str, config: SamplingConfig, prompt: str | None = None, use_ema: bool = True, chat: bool = False
) -> SampleFile:
    """Draw `config.batch_size` samples from a run, checkpoint or export (Alg. 2; the AR baseline
    next-token), continuing BOS + `prompt`, with the model's L' and its objective's sampler by default.
    With `chat`, `prompt` is a user message rendered with the tokenizer's chat template (data/chat.py)."""
    from sad3_megatron.engine.build import load_components  # megatron: only once the flags are checked

    config.check()
    # SDPA: query and key lengths change at every step, which a compiled FlexAttention would
    # recompile for. DeepSpeed announces its communication op on stdout while the model is set up:
    # keep stdout for the --json result.
    with contextlib.redirect_stdout(sys.stderr):
        parts, ckpt = load_components(checkpoint, use_ema=use_ema, backend="sdpa")
    cfg, tok = parts.cfg, parts.tokenizer
    if chat:
        if not prompt:
            raise Sad3Error("--chat renders --prompt as a user message: give --prompt TEXT")
        ids = chat_prompt(tok, prompt)
    else:
        ids = [tok.bos_id] + (tok.encode(prompt) if prompt else [])
    if config.block_size is not None and cfg.diffusion.objective == "ar":
        raise Sad3Error("--block-size applies to diffusion checkpoints; this one is the AR baseline")
    config = SamplingConfig(**{**asdict(config), "block_size": config.block_size or cfg.diffusion.block_size})
    d = cfg.diffusion
    result = generate(parts.model, config, seq_len=cfg.model.seq_len, mask_id=tok.mask_id, eos_id=tok.eos_id,
                      prompt=ids, objective=d.objective, shift=d.shift, clean_attention=d.clean_attention)  # fmt: skip
    return SampleFile.of(result, str(ckpt), cfg, tok, len(ids))
