"""The denoiser x_θ as plain torch modules: one network for the trainer and the exported model.

A pre-LayerNorm DiT-style transformer without time conditioning (Suppl. F): rotary positions, GELU
MLP, dropout, a final LayerNorm and an untied output layer, in megatron's [seq, batch, hidden]
layout between layers. Every piece that is not about parallel layouts lives here:

- the attention core: qkv split per head → rotary → concatenate the cached clean prefix → `attend`
  → merge heads (q/k/v are laid out per head, so a tensor-parallel shard holds whole heads);
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
from .rotary import RotaryEmbedding, apply_rotary


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [b, n, vocab] (full vocabulary), when no labels were given
    token_nll: torch.Tensor | None  # [b, n] cross-entropy of the labels, when labels were given
    kv: list[KV] | None  # this call's keys/values per layer, when asked for


def attention_core(
    qkv: torch.Tensor,
    rope,
    mask: AttentionMask | None,
    past: KV | None,
    keep: int,
    head_dim: int,
    backend: str,
    gather_kv=None,
) -> tuple[torch.Tensor, KV]:
    """Attention over projected qkv [s, b, heads·3·head_dim] (laid out per head as (3, head_dim)).

    Queries are kept for the first `keep` rows only; keys/values of all s rows are returned
    (rotated, [b, heads, s, head_dim]) and attend after the cached prefix `past`. `gather_kv(k, v,
    mask)`, when given, turns the rotated keys/values [s, b, heads, d] of these rows into those the
    mask's keys name (context parallelism gathers every rank's). Returns the merged heads
    [keep, b, heads·head_dim] and this call's K/V."""
    s, b = qkv.shape[:2]
    q, k, v = qkv.view(s, b, -1, 3, head_dim).unbind(3)
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


def subs_blocked_ids(first_id: int, count: int, vocab_size: int, mask_id: int) -> torch.Tensor:
    """Columns [0, count) of an output layer holding ids first_id.. that SUBS never predicts: the
    mask token, and the padding rows past the vocabulary (the trainer pads it to a multiple of 128)."""
    ids = torch.arange(count, device="cpu") + first_id  # on the CPU even under a meta-device build
    return torch.nonzero((ids >= vocab_size) | (ids == mask_id)).flatten()


def copy_unmasked(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS' second rule: a position whose input is not [MASK] predicts its own token with
    probability 1 (logit 0, every other -inf). `logits` [b, n, V] are the outputs of tokens [b, n]."""
    clean = tokens != mask_id
    one_hot = torch.full_like(logits, float("-inf")).scatter_(-1, tokens[..., None], 0.0)
    return torch.where(clean[..., None], one_hot, logits)


def _call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


class Attention(nn.Module):
    def __init__(self, qkv: nn.Module, proj: nn.Module, head_dim: int, backend: str):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.head_dim, self.backend = head_dim, backend

    project = staticmethod(_call)  # how a linear layer is applied (megatron's return (output, bias))

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values the mask's columns name, from those of this call's rows: the same ones here
        (the megatron model gathers them across context-parallel ranks for a RowsMask)."""
        return k, v

    def forward(self, h, rope, mask: AttentionMask | None, past: KV | None, keep: int) -> tuple[torch.Tensor, KV]:
        qkv = self.project(self.qkv, h)
        out, kv = attention_core(qkv, rope, mask, past, keep, self.head_dim, self.backend, self.gather_kv)
        return self.project(self.proj, out), kv


class MLP(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    project = staticmethod(_call)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.project(self.fc2, F.gelu(self.project(self.fc1, h), approximate="tanh"))


class Layer(nn.Module):
    """Pre-LayerNorm residual block: h + attn(norm1(h)), then + mlp(norm2(·)), with dropout."""

    def __init__(self, hidden_size: int, attn: Attention, mlp: MLP, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = attn
        self.norm2 = nn.LayerNorm(hidden_size)
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
    """Final LayerNorm and the output layer: fp32 logits with the SUBS-blocked columns at -inf.

    Never predicting [MASK] is the SUBS parameterization that the NELBO of Eq. 7 assumes."""

    def __init__(self, hidden_size: int, output: nn.Module, blocked_ids: torch.Tensor):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.output = output
        self.register_buffer("blocked_ids", blocked_ids, persistent=False)

    project = staticmethod(_call)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.project(self.output, self.norm(h)).float()
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

    def __init__(self, embedding: Embedding, rotary: nn.Module, layers: list[Layer], head: OutputHead, vocab_size: int):
        super().__init__()
        self.embedding, self.rotary = embedding, rotary
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.vocab_size = vocab_size

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
        return ModelOutput(self.full_logits(self.head(h)), None, kv_out)

    def labelled_nll(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy [b, n] of labels [b, n] from the last layer's hidden states [n, b, hidden]."""
        return self.token_nll(self.head(h), labels)

    def token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy [b, n] of labels [b, n] from logits [n, b, V]."""
        return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, b, V] → [b, n, vocab_size]."""
        return logits.transpose(0, 1)[..., : self.vocab_size]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_network(model: ModelConfig, vocab_size: int, mask_id: int) -> Network:
    """The network on plain torch layers (nn.Linear, nn.Embedding), sized by `model` (preset resolved)
    for a vocabulary of `vocab_size` ids including the mask token `mask_id`."""
    m = model.resolved()
    hidden, ffn = m.hidden_size, m.ffn_hidden_size

    def layer() -> Layer:
        attn = Attention(nn.Linear(hidden, 3 * hidden, bias=False), nn.Linear(hidden, hidden, bias=False),
                         m.head_dim, m.attention_backend)  # fmt: skip
        return Layer(hidden, attn, MLP(nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)), m.dropout)

    blocked = subs_blocked_ids(0, vocab_size, vocab_size, mask_id)
    head = OutputHead(hidden, nn.Linear(hidden, vocab_size, bias=False), blocked)
    rotary = RotaryEmbedding(m.head_dim, m.rotary_base)
    layers = [layer() for _ in range(m.num_layers)]
    return Network(Embedding(nn.Embedding(vocab_size, hidden)), rotary, layers, head, vocab_size)


def set_attention_backend(network: nn.Module, backend: str) -> None:
    """Run every attention layer of `network` with `backend` (e.g. sdpa for sampling, whose query and
    key lengths change at every step, where a compiled FlexAttention would recompile)."""
    for module in network.modules():
        if isinstance(module, Attention):
            module.backend = backend
