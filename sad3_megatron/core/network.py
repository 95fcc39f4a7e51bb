"""The denoiser x_θ as plain torch modules: one network for the trainer and the exported model.

A pre-norm transformer without time conditioning (Suppl. F), in megatron's [seq, batch, hidden] layout
between layers, in the two kinds of block `ModelConfig` describes: the paper's DiT-style block
(LayerNorm, GELU MLP, multi-head attention, an untied output layer: the default) and the modern
decoder of Llama / Qwen2 / Qwen3 / Mistral (RMSNorm, SwiGLU, grouped-query attention, QK-norm, tied
embeddings, scaled rotary frequencies). Every piece that is not about parallel layouts lives here:

- the attention core: split the fused q/k/v projection by key/value group → QK-norm → rotary →
  concatenate the cached clean prefix → `attend` → merge heads. The fused projection's rows are
  megatron-core's `linear_qkv` layout: per key/value group, the group's query heads, then its key
  head, then its value head (head_dim rows each), so a tensor-parallel shard holds whole groups; with
  one group per head it is the (heads, 3, head_dim) layout of the DiT block;
- the MLP: GELU, or SwiGLU on fc1 = [gate; up] (a tensor-parallel rank holds [gate_r; up_r] and splits
  its own output in two, as megatron-core's gated MLP does);
- the residual layer and the layer loop, whose last layer keeps only `num_outputs` rows;
- the output head's SUBS rule (Sahoo et al., 2024): [MASK] and padding ids are never predicted.

The modules take their linear layers as arguments. `build_network` passes nn.Linear / nn.Embedding
(the exported model, and tests without megatron); `sad3_megatron/model/transformer.py` subclasses
these classes with megatron-core's tensor-parallel layers and overrides only what is parallel-specific
(`project`, `keep_rows`, `token_nll`, `full_logits`). Module names are the same in both, so weights
map 1:1. Both are sized by one `ModelConfig`.

`Network.forward` is Eq. 6's interface  logits, K, V ← x_θ(tokens, K^{<b}, V^{<b}):
- vectorized training: tokens = x_t ⊕ x, mask = Mask(L, L'), logits for the noisy half only;
- the naive Alg. 1 loop and KV-cache sampling: tokens = one block, `past_kv` = the clean prefix;
- the AR baseline: tokens = x, the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, resolve_backend
from .kv_cache import KV
from .masks import AttentionMask
from .model_config import ModelConfig
from .rotary import RopeScaling, RotaryEmbedding, apply_rotary


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [b, n, vocab] (full vocabulary), when no labels were given
    token_nll: torch.Tensor | None  # [b, n] cross-entropy of the labels, when labels were given
    kv: list[KV] | None  # this call's keys/values per layer, when asked for


class RMSNorm(nn.Module):
    """x / rms(x) · weight as transformers computes it for Llama, Qwen and Mistral: the mean square in
    fp32, the normalized input cast back to the input's dtype before the weight multiplies it."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(kind: str, size: int, eps: float) -> nn.Module:
    return RMSNorm(size, eps) if kind == "rmsnorm" else nn.LayerNorm(size, eps=eps)


def rotary_embedding(m: ModelConfig) -> RotaryEmbedding:
    """The rotary frequencies of a resolved config (θ, head_dim and the rope scaling)."""
    scaling = RopeScaling(m.rope_scaling, m.rope_factor, m.rope_low_freq_factor, m.rope_high_freq_factor,
                          m.rope_original_max_positions)  # fmt: skip
    return RotaryEmbedding(m.head_dim, m.rotary_base, scaling)


def qk_norms(m: ModelConfig) -> tuple[nn.Module | None, nn.Module | None]:
    """QK-norm's two norms over head_dim (one weight shared by all heads), or none."""
    if not m.qk_norm:
        return None, None
    return make_norm(m.norm, m.head_dim, m.norm_eps), make_norm(m.norm, m.head_dim, m.norm_eps)


def attention_core(
    qkv: torch.Tensor, rope, mask: AttentionMask | None, past: KV | None, keep: int, head_dim: int, backend: str,
    groups: int = 1, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, gather_kv=None,
) -> tuple[torch.Tensor, KV]:  # fmt: skip
    """Attention over projected qkv [s, b, kv_heads·(groups + 2)·head_dim]: per key/value group, its
    `groups` query heads, its key head and its value head (megatron-core's linear_qkv layout).

    Queries are kept for the first `keep` rows only; keys/values of all s rows are returned
    (rotated, [b, kv_heads, s, head_dim]) and attend after the cached prefix `past`. QK-norm (Qwen3)
    normalizes every query and key head before rotary. `gather_kv(k, v, mask)`, when given, turns
    the rotated keys/values [s, b, kv_heads, d] of these rows into those the mask's keys name (context
    parallelism gathers every rank's). Returns the merged heads
    [keep, b, heads·head_dim] and this call's K/V."""
    s, b = qkv.shape[:2]
    q, k, v = qkv.view(s, b, -1, (groups + 2) * head_dim).split([groups * head_dim, head_dim, head_dim], dim=-1)
    q = q.reshape(s, b, -1, head_dim)  # query head j belongs to key/value group j // groups
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    if gather_kv is not None:
        k, v = gather_kv(k, v, mask)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q[:keep], k, v))  # -> [b, heads, s, d]
    new_kv = (k, v)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    if backend == "auto":
        backend = resolve_backend(backend, q.device)
    out = attend(q, k, v, mask, backend)
    return out.permute(2, 0, 1, 3).reshape(keep, b, q.shape[1] * head_dim), new_kv


def subs_blocked_ids(first_id: int, count: int, vocab_size: int, mask_id: int | None) -> torch.Tensor:
    """Columns [0, count) of an output layer holding ids first_id.. that are never predicted: the
    padding rows past the vocabulary (the trainer pads it to a multiple of 128) and the mask token
    (SUBS; None where it is predicted: see `ModelConfig.blocked_mask_id`)."""
    ids = torch.arange(count, device="cpu") + first_id  # on the CPU even under a meta-device build
    blocked = ids >= vocab_size
    if mask_id is not None:
        blocked |= ids == mask_id
    return torch.nonzero(blocked).flatten()


def copy_unmasked(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS' second rule: a position whose input is not [MASK] predicts its own token with
    probability 1 (logit 0, every other -inf). `logits` [b, n, V] are the outputs of tokens [b, n]."""
    clean = tokens != mask_id
    one_hot = torch.full_like(logits, float("-inf")).scatter_(-1, tokens[..., None], 0.0)
    return torch.where(clean[..., None], one_hot, logits)


def _call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def _call_output(layer: nn.Module | None, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return layer(x) if weight is None else F.linear(x, weight)


class Attention(nn.Module):
    def __init__(
        self, qkv: nn.Module, proj: nn.Module, head_dim: int, backend: str, groups: int = 1,
        q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
    ):  # fmt: skip
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.head_dim, self.backend, self.groups = head_dim, backend, groups
        self.q_norm, self.k_norm = q_norm, k_norm

    project = staticmethod(_call)  # how a linear layer is applied (megatron's return (output, bias))

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values the mask's columns name, from those of this call's rows: the same ones here
        (the megatron model gathers them across context-parallel ranks for a RowsMask)."""
        return k, v

    def forward(self, h, rope, mask: AttentionMask | None, past: KV | None, keep: int) -> tuple[torch.Tensor, KV]:
        out, kv = attention_core(self.project(self.qkv, h), rope, mask, past, keep, self.head_dim, self.backend,
                                 self.groups, self.q_norm, self.k_norm, self.gather_kv)  # fmt: skip
        return self.project(self.proj, out), kv


class MLP(nn.Module):
    """fc2(GELU(fc1 h)), or SwiGLU: fc1's output holds [gate; up] (this rank's halves under TP) and
    fc2 reads silu(gate) · up (Shazeer, 2020)."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module, activation: str = "gelu"):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.activation = activation

    project = staticmethod(_call)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.project(self.fc1, h)
        if self.activation == "swiglu":
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        else:
            x = F.gelu(x, approximate="tanh")
        return self.project(self.fc2, x)


class Layer(nn.Module):
    """Pre-norm residual block: h + attn(norm1(h)), then + mlp(norm2(·)), with dropout."""

    def __init__(self, hidden_size: int, attn: Attention, mlp: MLP, dropout: float, norm: str = "layernorm",
                 eps: float = 1e-5):  # fmt: skip
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size, eps)
        self.attn = attn
        self.norm2 = make_norm(norm, hidden_size, eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(dropout)

    def keep_rows(self, h: torch.Tensor, keep: int) -> torch.Tensor:
        return h[:keep]

    def forward(self, h, rope, mask, past, keep: int) -> tuple[torch.Tensor, KV]:
        """`keep` < seq drops the rows nobody reads after this layer (the clean half in the last layer)."""
        attn_out, kv = self.attn(self.norm1(h), rope, mask, past, keep)
        h = self.keep_rows(h, keep) + self.dropout(attn_out)
        return h + self.dropout(self.mlp(self.norm2(h))), kv


class Embedding(nn.Module):
    """Token ids [b, s] → hidden states [s, b, hidden]."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens).transpose(0, 1).contiguous()  # contiguous: pipeline stages send it


class OutputHead(nn.Module):
    """Final norm and the output layer: fp32 logits with the SUBS-blocked columns at -inf.

    Never predicting [MASK] is the SUBS parameterization that the NELBO of Eq. 7 assumes. With tied
    embeddings `output` holds no weight of its own: the caller passes the embedding's."""

    def __init__(self, hidden_size: int, output: nn.Module | None, blocked_ids: torch.Tensor, norm: str = "layernorm",
                 eps: float = 1e-5):  # fmt: skip
        super().__init__()
        self.norm = make_norm(norm, hidden_size, eps)
        self.output = output
        self.register_buffer("blocked_ids", blocked_ids, persistent=False)

    project = staticmethod(_call_output)

    def forward(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.project(self.output, self.norm(h), weight).float()
        logits[..., self.blocked_ids] = float("-inf")  # a few columns, in place: no vocabulary-sized copy
        return logits


def run_layers(
    layers, h: torch.Tensor, rope, mask, past_kv: list[KV] | None, seq: int, keep: int
) -> tuple[torch.Tensor, list[KV]]:
    """The layer stack over `seq` tokens (h may hold a sequence-parallel slice of them); only the
    last layer narrows to the `keep` rows the output needs."""
    new_kv, last = [], len(layers) - 1
    for i, layer in enumerate(layers):
        rows = keep if i == last else seq
        layer_mask = mask.first_rows(rows) if mask is not None else None
        h, kv = layer(h, rope, layer_mask, past_kv[i] if past_kv is not None else None, rows)
        new_kv.append(kv)
    return h, new_kv


class Network(nn.Module):
    """Embedding → layers → output head, with Eq. 6's interface."""

    def __init__(self, embedding: Embedding, rotary: nn.Module, layers: list[Layer], head: OutputHead, vocab_size: int,
                 tie_embeddings: bool = False):  # fmt: skip
        super().__init__()
        self.embedding, self.rotary = embedding, rotary
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.vocab_size = vocab_size
        self.tie_embeddings = tie_embeddings

    def output_weight(self) -> torch.Tensor | None:
        """The weight a tied output layer reads (the embedding's), or None: the head has its own."""
        return self.embedding.embed.weight if self.tie_embeddings else None

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: AttentionMask | None,
        *,
        past_kv: list[KV] | None = None,
        num_outputs: int | None = None,
        labels: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> ModelOutput:
        """Run x_θ on `tokens` [b, s] at rotary `positions` [s].

        `past_kv` holds each layer's cached clean keys/values, which every query sees (Eq. 6);
        `num_outputs` keeps the first n positions for the output (the noisy half of x_t ⊕ x);
        `labels` [b, n] turns the output into per-token cross-entropy.
        """
        seq = tokens.shape[1]
        keep = seq if num_outputs is None else num_outputs
        h, kv = run_layers(self.layers, self.embedding(tokens), self.rotary(positions), mask, past_kv, seq, keep)
        kv_out = kv if return_kv else None
        if labels is not None:
            return ModelOutput(None, self.labelled_nll(h, labels), kv_out)
        return ModelOutput(self.full_logits(self.head(h, self.output_weight())), None, kv_out)

    def labelled_nll(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy [b, n] of labels [b, n] from the last layer's hidden states [n, b, hidden]."""
        return self.token_nll(self.head(h, self.output_weight()), labels)

    def token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy [b, n] of labels [b, n] from logits [n, b, V]."""
        return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, b, V] → [b, n, vocab_size]."""
        return logits.transpose(0, 1)[..., : self.vocab_size]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_network(model: ModelConfig, vocab_size: int, mask_id: int, autoregressive: bool = False) -> Network:
    """The network on plain torch layers (nn.Linear, nn.Embedding), sized by `model` (preset resolved)
    for a vocabulary of `vocab_size` ids including the mask token `mask_id` (every row of an imported
    table: `ModelConfig.vocabulary`). The AR baseline of an imported base predicts the mask row too."""
    m = model.resolved()
    hidden, rows = m.hidden_size, m.vocabulary(vocab_size)

    def layer() -> Layer:
        attn = Attention(nn.Linear(hidden, m.qkv_rows, bias=m.qkv_bias),
                         nn.Linear(m.num_heads * m.head_dim, hidden, bias=m.out_bias),
                         m.head_dim, m.attention_backend, m.query_groups, *qk_norms(m))  # fmt: skip
        mlp = MLP(nn.Linear(hidden, m.fc1_rows, bias=m.mlp_bias), nn.Linear(m.ffn_hidden_size, hidden, bias=m.mlp_bias),
                  m.mlp)  # fmt: skip
        return Layer(hidden, attn, mlp, m.dropout, m.norm, m.norm_eps)

    blocked = subs_blocked_ids(0, rows, rows, m.blocked_mask_id(mask_id, autoregressive))
    output = None if m.tie_embeddings else nn.Linear(hidden, rows, bias=False)
    head = OutputHead(hidden, output, blocked, m.norm, m.norm_eps)
    layers = [layer() for _ in range(m.num_layers)]
    return Network(Embedding(nn.Embedding(rows, hidden)), rotary_embedding(m), layers, head, rows, m.tie_embeddings)


def set_attention_backend(network: nn.Module, backend: str) -> None:
    """Run every attention layer of `network` with `backend` (e.g. sdpa for sampling, whose query and
    key lengths change at every step, where a compiled FlexAttention would recompile)."""
    for module in network.modules():
        if isinstance(module, Attention):
            module.backend = backend
