"""Semi-autoregressive generation (Alg. 2), of any length, and the AR baseline's next-token loop.

Alg. 2: for b = 1, 2, …: x^b ← SAMPLE(x_θ^b, K^{1:b-1}, V^{1:b-1}); then K^b, V^b ← x_θ^b(x^b) is
appended to the cache. Here a block's context is the window [c(s), s) of `ContextWindow`, which is
the whole prefix until the sample outgrows the training context L (Sec. 6.2). Blocks are aligned
to absolute position 0 of the sequence; a prompt fills the first positions, and a block it only
partly covers is completed around the given tokens. In the last block, positions past the token
budget stay masked and are never sampled, so no NFE is spent on tokens that would be cut.

Samples in a batch share the model calls but nothing else: each stops on its own (EOS, budget,
repetition; see `stopping.py`) and its rows then leave the batch and the cache. They continue one
prompt, or one prompt each (prompts of one length, so the blocks of every row line up).

Table 6's protocol: a sample is L tokens, BOS (the prompt) included, so the default budget is
L - len(prompt); under the paper's stop rule a rejected sample is drawn again (`redraw_seed`).
NFEs count the calls of x_θ that denoise a block (Alg. 2; AR: one per generated token), those of
the kept draw only, as the reference code counts them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from .block_context import CachedContext, RecomputeContext
from .context_window import ContextWindow, SlidingRule, context_window
from .distributions import draw_categorical, shape_probs
from .errors import Sad3Error
from .field_help import described
from .kv_cache import KVCache
from .masks import AttentionMask
from .registry import SAMPLERS, make_sampler, objective_entry
from .samplers import SamplerName, denoise_block
from .stopping import STOP_RULES, StopCriteria, StopRule, low_entropy_action

# Called with every model output used for sampling: (block start, or the predicted position for
# AR; logits [rows, L', vocab]). For tests and diagnostics.
LogitsHook = Callable[[int, torch.Tensor], None]


@dataclass
class SamplingConfig:
    """Settings of Alg. 2 (and of the AR baseline's loop): the one place their defaults live."""

    num_tokens: int | None = field(default=None, metadata=described("token budget per sample, prompt not included (default: L - prompt, so BOS + sample = L)"))
    block_size: int | None = field(default=None, metadata=described("L' (default: the model's; must divide L; unused by the AR baseline)"))
    steps: int = field(default=1000, metadata=described("T per block: ancestral steps, or the cap on confident-decoding steps"))
    sampler: SamplerName | None = field(default=None, metadata=described("within-block sampler (default: the objective's, core/registry.py: euler for SEDD, else ancestral)"))
    threshold: float = field(default=0.9, metadata=described("confident: commit positions whose top probability reaches it"))
    temperature: float = field(default=1.0, metadata=described("divide logits by this before drawing"))
    top_p: float = field(default=1.0, metadata=described("nucleus sampling mass in (0, 1] (1: off)"))
    batch_size: int = field(default=1, metadata=described("samples generated together"))
    seed: int = field(default=0, metadata=described("seed of every draw (a CPU generator: the same samples on any device)"))
    kv_cache: bool = field(default=True, metadata=described("recompute the context at every step (the reference)", flag="--no-kv-cache", invert=True))
    window: int | None = field(default=None, metadata=described("most context tokens a block sees (default L - L')"))
    window_keep: int | None = field(default=None, metadata=described("tokens kept when the window slides (default: per --sliding)"))
    sliding: SlidingRule = field(default="halving", metadata=described("halving: keep half the window when it slides; exact: re-encode per block"))
    stop_at_eos: bool = field(default=True, metadata=described("do not stop at EOS (fixed-length samples)", flag="--ignore-eos", invert=True))
    stop_rule: StopRule = field(default="paper", metadata=described("paper (Table 6: reject a fixed-length sample whose last 256 tokens fall under 4 nats, truncate a variable-length one) or sad3 (last 64 under 1.5 nats: stop and keep)"))
    min_entropy: float | None = field(default=None, metadata=described("entropy floor in nats (0: off; default: the rule's)"))
    entropy_window: int | None = field(default=None, metadata=described("recent tokens the entropy is measured on (default: the rule's)"))
    max_redraws: int = field(default=10, metadata=described("draws of a rejected sample before it is kept and reported as rejected"))

    def check(self) -> None:
        """Check the settings that do not depend on the model (before loading one)."""
        if self.num_tokens is not None and self.num_tokens < 1:
            raise Sad3Error(f"--num-tokens must be at least 1, got {self.num_tokens}")
        if self.steps < 1:
            raise Sad3Error(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise Sad3Error(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.top_p <= 1.0:
            raise Sad3Error(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise Sad3Error(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 < self.threshold <= 1.0:
            raise Sad3Error(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise Sad3Error(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.stop_rule not in STOP_RULES:
            raise Sad3Error(f"unknown --stop-rule {self.stop_rule!r}: choose one of {', '.join(STOP_RULES)}")
        window, floor = self.entropy_rule()
        if floor < 0.0 or window < 1 or self.max_redraws < 0:
            raise Sad3Error(
                f"--min-entropy must be >= 0, --entropy-window >= 1 and --max-redraws >= 0 "
                f"(got {floor}, {window}, {self.max_redraws})"
            )

    def entropy_rule(self) -> tuple[int, float]:
        """(entropy window, floor): the stop rule's, unless set explicitly."""
        window, floor = STOP_RULES[self.stop_rule]
        return (
            window if self.entropy_window is None else self.entropy_window,
            floor if self.min_entropy is None else self.min_entropy,
        )

    def for_model(self, objective: str, seq_len: int, prompt_len: int) -> SamplingConfig:
        """Every default filled in for a model trained with `objective` on `seq_len` tokens: its
        sampler (the registry's), L' = 1 for the AR baseline, and the budget L - len(prompt)."""
        self.check()
        entry = objective_entry(objective)
        return replace(
            self,
            sampler=self.sampler or entry.default_sampler,
            block_size=1 if entry.autoregressive else self.block_size,
            num_tokens=token_budget(self.num_tokens, seq_len, prompt_len),
        )

    def window_for(self, seq_len: int, autoregressive: bool = False) -> ContextWindow:
        """Check a resolved config against a model trained on `seq_len` tokens; returns its window."""
        self.check()
        if self.num_tokens is None:
            raise Sad3Error("the token budget num_tokens is not set")
        if self.block_size is None:
            raise Sad3Error("the block size is not set: pass the checkpoint's L' or a divisor of its context")
        block = 1 if autoregressive else self.block_size
        if block < 1 or seq_len % block:
            raise Sad3Error(
                f"--block-size {self.block_size} does not divide the model's context length {seq_len}: pick a divisor"
            )
        return context_window(seq_len, block, self.window, self.window_keep, autoregressive, self.sliding)


def token_budget(num_tokens: int | None, seq_len: int, prompt_len: int) -> int:
    """`num_tokens`, or by default L - len(prompt): prompt + sample = L tokens, as in Table 6."""
    if num_tokens is not None:
        return num_tokens
    if prompt_len >= seq_len:
        raise Sad3Error(
            f"the prompt has {prompt_len} tokens, the model's whole context L = {seq_len}: pass --num-tokens"
        )
    return seq_len - prompt_len


Prompt = list[int] | list[list[int]]  # one prompt for every sample, or one per sample (all of one length)


def prompt_rows(prompt: Prompt, batch_size: int) -> torch.Tensor:
    """The prompt of every sample, [batch_size, prompt length]."""
    try:
        rows = torch.as_tensor(prompt, dtype=torch.long)
    except ValueError:
        raise Sad3Error("the prompts of one batch must have the same number of tokens") from None
    if rows.dim() == 1:  # one prompt for every sample
        return rows[None].expand(batch_size, -1)
    if rows.shape[0] == 1:
        return rows.expand(batch_size, -1)
    if rows.shape[0] != batch_size:
        raise Sad3Error(f"{rows.shape[0]} prompts for a batch of {batch_size} samples: give one, or one per sample")
    return rows


def redraw_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of the `attempt`-th redraw of sample `index` of a run seeded with `seed`: a pure
    function, so a run is reproducible and no redraw depends on which other samples were rejected."""
    digest = hashlib.sha256(f"sad3-redraw/{seed}/{index}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Sample:
    tokens: list[int]  # the generated tokens, prompt excluded, truncated after EOS
    length: int
    stop_reason: str  # one of stopping.STOP_REASONS ("rejected": still degenerate after max_redraws)
    nfe: int  # calls of x_θ that included this sample (Table 6), clean K/V passes not counted
    seconds: float  # from the start of generation until this sample stopped (redraws included)
    rejections: int = 0  # draws of this sample rejected by the paper's stop rule

    @property
    def tokens_per_s(self) -> float:
        return self.length / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class GenerationResult:
    samples: list[Sample]
    seconds: float
    clean_passes: int  # batched forwards over clean tokens only (K/V appends and re-encodes)
    window: ContextWindow
    config: SamplingConfig | None = None  # the resolved settings that drew the samples

    @property
    def tokens_per_s(self) -> float:
        return sum(s.length for s in self.samples) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def rejections(self) -> int:
        return sum(s.rejections for s in self.samples)


class _Rows:
    """Which samples are still running, and what the finished ones produced."""

    def __init__(self, batch: int):
        self.active = torch.arange(batch)
        self.nfe = torch.zeros(batch, dtype=torch.long)
        self.samples: list[Sample | None] = [None] * batch
        self.start = time.perf_counter()

    def finish(
        self, tokens: torch.Tensor, prompt_len: int, reasons: list[str | None], lengths: torch.Tensor
    ) -> torch.Tensor:
        """Record the stopped rows; returns the keep mask over the previously active rows."""
        keep = torch.tensor([r is None for r in reasons], dtype=torch.bool)
        if keep.all():
            return keep
        now = time.perf_counter() - self.start
        for i, reason in enumerate(reasons):
            if reason is not None:
                row, length = int(self.active[i]), int(lengths[i])
                ids = tokens[row, prompt_len : prompt_len + length].tolist()
                self.samples[row] = Sample(ids, length, reason, int(self.nfe[row]), now)
        self.active = self.active[keep]
        return keep

    @property
    def done(self) -> bool:
        return self.active.numel() == 0


def _stop_criteria(config: SamplingConfig, eos_id: int | None) -> StopCriteria:
    eos = eos_id if config.stop_at_eos else None
    window, floor = config.entropy_rule()
    return StopCriteria(config.num_tokens, eos, floor, window, low_entropy_action(config.stop_rule, eos is None))


def _redraw_rejected(
    result: GenerationResult, config: SamplingConfig, draw: Callable, start: float, prompts: torch.Tensor
) -> None:
    """Draw each rejected sample again, alone, with `redraw_seed`, up to `config.max_redraws` times."""
    for index, sample in enumerate(result.samples):
        attempt = 0
        while sample.stop_reason == "rejected" and attempt < config.max_redraws:
            attempt += 1
            seed = redraw_seed(config.seed, index, attempt)
            again = draw(replace(config, batch_size=1, seed=seed), prompt=prompts[index].tolist())
            result.clean_passes += again.clean_passes
            sample = again.samples[0]
        sample.rejections = attempt + (sample.stop_reason == "rejected")
        if attempt:
            sample.seconds = time.perf_counter() - start
            result.samples[index] = sample
    result.seconds = time.perf_counter() - start


@torch.inference_mode()
def generate_blocks(
    model,
    config: SamplingConfig,
    window: ContextWindow,
    *,
    mask_id: int,
    eos_id: int | None,
    prompt: Prompt,
    logits_hook: LogitsHook | None = None,
    shift: bool = False,
    clean_block_size: int | None = None,
) -> GenerationResult:
    """Alg. 2 with the configured within-block sampler, cached or recomputed context; `shift` and
    `clean_block_size` are the trained objective's (block_context.py)."""
    device = next(model.parameters()).device
    prompts = prompt_rows(prompt, config.batch_size)
    block, start_len = config.block_size, prompts.shape[1]
    end = start_len + config.num_tokens
    capacity = -(-end // block) * block
    tokens = torch.full((config.batch_size, capacity), mask_id, dtype=torch.long, device=device)
    tokens[:, :start_len] = prompts.to(device)
    in_budget = torch.arange(capacity, device=device) < end
    kind = CachedContext if config.kv_cache else RecomputeContext
    context = kind(model, block, shift, clean_block_size)
    sampler = make_sampler(config.sampler, config.steps, config.threshold)
    stop = _stop_criteria(config, eos_id)
    generator = torch.Generator().manual_seed(config.seed)
    rows = _Rows(config.batch_size)
    for s in range(start_len // block * block, capacity, block):
        active = rows.active.to(device)
        current = tokens.index_select(0, active)
        context.prepare(current, window.start(s), s)

        def denoise(index: torch.Tensor | None, x_t: torch.Tensor, s: int = s) -> torch.Tensor:
            logits = context.denoise(index, x_t, s)
            if logits_hook is not None:
                logits_hook(s, logits)
            return logits

        x = current[:, s : s + block]
        todo = (x == mask_id) & in_budget[s : s + block]
        result = denoise_block(x, todo, denoise, sampler, generator, config.temperature, config.top_p)
        tokens[active, s : s + block] = result.tokens
        rows.nfe[rows.active] += result.nfe.cpu()
        generated = tokens[active, start_len : min(s + block, end)]
        reasons, lengths = stop.check(generated, max(s, start_len) - start_len)
        keep = rows.finish(tokens, start_len, reasons, lengths)
        if rows.done:
            break
        if not keep.all():
            context.keep_rows(keep.to(device))
    return GenerationResult(rows.samples, time.perf_counter() - rows.start, context.clean_passes, window)


@torch.inference_mode()
def generate_autoregressive(
    model,
    config: SamplingConfig,
    window: ContextWindow,
    *,
    eos_id: int | None,
    prompt: Prompt,
    logits_hook: LogitsHook | None = None,
) -> GenerationResult:
    """The AR baseline (Eq. 1): one NFE per token. With the cache, each step feeds the last token
    against the cached keys/values of its window and appends its own; without it, the window is
    recomputed under the causal mask (M_BC with L' = 1) every step."""
    prompts = prompt_rows(prompt, config.batch_size)
    if prompts.shape[1] == 0:
        raise Sad3Error("the AR baseline needs at least one prompt token to condition on (e.g. BOS)")
    device = next(model.parameters()).device
    start_len, end = prompts.shape[1], prompts.shape[1] + config.num_tokens
    tokens = torch.zeros((config.batch_size, end), dtype=torch.long, device=device)
    tokens[:, :start_len] = prompts.to(device)
    cache = KVCache()
    stop = _stop_criteria(config, eos_id)
    generator = torch.Generator().manual_seed(config.seed)
    rows = _Rows(config.batch_size)
    for p in range(start_len, end):  # predict token p from the window [c, p)
        active = rows.active.to(device)
        c = window.start(p - 1)  # the window counts the cached tokens before the fed one
        if config.kv_cache and p - 1 > c and cache.covers(c, p - 1):
            fed = tokens[active, p - 1 : p]
            out = model(fed, torch.tensor([p - 1], device=device), None, past_kv=cache.layers, return_kv=True)
            cache.append(out.kv)
        else:  # first step, a slid window, or no cache: the whole window under the causal mask
            context = tokens[active, c:p]
            out = model(
                context, torch.arange(c, p, device=device), AttentionMask.causal(p - c), return_kv=config.kv_cache
            )
            if config.kv_cache:
                cache.replace(out.kv, c, p)
        logits = out.logits[:, -1:]
        if logits_hook is not None:
            logits_hook(p, logits)
        probs = shape_probs(logits[:, 0], config.temperature, config.top_p)
        tokens[active, p] = draw_categorical(probs, generator)
        rows.nfe[rows.active] += 1
        reasons, lengths = stop.check(tokens[active, start_len : p + 1], p - start_len)
        keep = rows.finish(tokens, start_len, reasons, lengths)
        if rows.done:
            break
        if not keep.all():
            cache.keep_rows(keep.to(device))
    return GenerationResult(rows.samples, time.perf_counter() - rows.start, 0, window)


def generate(
    model,
    config: SamplingConfig,
    *,
    seq_len: int,
    mask_id: int,
    eos_id: int | None,
    prompt: Prompt,
    objective: str = "sad3",
    logits_hook: LogitsHook | None = None,
    shift: bool = False,
    clean_attention: str = "block_causal",
) -> GenerationResult:
    """Sample `config.batch_size` sequences from a model trained with `objective` (registry name):
    Alg. 2 for diffusion models, next-token for the AR baseline. Every sample continues `prompt`,
    or its own row of it (one prompt per sample, all of one length).

    `seq_len` is the training context L, which bounds the context window; samples may be longer,
    and are L - len(prompt) tokens by default. The result carries the settings with every default
    filled in (`SamplingConfig.for_model`). `shift` and `clean_attention` are the model's training
    switches (DiffusionConfig): sampling reads the context the way training did."""
    autoregressive = objective_entry(objective).autoregressive
    prompts = prompt_rows(prompt, config.batch_size)
    config = config.for_model(objective, seq_len, prompts.shape[1])
    window = config.window_for(seq_len, autoregressive)
    if (prompts == mask_id).any():
        raise Sad3Error("the prompt contains the mask token; it must be clean text")
    if shift and not autoregressive and (not prompt or window.size == 0):
        raise Sad3Error("a token-shift model predicts each token from the one before: give a prompt (BOS) and --window > 0")
    if autoregressive:
        draw = partial(generate_autoregressive, model, window=window, eos_id=eos_id, prompt=prompt)
    else:
        clean_block = 1 if clean_attention == "causal" else None
        draw = partial(generate_blocks, model, window=window, mask_id=mask_id, eos_id=eos_id, prompt=prompt,
                       shift=shift, clean_block_size=clean_block)  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        result = draw(config, logits_hook=logits_hook)
        _redraw_rejected(result, config, draw, start, prompts)  # the hook sees the first draw only
        result.config = config
        return result
    finally:
        model.train(was_training)
