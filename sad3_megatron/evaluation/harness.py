"""Every sad3 model as an lm-evaluation-harness model (lm-eval 0.4.13), registered as `sad3`.

`Sad3LM(pretrained=DIR, ...)` takes a run, a checkpoint or an export (`engine/build.load_components`),
so the AR baseline, SAD3-LMs of any L', MDLM and SEDD are scored by their run's own objective
(core/registry.py). `sad3 lm-eval DIR [harness flags]` registers it and hands the rest of the command
line to the harness's own CLI (lm-eval 0.4.13 does not look for models in installed packages; setup.py
also declares the `lm_eval.models` entry point that later releases read). Details: docs/lm-eval.md.

- Rows. A request is one row as the model was trained on: context ⊕ continuation at positions 0..,
  at most `max_length` + 1 tokens (default: a training row, L tokens; L - 1 under the `rows` framing,
  whose last position always holds its EOS). Position 0 is context, as the row's BOS is in training.
- `loglikelihood`: the AR baseline's exact log-probability of the continuation; for diffusion models
  minus the NELBO of Eq. 7 of the continuation given its clean context (`core/likelihood.py`
  `estimate_continuations`: t integrated out as `sad3 eval`, `draws` draws), exact at L' = 1.
  `is_greedy`: greedy decoding of the continuation, one position at a time from left to right with
  the rest of its block masked, reproduces it (HFLM's rule for the AR baseline).
- `loglikelihood_rolling`: the harness's disjoint windows of `max_length` scored tokens, the first
  after BOS ([BOS] doc, as a training row opens a document), each later one a full row whose clean
  context is the text before it; the same bound summed over the windows.
- `generate_until`: Alg. 2 (`core/generate.generate`) with the model's sampling defaults, overridable
  by model_args; greedy requests (do_sample false) take the argmax at every committed position.
- Tokenization follows HFLM (TemplateLM's context/continuation split, BOS when the tokenizer's own
  encoding starts with it), without the trailing specials some tokenizers add ([SEP]).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.field_help import described
from sad3_megatron.core.generate import SamplingConfig, generate
from sad3_megatron.core.likelihood import continuation_rows, estimate_continuations
from sad3_megatron.core.registry import build_objective, objective_entry
from sad3_megatron.evaluation.bound import EvalSettings

GREEDY_TOP_P = 1e-9  # a nucleus of (almost) no mass keeps the most likely token only: the argmax
AUTO_BATCH = 32  # batch_size=auto: no memory probing, this many requests (or max_batch_size)
# SamplingConfig fields a request or the harness sets: the budget, the batch, and the shared seed / L'
NOT_SAMPLING_ARGS = ("num_tokens", "batch_size", "seed", "block_size")
IGNORED_ARGS = ("trust_remote_code",)  # `lm-eval --trust_remote_code` adds it; sad3 runs no remote code


@dataclass
class HarnessSettings:
    """What `--model_args` sets besides `pretrained` (and any SamplingConfig field for generate_until)."""

    draws: int = field(default=EvalSettings.draws, metadata=described("Monte-Carlo draws of the noise per request (the AR baseline and L' = 1 are exact in one)"))  # fmt: skip
    seed: int = field(default=0, metadata=described("seed of the noise draws and of generation"))
    block_size: int | None = field(default=None, metadata=described("L' to score and sample with (masked-diffusion models; default: the model's)"))  # fmt: skip
    max_length: int | None = field(default=None, metadata=described("tokens scored per rolling window; a request fits in max_length + 1 (default: a training row)"))  # fmt: skip
    truncation: Literal["error", "left"] = field(default="error", metadata=described("a request longer than a row: an error naming it, or left: drop its oldest context tokens (HFLM)"))  # fmt: skip
    add_bos_token: bool | None = field(default=None, metadata=described("BOS before every context (default: when the tokenizer's own encoding starts with it, as HFLM)"))  # fmt: skip
    max_gen_toks: int = field(default=256, metadata=described("generate_until budget when a task sets none (HFLM's)"))
    use_ema: bool = field(default=True, metadata=described("score the EMA weights (false: the raw ones)"))


def split_model_args(args: dict) -> tuple[HarnessSettings, dict]:
    """model_args → HarnessSettings and SamplingConfig overrides; an unknown key is an error naming the known."""
    own = {f.name for f in fields(HarnessSettings)}
    sampling = {f.name for f in fields(SamplingConfig)} - set(NOT_SAMPLING_ARGS)
    unknown = set(args) - own - sampling - set(IGNORED_ARGS)
    if unknown:
        raise Sad3Error(
            f"unknown model_args {', '.join(sorted(unknown))} for sad3: use {', '.join(sorted(own | sampling))}"
        )
    settings = HarnessSettings(**{k: v for k, v in args.items() if k in own})
    if settings.draws < 1:
        raise Sad3Error(f"model_args draws must be at least 1, got {settings.draws}")
    if settings.truncation not in ("error", "left"):
        raise Sad3Error(f"model_args truncation must be error or left, got {settings.truncation!r}")
    return settings, {k: v for k, v in args.items() if k in sampling}


def parse_batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """The harness passes an int, a string ("8"), or "auto" / "auto:N" (here: max_batch_size or AUTO_BATCH)."""
    text = str(batch_size)
    if text.startswith("auto"):
        return int(max_batch_size or AUTO_BATCH)
    if not text.isdigit() or int(text) < 1:
        raise Sad3Error(f"batch_size must be a positive integer or auto, got {batch_size!r}")
    return int(text)


def pick_device(device: str | None) -> torch.device | None:
    """The harness's --device (its CLI defaults to cuda:0); without CUDA, the CPU. None: sad3's choice."""
    if device is None:
        return None
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"sad3 lm-eval: no CUDA device for --device {device}: running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    return torch.device(device)


def request_name(request) -> str:
    """How an error names a harness request: its task and document, and the start of its context."""
    task, doc_id = (tuple(request.metadata or ()) + (None, None))[:2]
    where = f"{task} doc {doc_id}" if task is not None else f"request {request.idx}"
    return f"{where} ({str(request.args[0])[:40]!r}...)"


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@register_model("sad3")
class Sad3LM(TemplateLM):
    """A sad3 run, checkpoint or export as an lm-evaluation-harness model (see the module docstring)."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        **model_args,
    ):
        super().__init__()
        from sad3_megatron.engine.build import load_components  # megatron: only once the arguments are checked

        self.settings, self.sampling_args = split_model_args(model_args)
        self.batch_size = parse_batch_size(batch_size, max_batch_size)
        if not Path(pretrained).exists():
            raise Sad3Error(f"pretrained={pretrained!r} not found: give a run, a checkpoint or a `sad3 export` directory")
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed announces its ops on stdout; keep it for the table
            parts, self.path = load_components(pretrained, pick_device(device), self.settings.use_ema, backend="sdpa")
        self.cfg, self.tok, self.model = parts.cfg, parts.tokenizer, parts.model.eval()
        self.tokenizer = self.tok.hf  # what the harness reads for its results (special tokens, chat template)
        self._device = parts.device
        self.entry = objective_entry(self.cfg.diffusion.objective)
        self.block_size = self._scoring_block(parts.objective.block_size)
        self._max_length = self._row_limit() - 1
        own = self.tok.hf(" a", add_special_tokens=True)["input_ids"]
        bos = self.settings.add_bos_token
        self.add_bos_token = bool(own and own[0] == self.tok.bos_id) if bos is None else bos
        self._bos_text = self.tokenizer.decode([self.tok.bos_id])
        self._objectives: dict[int, object] = {}
        self._names: dict = {}
        print(f"sad3 lm-eval: {self.describe()}", file=sys.stderr)

    def _scoring_block(self, trained: int) -> int:
        """L' of the scoring rows: the model's, or `block_size` for a masked-diffusion (sad3) model."""
        if self.entry.autoregressive:
            return 1
        block, seq_len = self.settings.block_size, self.cfg.model.seq_len
        if block is None:
            return trained
        if self.cfg.diffusion.objective != "sad3":
            raise Sad3Error(f"model_args block_size applies to masked-diffusion (sad3) models; this one is {self.cfg.diffusion.objective}")  # fmt: skip
        if block < 1 or seq_len % block:
            raise Sad3Error(f"model_args block_size={block} does not divide the model's context length {seq_len}")
        return block

    def _row_limit(self) -> int:
        """Tokens in one row: a training row (L; L - 1 under the rows framing, whose last slot is its EOS)."""
        seq_len = self.cfg.model.seq_len
        default = seq_len - 1 if self.cfg.data.framing == "rows" else seq_len
        if self.settings.max_length is None:
            return default
        if not 1 <= self.settings.max_length <= seq_len - 1:
            raise Sad3Error(f"model_args max_length={self.settings.max_length}: rows of max_length + 1 tokens must fit in L = {seq_len}")  # fmt: skip
        return self.settings.max_length + 1

    @property
    def exact(self) -> bool:
        """Whether loglikelihoods are exact (the AR baseline, L' = 1) rather than bounds (-NELBO)."""
        return self.entry.autoregressive or self.block_size == 1

    def describe(self) -> str:
        objective = self.cfg.diffusion.objective
        if self.exact:
            return f"{self.path} ({objective}): exact log-probabilities, rows of {self._max_length + 1} tokens"
        return (
            f"{self.path} ({objective}, L'={self.block_size}): loglikelihoods are bounds (-NELBO, {self.settings.draws} "
            f"draws, t integrated out), perplexities upper bounds; rows of {self._max_length + 1} tokens"
        )

    # --- what the harness reads ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # an empty context, and a document's first window, start with BOS

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def get_model_info(self) -> dict:
        """Merged into the results JSON's `config`: what was scored, and whether the numbers are bounds."""
        return {
            "sad3": {
                "directory": str(self.path),
                "objective": self.cfg.diffusion.objective,
                "block_size": None if self.entry.autoregressive else self.block_size,
                "seq_len": self.cfg.model.seq_len,
                "framing": self.cfg.data.framing,
                "row_tokens": self._max_length + 1,
                "loglikelihood": "exact log-probability" if self.exact else "bound: -NELBO (Eq. 7), t integrated out",
                "perplexity": "exact" if self.exact else "upper bound",
                "draws": 1 if self.exact else self.settings.draws,
                "is_greedy": "greedy left-to-right decoding of the continuation, the rest of its block masked, reproduces it",
                "settings": asdict(self.settings),
                "sampling": self.sampling_args,
            },
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM's rule: BOS when asked (by default: `add_bos_token`), but not before a string that already
        starts with it; special tokens written in the text (chat templates) are special tokens."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self._bos_text):
            bos = False
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        return [self.tok.bos_id, *ids] if bos else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise Sad3Error(f"the tokenizer of {self.path} has no chat template: run without --apply_chat_template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )  # fmt: skip

    # --- loglikelihood ------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._names = {request.args: request_name(request) for request in requests}
        try:
            return super().loglikelihood(requests, disable_tqdm)  # TemplateLM's (HFLM's) tokenization
        finally:
            self._names = {}

    def _fit(self, context: list[int], continuation: list[int], name: str) -> tuple[list[int], list[int]]:
        """The request as one row, or an error naming it (`truncation=left`: drop the oldest context)."""
        row = self._max_length + 1
        if len(context) + len(continuation) <= row:
            return context, continuation
        if self.settings.truncation == "left" and len(continuation) < row:
            return context[len(context) + len(continuation) - row :], continuation
        raise Sad3Error(
            f"{name}: {len(context)} context + {len(continuation)} continuation tokens exceed a row of {row} tokens "
            f"(max_length {self._max_length} + 1): shorten it, or pass --model_args truncation=left to drop its oldest context tokens"
        )

    def _objective(self, width: int):
        """The run's objective over rows of `width` tokens (a multiple of the scoring L')."""
        if width not in self._objectives:
            d = self.cfg.diffusion
            objective = build_objective(d, width, self.tok.mask_id, block_size=self.block_size)
            self._objectives[width] = objective.bound()  # the NELBO's own weights, whatever training optimised
        return self._objectives[width]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, greedy: bool = True, **kwargs):
        """Score (key, context ids, continuation ids) requests in batches of rows of similar length."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = {}
        for i, (key, context, continuation) in enumerate(requests):
            if not continuation:
                results[i] = (0.0, True)
            else:
                rows[i] = self._fit(context, continuation, self._names.get(key, f"request {i}"))
        order = sorted(rows, key=lambda i: -sum(map(len, rows[i])))
        for chunk in tqdm(list(batches(order, self.batch_size)), desc="sad3 loglikelihood", disable=disable_tqdm):
            x, scored = continuation_rows([rows[i] for i in chunk], self.block_size, self.tok.mask_id)
            estimate = estimate_continuations(
                self.model, self._objective(x.shape[1]), x.to(self._device), scored.to(self._device),
                self.settings.draws, self.settings.seed, greedy=greedy,
            )  # fmt: skip
            for i, nll, match in zip(chunk, estimate.nll.tolist(), estimate.greedy.tolist(), strict=True):
                results[i] = (-nll, bool(match))
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document in the harness's disjoint windows of `max_length` scored tokens (lm_eval.utils),
        all windows of all documents batched together; the document's score is their sum."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0], add_special_tokens=False)  # BOS comes as the prefix token
            pairs = lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self._max_length, 1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm, greedy=False), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generate_until -----------------------------------------------------------------------------
    def _sampling(self, request_kwargs: dict, budget: int, batch: int) -> SamplingConfig:
        """Alg. 2's settings for a request: the model's defaults, model_args, then the request's own
        temperature / top_p (greedy when it does not sample). No entropy stop unless model_args ask."""
        values = {"min_entropy": 0.0, **self.sampling_args}
        if request_kwargs.get("do_sample"):
            values["temperature"] = float(request_kwargs.get("temperature") or values.get("temperature", 1.0))
            values["top_p"] = float(request_kwargs.get("top_p", values.get("top_p", 1.0)))
        else:
            values["top_p"] = GREEDY_TOP_P
        block = None if self.entry.autoregressive else self.block_size
        return SamplingConfig(**values, num_tokens=budget, batch_size=batch, seed=self.settings.seed, block_size=block)

    def _prompt(self, request, budget: int) -> list[int]:
        context = request.args[0]
        prompt = self.tok_encode(context) if context else [self.prefix_token_id]
        row = self._max_length + 1
        if len(prompt) + budget <= row:
            return prompt
        if self.settings.truncation == "left" and budget < row:
            return prompt[len(prompt) + budget - row :]
        raise Sad3Error(
            f"{request_name(request)}: {len(prompt)} prompt tokens + max_gen_toks {budget} exceed a row of {row} tokens "
            f"(max_length {self._max_length} + 1): lower max_gen_toks, shorten the prompt, or pass --model_args truncation=left"
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Alg. 2 on batches of requests with one generation setting and prompt length; the text is cut
        at the first stop string (the budget and EOS end generation)."""
        eos_text = self.tokenizer.decode([self.eot_token_id])
        groups: dict[tuple, list] = {}
        for i, request in enumerate(requests):
            kwargs = normalize_gen_kwargs(request.args[1], self.settings.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            budget = kwargs.pop("max_gen_toks")
            prompt = self._prompt(request, budget)
            key = (len(prompt), budget, bool(kwargs.get("do_sample")), kwargs.get("temperature"), kwargs.get("top_p"))
            groups.setdefault(key, []).append((i, prompt, until, kwargs, budget))
        results: list[str | None] = [None] * len(requests)
        jobs = [chunk for group in groups.values() for chunk in batches(group, self.batch_size)]
        d = self.cfg.diffusion
        for chunk in tqdm(jobs, desc="sad3 generate_until", disable=disable_tqdm):
            _, _, _, kwargs, budget = chunk[0]
            result = generate(
                self.model, self._sampling(kwargs, budget, len(chunk)), seq_len=self.cfg.model.seq_len,
                mask_id=self.tok.mask_id, eos_id=self.tok.eos_id, prompt=[item[1] for item in chunk],
                objective=d.objective, shift=d.shift, clean_attention=d.clean_attention,
            )  # fmt: skip
            for (i, _, until, _, _), sample in zip(chunk, result.samples, strict=True):
                results[i] = postprocess_generated_text(self.tok_decode(sample.tokens), until, None)
        for request, text in zip(requests, results, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results


def run_harness(directory: str, harness_args: list[str]) -> None:
    """`sad3 lm-eval DIR ARGS`: the harness's own CLI (`lm-eval run`), with `--model sad3 --model_args
    pretrained=DIR` put first, so every harness flag works and its results files are written as usual.
    More `--model_args key=value` merge with pretrained (the harness merges repeated ones)."""
    from lm_eval.__main__ import cli_evaluate

    if not Path(directory).exists():
        raise Sad3Error(f"{directory!r} not found: give a run, a checkpoint or a `sad3 export` directory")
    if any(arg == "--model" or arg.startswith("--model=") for arg in harness_args):
        raise Sad3Error("sad3 lm-eval sets --model sad3 itself: drop --model (model options go in --model_args)")
    argv = sys.argv
    sys.argv = ["lm-eval", "run", "--model", "sad3", "--model_args", f"pretrained={Path(directory).resolve()}", *harness_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
