"""The SEDD baseline (Lou et al., 2024): absorbing-state score entropy on the same transformer, as
the paper runs it (Table 3, 4, 5): no time conditioning, one block (L' = L), x_t only.

Score. SEDD's network outputs the log of the concrete score s_y ≈ p_t(y) / p_t(m) for each jump
m → y out of a masked position. With `scale_by_sigma` (SEDD's model/transformer.py) the log-score
is the network output h_y minus log(e^σ − 1) + log N, N = the number of non-mask states. Under
q(x_t | x) = Cat(α_t x + (1 − α_t) m) the noise level is σ(t) = −log α_t (SEDD's LogLinear is the
linear schedule α_t = 1 − t with ε → 0), so e^{-log(e^σ − 1)} = α_t / (1 − α_t) and

    s_y(x_t, t) = α_t / (1 − α_t) · exp(h_y) / N.

This score is NOT normalised: Σ_y s_y = α_t / (1 − α_t) · Z with Z = mean_y exp(h_y), where the
true score sums to exactly α_t / (1 − α_t). That is what separates SEDD from MDLM.

Loss. The diffusion-weighted denoising score entropy (DWDSE, Lou et al. Eq. 15; `Absorbing.
score_entropy` in SEDD's graph_lib.py) of a masked position with clean token x0 is

    σ'(t) · [Σ_{y≠m} s_y − r log s_{x0} + r (log r − 1)],   r = 1 / (e^σ − 1) = α_t / (1 − α_t),

and 0 at unmasked positions. With σ' = −α'_t / α_t, σ' · r = −α'_t / (1 − α_t), the weight of
Eq. 7, and the bracket simplifies to r · [Z − 1 − log Z − log p_θ(x0 | x_t)] with p_θ = softmax(h).
So the bound is Eq. 7's NELBO plus the weighted penalty Z − 1 − log Z ≥ 0 for an unnormalised
score: SEDD ≥ MDLM on the same logits, with equality where Z = 1. It is computed here in that
form, expm1(log Z) − (h_{x0} − log N), which avoids the cancellation of the r log r terms.

Sampler. SEDD's Euler predictor (sampling.py) with its final noise-removal step: going from t to
s = t − 1/T, a masked position jumps to y with probability Δt · σ'(t) · s_y, which under the
linear schedule is exp(h_y) / N / j at t = j/T, and stays masked otherwise. The move
probability Z / j can exceed 1 for an unnormalised score; the move is then certain (SEDD's
categorical draw ignores the negative stay weight). After the step to t = 0 the remaining masked
positions are drawn from p_θ (the noise removal). With a time-agnostic network the logits change
only when the block does, so steps where nothing moves cost no NFE (MDLM's caching, Table 6).
"""

from __future__ import annotations

import math

import torch

from .distributions import draw_categorical, shape_probs
from .errors import Sad3Error
from .noising import NoisedBatch
from .objectives import BlockDiffusionObjective, Denoiser
from .samplers import BlockSample, Denoise


def log_mean_exp(logits: torch.Tensor) -> torch.Tensor:
    """log Z = log mean_y exp(h_y) over the N = V − 1 non-mask states (the mask's logit is −inf)."""
    return torch.logsumexp(logits, dim=-1) - math.log(logits.shape[-1] - 1)


def score_entropy(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-token DWDSE bracket divided by r: Z − 1 − log Z − log p_θ(x0) = expm1(log Z) − (h_x0 − log N).

    `logits` [b, n, V] are the network outputs h (mask at −inf), `x` [b, n] the clean tokens. Multiply
    by the Eq. 7 weight on masked positions to get the score entropy of Lou et al."""
    log_n = math.log(logits.shape[-1] - 1)
    log_z = torch.logsumexp(logits, dim=-1) - log_n
    return torch.expm1(log_z) - (logits.gather(-1, x.unsqueeze(-1)).squeeze(-1) - log_n)


class ScoreEntropyObjective(BlockDiffusionObjective):
    """SEDD's score-entropy NELBO: Eq. 7's noise process and weights, the DWDSE per masked token.

    The pass is MDLM's (L' = L: x_t alone under full attention); only the per-token term differs,
    so evaluation, checkpoints and data-parallel training use the same code. It reads the full
    vocabulary logits, which pipeline stages do not ship (config validation refuses that layout)."""

    def __init__(self, seq_len: int, schedule, mask_id: int, antithetic: bool = True, clean_prefix: int = 1):
        super().__init__(seq_len, seq_len, schedule, mask_id, antithetic, clean_prefix)

    def row_nll(
        self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The score-entropy term of every token (its Eq. 7 weight applied by `loss`); one block, no
        shift: output row i is token i."""
        positions = self.positions.to(x.device)
        logits = model(noised.x_t, positions, self.attention_mask(document_ids), num_outputs=self.num_outputs).logits
        return score_entropy(logits.float(), x)

    def row_nll_naive(self, model: Denoiser, x: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        raise Sad3Error("the naive per-block loop is for L' < L; SEDD runs one block (L' = L)")


def euler_move_steps(log_z: torch.Tensor, todo: torch.Tensor, j: torch.Tensor, generator: torch.Generator):
    """Simulate SEDD's Euler steps j, j−1, …, 1 on unchanged logits until some position moves.

    Each todo position moves at step i with probability min(1, Z / i), independently. Returns the
    step at which each row's first move happens (0: none before t = 0) and which positions move then."""
    n, width = todo.shape
    moved = torch.zeros_like(todo)
    at = torch.zeros(n, dtype=torch.long)
    z = log_z.exp().double().cpu()
    todo_cpu, j = todo.cpu(), j.clone()
    waiting = todo_cpu.any(dim=1)
    while bool((waiting & (j > 0)).any()):
        rows = (waiting & (j > 0)).nonzero().flatten()
        u = torch.rand((rows.numel(), width), generator=generator, dtype=torch.float64)
        move = todo_cpu[rows] & (u < (z[rows] / j[rows, None]).clamp(max=1.0))
        hit = move.any(dim=1)
        moved[rows[hit]] = move[hit].to(moved.device)
        at[rows[hit]] = j[rows[hit]]
        waiting[rows[hit]] = False
        j[rows[~hit]] -= 1
    return at, moved


def denoise_block_euler(
    x: torch.Tensor,
    todo: torch.Tensor,
    denoise: Denoise,
    steps: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> BlockSample:
    """Commit every `todo` position of the block `x` [n, L'] with SEDD's Euler sampler (T = `steps`)
    and its noise removal at t = 0. One NFE per change of the block; values come from p_θ shaped by
    temperature / top-p, move probabilities from the raw score."""
    x, todo = x.clone(), todo.clone()
    nfe = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    j = torch.full((x.shape[0],), steps, dtype=torch.long)  # the next Euler step of each row: t = j / T
    while True:
        rows = todo.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            return BlockSample(x, nfe)
        logits = denoise(None if rows.numel() == x.shape[0] else rows, x[rows]).float()
        todo_rows = todo[rows]
        at, commit = euler_move_steps(log_mean_exp(logits), todo_rows, j[rows.cpu()], generator)
        done = at == 0  # reached t = 0 without a move: the noise removal commits the rest
        commit[done.to(commit.device)] = todo_rows[done.to(todo_rows.device)]
        j[rows.cpu()] = (at - 1).clamp(min=0)
        values = x[rows]
        values[commit] = draw_categorical(shape_probs(logits, temperature, top_p)[commit], generator)
        x[rows] = values
        todo[rows] = todo_rows & ~commit
        nfe[rows] += 1


class EulerSampler:
    """SEDD's Euler predictor with noise removal, as a within-block sampler of Alg. 2."""

    name = "euler"

    def __init__(self, steps: int):
        self.steps = steps

    def denoise_block(self, x, todo, denoise, generator, temperature=1.0, top_p=1.0) -> BlockSample:
        return denoise_block_euler(x, todo, denoise, self.steps, generator, temperature, top_p)
