"""Training objectives as configurations of one code path (`registry.py` builds them by name).

`BlockDiffusionObjective` is the SAR NELBO of Eq. 7/8 for any block size L' dividing L:
L' = L is MDLM, L' = 1 with the fully-masking schedule (clipped, β = ω = 1) equals the AR NLL
(Suppl. B). `AutoregressiveObjective` is the plain next-token baseline on the same model, and with
`random_tokens` Table 1's "AR + random batch size" control. SEDD's score entropy is in `sedd.py`.

Both score the same tokens: position 0 of a row (its BOS in the paper's framing) is context only —
never a target of the AR baseline, kept clean and unscored by the diffusion objective (the
reference code's `ignore_bos`) — and every per-token value divides by the L - 1 scored tokens.

The model is any callable with the interface of `network.Network.forward` (Eq. 6); nothing here
imports DeepSpeed or megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .masks import AttentionMask, DocumentMask, document_window_ids, doubled_positions
from .noising import NoisedBatch, mask_blocks
from .schedules import NoiseSchedule


class Denoiser(Protocol):
    """x_θ with Eq. 6's interface: `network.Network.forward`, or anything that behaves like it."""

    training: bool

    def __call__(self, tokens, positions, mask, *, past_kv=None, num_outputs=None, labels=None, return_kv=False): ...


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar to differentiate: NELBO (or NLL) per scored token of this batch
    nll_sum: torch.Tensor  # detached sum over tokens, for exact averaging across batches
    num_tokens: int  # tokens scored (targets), the denominator of `loss`


@dataclass
class TrainingPass:
    """One batch laid out for the transformer: what goes in, what is scored, and how much each
    scored token weighs. Pipeline-parallel training ships these pieces to different stages."""

    tokens: torch.Tensor  # [b, s] transformer input
    labels: torch.Tensor  # [b, n] targets of the first n positions
    # [b, n] per-token loss weights (0 where a token contributes nothing), scaled by n / (tokens scored
    # per row) so that their mean over [b, n] (the pipeline's loss) is the loss per scored token
    weights: torch.Tensor


class Objective(Protocol):
    """What the trainer, the likelihood estimate, the schedule search and the pipeline stages need of
    an objective. `num_outputs` rows of the transformer input are scored, `scored_per_row` tokens per
    row count in the denominator; `positions` and `mask` are the static layout of the training pass."""

    seq_len: int
    block_size: int
    autoregressive: bool  # next-token (exact NLL, no noise) rather than a diffusion bound
    num_outputs: int
    scored_per_row: int
    positions: torch.Tensor
    mask: AttentionMask

    def training_pass(
        self, x: torch.Tensor, generator: torch.Generator | None, schedule: NoiseSchedule | None = None
    ) -> TrainingPass: ...

    def document_window(self, document_ids: torch.Tensor) -> torch.Tensor: ...

    def scored_nll(
        self,
        model: Denoiser,
        x: torch.Tensor,
        scored: torch.Tensor,
        generator: torch.Generator | None,
        schedule: NoiseSchedule | None = None,
    ) -> torch.Tensor: ...

    def logits(self, model: Denoiser, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor: ...

    def __call__(
        self,
        model: Denoiser,
        x: torch.Tensor,
        generator: torch.Generator | None,
        schedule: NoiseSchedule | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> LossTerms: ...


def loss_terms(token_nll: torch.Tensor, weights: torch.Tensor, num_scored: int | None = None) -> LossTerms:
    """Eq. 8 per token: Σ weight × (-log p) / number of tokens scored (default: all of them)."""
    terms = weights * token_nll
    scored = terms.numel() if num_scored is None else num_scored
    return LossTerms(terms.sum() / scored, terms.detach().sum(), scored)


def scored_label_nll(logits: torch.Tensor, x: torch.Tensor, scored: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[b]: Σ over the `scored` positions of -log softmax(logits)[x], logits [b, L, V] predicting x [b, L],
    normalised in float64 (fp32's log-sum-exp over a large vocabulary is off by ~1e-6 per token), `chunk`
    scored positions at a time."""
    where = scored.to(x.device)
    rows, labels = where.nonzero()[:, 0], x[where]
    picked = logits[where]
    nll = [
        torch.logsumexp(part.double(), -1) - part.gather(-1, label[:, None]).squeeze(-1).double()
        for part, label in zip(picked.split(chunk), labels.split(chunk), strict=True)
    ]
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    return total.index_add_(0, rows, torch.cat(nll)) if nll else total


def token_weights(noised: NoisedBatch) -> torch.Tensor:
    """Per-token weights of Eq. 8: -α'_t / (1 - α_t) on masked tokens, 0 elsewhere.

    Unmasked tokens contribute nothing: under the SUBS parameterization they are copied (Suppl. B, Eq. 13).
    """
    return torch.where(noised.masked, noised.weight, torch.zeros_like(noised.weight))


class BlockDiffusionObjective:
    """L_SAR of Eq. 7/8, estimated with one time t_b per block (Alg. 1).

    `clean_prefix` leading positions of each row stay clean and unscored (1: the row's BOS, as the
    paper's MDLM framing has it; 0 scores position 0 too, without any context)."""

    autoregressive = False

    def __init__(
        self,
        seq_len: int,
        block_size: int,
        schedule: NoiseSchedule,
        mask_id: int,
        antithetic: bool = True,
        clean_prefix: int = 1,
    ):
        self.seq_len, self.block_size = seq_len, block_size
        self.schedule, self.mask_id, self.antithetic = schedule, mask_id, antithetic
        self.clean_prefix = clean_prefix
        self.num_outputs = seq_len
        self.scored_per_row = seq_len - clean_prefix
        if block_size == seq_len:
            # One block (MDLM): nothing attends to the clean half, so it is left out; the mask is the
            # doubled mask's window over x_t alone, and the pass costs half as much.
            self.mask = AttentionMask.doubled(seq_len, block_size).first_rows(seq_len).first_cols(seq_len)
            self.positions = torch.arange(seq_len)
        else:
            self.mask = AttentionMask.doubled(seq_len, block_size)
            self.positions = doubled_positions(seq_len)

    def noise(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None,
        schedule: NoiseSchedule | None = None,
        free: torch.Tensor | None = None,
    ) -> NoisedBatch:
        schedule = schedule or self.schedule
        return mask_blocks(
            x, self.block_size, schedule, self.mask_id, generator, self.antithetic, self.clean_prefix, free
        )

    def _tokens(self, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return x_t if self.block_size == self.seq_len else torch.cat([x_t, x], dim=1)

    def training_pass(
        self, x: torch.Tensor, generator: torch.Generator | None, schedule: NoiseSchedule | None = None
    ) -> TrainingPass:
        noised = self.noise(x, generator, schedule)
        return TrainingPass(self._tokens(x, noised.x_t), x, token_weights(noised) * (self.seq_len / self.scored_per_row))

    def document_window(self, document_ids: torch.Tensor) -> torch.Tensor:
        """Document ids [b, L] → the labels of every key position of the training window."""
        return document_window_ids(document_ids, doubled=self.block_size < self.seq_len)

    def attention_mask(self, document_ids: torch.Tensor | None = None) -> AttentionMask | DocumentMask:
        """The training mask, intersected with "same document" when rows pack several documents."""
        if document_ids is None:
            return self.mask
        return DocumentMask(self.mask, self.document_window(document_ids))

    def token_nll(
        self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-log p_θ(x^b | x_t^b, x^{<b}) for every token, in ONE pass over x_t ⊕ x (Suppl. D)."""
        positions = self.positions.to(x.device)
        mask = self.attention_mask(document_ids)
        return model(self._tokens(x, noised.x_t), positions, mask, num_outputs=self.num_outputs, labels=x).token_nll

    def scored_nll(
        self,
        model: Denoiser,
        x: torch.Tensor,
        scored: torch.Tensor,
        generator: torch.Generator | None,
        schedule: NoiseSchedule | None = None,
    ) -> torch.Tensor:
        """[b]: one draw of Eq. 7's NELBO of the `scored` tokens [b, L] of each row given the others,
        which stay clean (never masked, never scored); [MASK] in x is an unknown position, masked
        throughout and never scored (the rest of a block past a row's end). The clean prefix of one
        position generalised to any context: a continuation's bound given its context (likelihood.py)."""
        noised = self.noise(x, generator, schedule, free=scored)
        terms = token_weights(noised) * self.token_nll(model, x, noised)
        return torch.where(noised.masked, terms, 0.0).double().sum(-1)  # unknown positions' labels are [MASK]: inf × 0

    def logits(self, model: Denoiser, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """x_θ's logits [b, L, V] at every position of the noisy rows x_t given the clean rows x, in the
        training pass (block b sees x_t^b and x^{<b}, Suppl. D)."""
        return model(self._tokens(x, x_t), self.positions.to(x.device), self.mask, num_outputs=self.num_outputs).logits

    def token_nll_naive(self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """The same quantity by Alg. 1 written as a loop: one pass over x for the clean K/V, then
        B calls x_θ^b(x_t^b, K^{1:b-1}, V^{1:b-1}). The reference the vectorized pass is tested against."""
        L, Lp = self.seq_len, self.block_size
        positions = torch.arange(L, device=x.device)
        clean_kv = model(x, positions, AttentionMask.block_causal(L, Lp), return_kv=True).kv
        pieces = []
        for start in range(0, L, Lp):
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in clean_kv]
            out = model(
                noised.x_t[:, start : start + Lp],
                positions[start : start + Lp],
                None,
                past_kv=past,
                labels=x[:, start : start + Lp],
            )
            pieces.append(out.token_nll)
        return torch.cat(pieces, dim=1)

    def __call__(
        self,
        model: Denoiser,
        x: torch.Tensor,
        generator: torch.Generator | None,
        schedule: NoiseSchedule | None = None,
        naive: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> LossTerms:
        noised = self.noise(x, generator, schedule)
        return self.loss(model, x, noised, naive, document_ids)

    def loss(
        self,
        model: Denoiser,
        x: torch.Tensor,
        noised: NoisedBatch,
        naive: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> LossTerms:
        if naive:
            if document_ids is not None:
                raise ValueError("the naive reference loop does not take document ids")
            nll = self.token_nll_naive(model, x, noised)
        else:
            nll = self.token_nll(model, x, noised, document_ids)
        return loss_terms(nll, token_weights(noised), x.shape[0] * self.scored_per_row)


class AutoregressiveObjective:
    """Next-token NLL (Eq. 1) with a causal mask on the same transformer: the AR baseline.

    `random_tokens` (Table 1, Fig. 1, "AR + random batch size"): Sec. 4.2's SAR objective at L' = 1
    scores only masked tokens, each masked with probability t ~ U[0, 1], so its gradient comes from a
    random, about halved number of tokens. This control gives the AR model the same draw: in training
    each target is kept when u < t, t drawn like the diffusion times (stratified over the batch), and
    weighted 1 / E[kept] = 2, so the loss stays an unbiased estimate of the AR NLL while its variance
    grows like the diffusion objective's. Without a generator, or in eval mode, every token is scored."""

    block_size, autoregressive = 1, True

    def __init__(self, seq_len: int, random_tokens: bool = False):
        self.seq_len, self.random_tokens = seq_len, random_tokens
        self.num_outputs = self.scored_per_row = seq_len - 1
        self.mask = AttentionMask.causal(seq_len - 1)
        self.positions = torch.arange(seq_len - 1)

    def training_pass(
        self, x: torch.Tensor, generator: torch.Generator | None = None, schedule: NoiseSchedule | None = None
    ) -> TrainingPass:
        weights = torch.ones(x[:, 1:].shape, device=x.device)
        if self.random_tokens and generator is not None:
            t = _KEEP_RATE.sample_t(tuple(weights.shape), generator)
            weights = 2.0 * (torch.rand(t.shape, generator=generator) < t).to(weights)
        return TrainingPass(x[:, :-1], x[:, 1:], weights)

    def document_window(self, document_ids: torch.Tensor) -> torch.Tensor:
        return document_ids[:, :-1]

    def __call__(
        self,
        model: Denoiser,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        schedule: NoiseSchedule | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> LossTerms:
        batch = self.training_pass(x, generator if model.training else None)
        mask = self.mask if document_ids is None else DocumentMask(self.mask, self.document_window(document_ids))
        nll = model(batch.tokens, self.positions.to(x.device), mask, labels=batch.labels).token_nll
        return loss_terms(nll, batch.weights)

    def scored_nll(
        self,
        model: Denoiser,
        x: torch.Tensor,
        scored: torch.Tensor,
        generator: torch.Generator | None = None,
        schedule: NoiseSchedule | None = None,
    ) -> torch.Tensor:
        """[b]: -Σ log p(x_i | x_<i) over the `scored` positions [b, L] of each row (never position 0)."""
        return scored_label_nll(self.logits(model, x), x, scored)

    def logits(self, model: Denoiser, x: torch.Tensor, x_t: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [b, L, V]: row i predicts x_i from x_<i (row 0, which nothing predicts, is -inf)."""
        out = model(x[:, :-1], self.positions.to(x.device), self.mask).logits
        return torch.cat([torch.full_like(out[:, :1], float("-inf")), out], dim=1)


_KEEP_RATE = NoiseSchedule("linear")  # random_tokens: keep probability t ~ U(0, 1], E[kept] = 1/2
