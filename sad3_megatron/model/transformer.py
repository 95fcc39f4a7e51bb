"""The denoiser x_θ: a DiT-style transformer without time conditioning (Suppl. F), on megatron-core
tensor-parallel layers, in megatron's [seq, batch, hidden] layout.

One forward serves every use, through Eq. 6's interface
    logits, K, V ← x_θ(tokens, K^{<b}, V^{<b}):
- vectorized training: tokens = x_t ⊕ x, mask = Mask(L, L'), logits for the noisy half only;
- the naive Alg. 1 loop and KV-cache sampling: tokens = one block, `past_kv` = the clean prefix;
- the AR baseline: tokens = x, the causal mask.
The model knows nothing about parallel layouts beyond its layers and where sequence parallelism splits
the sequence (model/sequence_parallel.py); it runs at TP=1 as a plain module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from sad3_megatron.hf.attention import attend
from sad3_megatron.hf.kv_cache import KV
from sad3_megatron.hf.masks import AttentionMask
from sad3_megatron.hf.rotary import RotaryEmbedding, apply_rotary
from sad3_megatron.model.sequence_parallel import first_rows, split_sequence


@dataclass(frozen=True)
class TransformerSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int  # the tokenizer's vocabulary plus the mask token
    mask_id: int
    dropout: float = 0.1
    rotary_base: float = 10000.0
    attention_backend: str = "sdpa"

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary padded to a multiple of 128 (of 128 × TP when TP does not divide 128), so the
        output layer shards evenly and power-of-two TP layouts share one consolidated shape."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        multiple = 128 if 128 % tp == 0 else 128 * tp
        return math.ceil(self.vocab_size / multiple) * multiple


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [b, n, vocab] (full vocabulary), when no labels were given
    token_nll: torch.Tensor | None  # [b, n] cross-entropy of the labels, when labels were given
    kv: list[KV] | None  # this call's keys/values per layer, when asked for


def _normal_init(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


class SelfAttention(nn.Module):
    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig, out_std: float):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = spec.num_heads // tp
        self.head_dim = spec.hidden_size // spec.num_heads
        self.backend = spec.attention_backend
        # qkv laid out as (heads, 3, head_dim) so a column shard holds whole heads.
        self.qkv = tensor_parallel.ColumnParallelLinear(
            spec.hidden_size,
            3 * spec.hidden_size,
            config=mp,
            init_method=_normal_init(0.02),
            bias=False,
            gather_output=False,
        )
        self.proj = tensor_parallel.RowParallelLinear(
            spec.hidden_size,
            spec.hidden_size,
            config=mp,
            init_method=_normal_init(out_std),
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, h, rope, mask: AttentionMask | None, past: KV | None, keep: int) -> tuple[torch.Tensor, KV]:
        qkv, _ = self.qkv(h)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, self.heads, 3, self.head_dim).unbind(3)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q[:keep], k, v))  # -> [b, heads, s, d]
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = attend(q, k, v, mask, self.backend)
        out = out.permute(2, 0, 1, 3).reshape(keep, b, self.heads * self.head_dim)
        return self.proj(out)[0], new_kv


class MLP(nn.Module):
    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig, out_std: float):
        super().__init__()
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            spec.hidden_size,
            spec.ffn_hidden_size,
            config=mp,
            init_method=_normal_init(0.02),
            bias=True,
            gather_output=False,
        )
        self.fc2 = tensor_parallel.RowParallelLinear(
            spec.ffn_hidden_size,
            spec.hidden_size,
            config=mp,
            init_method=_normal_init(out_std),
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)[0], approximate="tanh"))[0]


class TransformerLayer(nn.Module):
    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        super().__init__()
        out_std = 0.02 / math.sqrt(2 * spec.num_layers)
        self.norm1 = nn.LayerNorm(spec.hidden_size)
        self.attn = SelfAttention(spec, mp, out_std)
        self.norm2 = nn.LayerNorm(spec.hidden_size)
        self.mlp = MLP(spec, mp, out_std)
        self.dropout = nn.Dropout(spec.dropout)
        self.sequence_parallel = mp.sequence_parallel

    def forward(self, h, rope, mask, past, keep: int) -> tuple[torch.Tensor, KV]:
        """`keep` < seq drops the rows nobody reads after this layer (the clean half in the last layer)."""
        attn_out, kv = self.attn(self.norm1(h), rope, mask, past, keep)
        h = first_rows(h, keep, self.sequence_parallel) + self.dropout(attn_out)
        return h + self.dropout(self.mlp(self.norm2(h))), kv


class Embedding(nn.Module):
    """Token ids [b, s] → hidden states [s, b, hidden] (vocabulary-sharded under TP; this rank's
    [s/TP, b, hidden] slice under sequence parallelism)."""

    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        super().__init__()
        self.embed = tensor_parallel.VocabParallelEmbedding(
            spec.padded_vocab_size, spec.hidden_size, init_method=_normal_init(0.02), config=mp
        )
        self.sequence_parallel = mp.sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(0, 1).contiguous()  # contiguous: pipeline stages send it
        return split_sequence(h, self.sequence_parallel)


class OutputHead(nn.Module):
    """Final LayerNorm and the vocabulary-sharded output layer, returning fp32 logits of this rank's
    vocabulary shard with padding ids and the mask token at -inf.

    Never predicting [MASK] is the SUBS parameterization (Sahoo et al., 2024) that the NELBO of
    Eq. 7 assumes."""

    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        super().__init__()
        self.spec = spec
        self.norm = nn.LayerNorm(spec.hidden_size)
        self.output = tensor_parallel.ColumnParallelLinear(
            spec.hidden_size, spec.padded_vocab_size, config=mp, init_method=_normal_init(0.02), bias=False,
            gather_output=False,
        )  # fmt: skip
        shard = spec.padded_vocab_size // parallel_state.get_tensor_model_parallel_world_size()
        ids = torch.arange(shard) + parallel_state.get_tensor_model_parallel_rank() * shard
        blocked = torch.nonzero((ids >= spec.vocab_size) | (ids == spec.mask_id)).flatten()
        self.register_buffer("blocked_ids", blocked, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.norm(h))[0].float()
        logits[..., self.blocked_ids] = float("-inf")  # a few columns, in place: no vocabulary-sized copy
        return logits


def shard_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [b, n] of labels [b, n] from vocabulary-sharded logits [n, b, V/TP]."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1)


def init_seed(base: int, component: int) -> None:
    """Seed each component's initialisation on its own, so a pipeline stage that builds only some
    layers gets exactly the weights the whole model would have."""
    torch.manual_seed((base * 1_000_003 + component) % 2**63)


class SAD3Transformer(nn.Module):
    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        super().__init__()
        self.spec = spec
        base = torch.initial_seed()
        init_seed(base, 0)
        self.embedding = Embedding(spec, mp)
        self.rotary = RotaryEmbedding(spec.hidden_size // spec.num_heads, spec.rotary_base)
        layers = []
        for i in range(spec.num_layers):
            init_seed(base, 1 + i)
            layers.append(TransformerLayer(spec, mp))
        self.layers = nn.ModuleList(layers)
        init_seed(base, 1 + spec.num_layers)
        self.head = OutputHead(spec, mp)

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
        `labels` [b, n] turns the output into per-token cross-entropy, computed shard-wise.
        """
        keep = tokens.shape[1] if num_outputs is None else num_outputs
        h = self.embedding(tokens)
        rope = self.rotary(positions)
        new_kv: list[KV] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = keep if i == last else tokens.shape[1]
            layer_mask = mask.first_rows(rows) if mask is not None else None
            h, kv = layer(h, rope, layer_mask, past_kv[i] if past_kv is not None else None, rows)
            new_kv.append(kv)
        logits = self.head(h)
        kv_out = new_kv if return_kv else None
        if labels is not None:
            return ModelOutput(None, shard_nll(logits, labels), kv_out)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., : self.spec.vocab_size]
        return ModelOutput(logits.transpose(0, 1), None, kv_out)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
