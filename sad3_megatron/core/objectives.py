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

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .diffusion_config import DiffusionConfig
from .errors import Sad3Error
from .masks import AttentionMask, DocumentMask, document_window_ids, doubled_positions
from .noising import NoisedBatch, complementary_pair, mask_blocks
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
    row count in the denominator (fewer where a `scored` mask [b, L] leaves tokens out, e.g. a chat
    prompt); `positions` and `mask` are the static layout of the training pass."""

    seq_len: int
    block_size: int
    autoregressive: bool  # next-token (exact NLL, no noise) rather than a diffusion bound
    num_outputs: int
    scored_per_row: int
    positions: torch.Tensor
    mask: AttentionMask

    copies: int  # rows of the pass per sequence (2 with complementary masks)

    def training_pass(
        self, x: torch.Tensor, generator: torch.Generator | None, schedule: NoiseSchedule | None = None,
        scored: torch.Tensor | None = None,
    ) -> TrainingPass: ...

    def document_window(self, document_ids: torch.Tensor) -> torch.Tensor: ...

    def bound(self) -> Objective:
        """The objective whose loss is the bound `sad3 eval` reports (itself unless training reweights it)."""
        ...

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
        scored: torch.Tensor | None = None,
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


@dataclass(frozen=True)
class Switches:
    """The adaptation switches of the one block-diffusion objective (DiffusionConfig's fields of the
    same names; docs/adaptation.md). All off is the paper's objective; each published recipe for
    turning an AR checkpoint into a block-diffusion model is a setting of these."""

    shift: bool = False  # the output at position i-1 predicts token i (Fast-dLLM v2)
    complementary: bool = False  # a second estimate per row under the complement of its masks
    clean_attention: str = "block_causal"  # "causal": the clean half token-causal (Nemotron)
    loss_weighting: str = "elbo"  # "uniform": training drops Eq. 7's 1/t weight
    ar_loss_weight: float = 0.0  # next-token cross-entropy on the clean rows, added to the loss
    diffusion_loss_weight: float = 1.0  # the diffusion term's weight beside it

    @classmethod
    def of(cls, d: DiffusionConfig) -> Switches:
        return cls(d.shift, d.complementary_masks, d.clean_attention, d.loss_weighting, d.ar_loss_weight,
                   d.diffusion_loss_weight)  # fmt: skip

    def for_bound(self) -> Switches:
        """What estimates the NELBO itself: the same model function (shift, clean attention) and an
        unbiased estimator (complementary pairs are), with Eq. 7's weights and no AR term."""
        return replace(self, loss_weighting="elbo", ar_loss_weight=0.0, diffusion_loss_weight=1.0)


PAPER = Switches()  # every switch off: the paper's objective


def output_layout(seq_len: int, block_size: int, shift: bool, doubled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_rows [L], row_labels [n]): which output row predicts token i, and which token each of
    the n output rows of x_t ⊕ x is labelled with (n = 2L when clean rows are read, else L).

    Without shift, noisy row i predicts token i. With shift, token i at offset j of its block comes
    from the row of position i - 1 that sees what the naive loop's x_θ^b(x_t^b, x^{<b}) sees: the noisy
    row i - 1 for j > 0 (it sees the noisy block and the clean earlier blocks, M_BD + M_OBC), and for
    j = 0 the clean row i - 1, the last token of block b - 1 (M_BC: the clean blocks < b, no noise),
    which is an AR model's next-token row. Position 0 (BOS) has no predecessor: it is never scored.
    Clean row r is labelled x_{r+1}, so the same rows serve the AR loss (last row: a dummy label)."""
    L, n = seq_len, 2 * seq_len if doubled else seq_len
    i = torch.arange(L)
    if not shift:
        target_rows = i
    else:
        first = (i % block_size == 0) & (i > 0)
        target_rows = torch.where(first, L + i - 1, (i - 1).clamp(min=0))
    r = torch.arange(n)
    noisy_label = (r + 1).clamp(max=L - 1) if shift else r
    clean_label = (r - L + 1).clamp(max=L - 1)
    return target_rows, torch.where(r < L, noisy_label, clean_label)


class BlockDiffusionObjective:
    """L_SAR of Eq. 7/8, estimated with one time t_b per block (Alg. 1), with the adaptation
    `switches` (Switches; all off by default).

    `clean_prefix` leading positions of each row stay clean and unscored (1: the row's BOS, as the
    paper's MDLM framing has it; 0 scores position 0 too, without any context). A per-token `scored`
    mask (chat rows: the answer) further restricts what is noised and scored."""

    autoregressive = False

    def __init__(
        self,
        seq_len: int,
        block_size: int,
        schedule: NoiseSchedule,
        mask_id: int,
        antithetic: bool = True,
        clean_prefix: int = 1,
        switches: Switches = PAPER,
    ):
        self.seq_len, self.block_size = seq_len, block_size
        self.schedule, self.mask_id, self.antithetic = schedule, mask_id, antithetic
        self.clean_prefix, self.switches = clean_prefix, switches
        if (switches.shift or switches.ar_loss_weight) and clean_prefix < 1:
            raise Sad3Error("token shift and the AR loss predict position i from i - 1: keep position 0 clean (clean_prefix=1)")
        self.copies = 2 if switches.complementary else 1  # rows per sequence in the pass
        # One block without an AR term (MDLM): nothing reads the clean half, so it is left out; the mask
        # is the doubled mask's window over x_t alone, and the pass costs half as much.
        self.doubled = block_size < seq_len or switches.ar_loss_weight > 0
        reads_clean = self.doubled and (switches.shift or switches.ar_loss_weight > 0)
        self.num_outputs = 2 * seq_len if reads_clean else seq_len
        self.scored_per_row = seq_len - clean_prefix
        clean_block = 1 if switches.clean_attention == "causal" else None
        if self.doubled:
            self.mask = AttentionMask.doubled(seq_len, block_size, clean_block)
            self.positions = doubled_positions(seq_len)
        else:
            self.mask = AttentionMask.doubled(seq_len, block_size).first_rows(seq_len).first_cols(seq_len)
            self.positions = torch.arange(seq_len)
        self.target_rows, self.row_labels = output_layout(seq_len, block_size, switches.shift, reads_clean)

    def bound(self) -> BlockDiffusionObjective:
        """The objective whose loss is the NELBO (what `sad3 eval` reports whatever training optimised)."""
        if self.switches == self.switches.for_bound():
            return self
        return type(self)(self.seq_len, self.block_size, self.schedule, self.mask_id, self.antithetic,
                          self.clean_prefix, self.switches.for_bound())  # fmt: skip

    def rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sequence tensors laid out like the pass's rows (repeated for the complementary copy)."""
        return t if t is None or self.copies == 1 else torch.cat([t, t])

    def noise(
        self, x: torch.Tensor, generator: torch.Generator | None, schedule: NoiseSchedule | None = None,
        scored: torch.Tensor | None = None,
    ) -> NoisedBatch:  # fmt: skip
        """x_t for every row of the pass: b rows, or 2b with the complementary copy."""
        schedule = schedule or self.schedule
        noised = mask_blocks(x, self.block_size, schedule, self.mask_id, generator, self.antithetic, self.clean_prefix,
                             scored)  # fmt: skip
        if self.switches.complementary:
            noised = complementary_pair(noised, x, self.block_size, schedule, self.mask_id)
        return noised

    def _tokens(self, x: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        return torch.cat([noised.x_t, self.rows(x)], dim=1) if self.doubled else noised.x_t

    def diffusion_weights(self, noised: NoisedBatch) -> torch.Tensor:
        """[b', L] per-token weights of the diffusion term: Eq. 8's, or 1 per masked token (uniform)."""
        if self.switches.loss_weighting == "uniform":
            return noised.masked.to(noised.weight.dtype)
        return token_weights(noised)

    def row_weights(self, noised: NoisedBatch) -> torch.Tensor:
        """[b', n] weight of each output row's cross-entropy: the diffusion weight of the token it
        predicts, plus the AR weight on clean rows whose next token is scored (first copy only, counted
        for both, so the AR term is the per-token next-token loss)."""
        s = self.switches
        weights = noised.weight.new_zeros(noised.weight.shape[0], self.num_outputs)
        diffusion = s.diffusion_loss_weight * self.diffusion_weights(noised)
        weights.index_add_(1, self.target_rows.to(weights.device), diffusion)
        if s.ar_loss_weight:
            b, L = weights.shape[0] // self.copies, self.seq_len
            free = noised.free if noised.free is not None else self.all_free(weights.shape[0], weights.device)
            targets = free[:b, 1:].to(weights.dtype)  # the next token of clean rows 0..L-2
            weights[:b, L : 2 * L - 1] += s.ar_loss_weight * self.copies * targets
        return weights

    def scored_tokens(self, noised: NoisedBatch) -> int:
        """Tokens scored in this batch (one copy): the denominator of the loss (counted on the CPU
        when the noise was drawn, so reading it never waits on the device)."""
        if noised.num_free is not None:
            return noised.num_free // self.copies
        return noised.x_t.shape[0] // self.copies * self.scored_per_row

    def training_pass(
        self, x: torch.Tensor, generator: torch.Generator | None, schedule: NoiseSchedule | None = None,
        scored: torch.Tensor | None = None,
    ) -> TrainingPass:  # fmt: skip
        noised = self.noise(x, generator, schedule, scored)
        weights = self.row_weights(noised)
        scale = weights.numel() / (self.copies * max(self.scored_tokens(noised), 1))
        return TrainingPass(self._tokens(x, noised), self.rows(x)[:, self.row_labels.to(x.device)], weights * scale)

    def document_window(self, document_ids: torch.Tensor) -> torch.Tensor:
        """Document ids [b, L] → the labels of every key position of the training window (every row)."""
        return document_window_ids(self.rows(document_ids), doubled=self.doubled)

    def attention_mask(self, document_ids: torch.Tensor | None = None) -> AttentionMask | DocumentMask:
        """The training mask, intersected with "same document" when rows pack several documents."""
        if document_ids is None:
            return self.mask
        return DocumentMask(self.mask, self.document_window(document_ids))

    def row_nll(
        self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[b', n] cross-entropy of every output row's label, in ONE pass over x_t ⊕ x (Suppl. D)."""
        positions = self.positions.to(x.device)
        labels = self.rows(x)[:, self.row_labels.to(x.device)]
        mask = self.attention_mask(document_ids)
        return model(self._tokens(x, noised), positions, mask, num_outputs=self.num_outputs, labels=labels).token_nll

    def token_nll(
        self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[b', L] -log p_θ(x_i | x_t^b, x^{<b}) of every token, read from the row that predicts it."""
        return self.row_nll(model, x, noised, document_ids)[:, self.target_rows.to(x.device)]

    def scored_nll(
        self, model: Denoiser, x: torch.Tensor, scored: torch.Tensor, generator: torch.Generator | None,
        schedule: NoiseSchedule | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """[b]: one draw of Eq. 7's NELBO of the `scored` tokens [b, L] of each row given the others,
        which stay clean (never masked, never scored), averaged over the complementary copy; [MASK] in x
        is an unknown position, masked throughout and never scored (the rest of a block past a row's
        end). The clean prefix of one position generalised to any context: a continuation's bound given
        its context (likelihood.py). Call it on `bound()` for the NELBO's own weights."""
        noised = self.noise(x, generator, schedule, scored)
        terms = self.diffusion_weights(noised) * self.token_nll(model, x, noised)
        terms = torch.where(noised.masked, terms, 0.0).double().sum(-1)  # unknown positions' labels are [MASK]: inf × 0
        return terms.view(self.copies, x.shape[0]).mean(0)

    def logits(self, model: Denoiser, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """x_θ's logits [b, L, V] of every position of the noisy rows x_t given the clean rows x, read
        from the row that predicts it (block b sees x_t^b and x^{<b}, Suppl. D; with the token shift, the
        row before)."""
        tokens = torch.cat([x_t, x], dim=1) if self.doubled else x_t
        out = model(tokens, self.positions.to(x.device), self.mask, num_outputs=self.num_outputs).logits
        return out[:, self.target_rows.to(x.device)]

    def row_nll_naive(self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """The same rows by Alg. 1 written as a loop: one pass over x for the clean K/V (and the clean
        rows' outputs), then B calls x_θ^b(x_t^b, K^{1:b-1}, V^{1:b-1}). The reference the vectorized
        pass is tested against."""
        L, Lp = self.seq_len, self.block_size
        xs, labels = self.rows(x), self.rows(x)[:, self.row_labels.to(x.device)]
        positions = torch.arange(L, device=x.device)
        clean_mask = AttentionMask.block_causal(L, 1 if self.switches.clean_attention == "causal" else Lp)
        clean = model(xs, positions, clean_mask, return_kv=True, labels=labels[:, L:] if self.num_outputs > L else None)
        pieces = []
        for start in range(0, L, Lp):
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in clean.kv]
            out = model(noised.x_t[:, start : start + Lp], positions[start : start + Lp], None, past_kv=past,
                        labels=labels[:, start : start + Lp])  # fmt: skip
            pieces.append(out.token_nll)
        if self.num_outputs > L:
            pieces.append(clean.token_nll)
        return torch.cat(pieces, dim=1)

    def token_nll_naive(self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        return self.row_nll_naive(model, x, noised)[:, self.target_rows.to(x.device)]

    def diffusion_terms(
        self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[b, L] each token's diffusion term (weight × -log p), averaged over the complementary copy:
        what the variance estimators and the schedule search score."""
        terms = self.diffusion_weights(noised) * self.token_nll(model, x, noised, document_ids)
        return terms.view(self.copies, x.shape[0], -1).mean(0)

    def __call__(
        self,
        model: Denoiser,
        x: torch.Tensor,
        generator: torch.Generator | None,
        schedule: NoiseSchedule | None = None,
        naive: bool = False,
        document_ids: torch.Tensor | None = None,
        scored: torch.Tensor | None = None,
    ) -> LossTerms:
        noised = self.noise(x, generator, schedule, scored)
        return self.loss(model, x, noised, naive, document_ids)

    def loss(
        self,
        model: Denoiser,
        x: torch.Tensor,
        noised: NoisedBatch,
        naive: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> LossTerms:
        """Σ row weight × row cross-entropy over the pass, averaged over the copies, per scored token."""
        if naive:
            if document_ids is not None:
                raise ValueError("the naive reference loop does not take document ids")
            nll = self.row_nll_naive(model, x, noised)
        else:
            nll = self.row_nll(model, x, noised, document_ids)
        terms = (self.row_weights(noised) * nll).sum() / self.copies
        scored = self.scored_tokens(noised)
        return LossTerms(terms / max(scored, 1), terms.detach(), scored)


class AutoregressiveObjective:
    """Next-token NLL (Eq. 1) with a causal mask on the same transformer: the AR baseline.

    `random_tokens` (Table 1, Fig. 1, "AR + random batch size"): Sec. 4.2's SAR objective at L' = 1
    scores only masked tokens, each masked with probability t ~ U[0, 1], so its gradient comes from a
    random, about halved number of tokens. This control gives the AR model the same draw: in training
    each target is kept when u < t, t drawn like the diffusion times (stratified over the batch), and
    weighted 1 / E[kept] = 2, so the loss stays an unbiased estimate of the AR NLL while its variance
    grows like the diffusion objective's. Without a generator, or in eval mode, every token is scored."""

    block_size, autoregressive, copies = 1, True, 1

    def __init__(self, seq_len: int, random_tokens: bool = False):
        self.seq_len, self.random_tokens = seq_len, random_tokens
        self.num_outputs = self.scored_per_row = seq_len - 1
        self.mask = AttentionMask.causal(seq_len - 1)
        self.positions = torch.arange(seq_len - 1)

    def bound(self) -> AutoregressiveObjective:
        return self

    def training_pass(
        self, x: torch.Tensor, generator: torch.Generator | None = None, schedule: NoiseSchedule | None = None,
        scored: torch.Tensor | None = None,
    ) -> TrainingPass:  # fmt: skip
        """Targets x[1:] from inputs x[:-1]; `scored` [b, L] keeps only the targets it marks, and the
        weights then carry (targets) / (kept targets), so their mean is the loss per scored token."""
        weights = torch.ones(x[:, 1:].shape, device=x.device)
        if self.random_tokens and generator is not None:
            t = _KEEP_RATE.sample_t(tuple(weights.shape), generator)
            weights = 2.0 * (torch.rand(t.shape, generator=generator) < t).to(weights)
        if scored is not None:
            kept = scored[:, 1:].to(weights)
            weights = weights * kept * (kept.numel() / kept.sum().clamp(min=1))
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
        scored: torch.Tensor | None = None,
    ) -> LossTerms:
        batch = self.training_pass(x, generator if model.training else None)
        mask = self.mask if document_ids is None else DocumentMask(self.mask, self.document_window(document_ids))
        nll = model(batch.tokens, self.positions.to(x.device), mask, labels=batch.labels).token_nll
        if scored is None:
            return loss_terms(nll, batch.weights)
        kept = scored[:, 1:].to(batch.weights)
        return loss_terms(nll, batch.weights * kept, int(kept.sum().item()))

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
