"""The denoiser x_θ on megatron-core tensor-parallel layers: the network of `core/network.py` (shared
with the exported model), built from ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding.

What is here is only what parallel layouts add: the layers themselves, how many key/value groups a
shard holds (TP splits the fused q/k/v rows into whole groups, megatron-core's `linear_qkv` layout),
SwiGLU's fc1 as a stride-2 column-parallel linear (rank r holds [gate_r; up_r], megatron-core's
`partition_stride`), the vocabulary padding and sharding of the output layer (vocab-parallel
cross-entropy, gather of the logits; with tied embeddings the output layer reads the
vocabulary-parallel embedding's rows), and where sequence parallelism splits the sequence
(model/sequence_parallel.py). At TP = 1 it runs as a plain module. Module names are those of
`core/network.py`, so the consolidated weights load into the exported model 1:1 (after trimming the
padded vocabulary rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from sad3_megatron.core import network
from sad3_megatron.core.masks import RowsMask
from sad3_megatron.core.model_config import ModelConfig
from sad3_megatron.core.network import qk_norms, rotary_embedding, subs_blocked_ids
from sad3_megatron.model.chunked_loss import chunked_vocab_parallel_nll
from sad3_megatron.model.context_parallel import gather_keys_values
from sad3_megatron.model.sequence_parallel import first_rows, split_sequence


@dataclass(frozen=True)
class TransformerSpec:
    """What the trainer's model is built from: the resolved `model:` section and the tokenizer's sizes."""

    model: ModelConfig  # every size set (ModelConfig.resolved), the attention backend resolved
    vocab_size: int  # the tokenizer's vocabulary plus the mask token
    mask_id: int
    autoregressive: bool = False  # the AR baseline: an imported base's mask row stays predictable

    @property
    def known_ids(self) -> int:
        """Ids the model knows: the tokenizer's, or every row of an imported table."""
        return self.model.vocabulary(self.vocab_size)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer (`ModelConfig.table_rows` at this TP size)."""
        return self.model.table_rows(self.vocab_size, parallel_state.get_tensor_model_parallel_world_size())

    @property
    def blocked_mask_id(self) -> int | None:
        return self.model.blocked_mask_id(self.mask_id, self.autoregressive)


def make_spec(
    model: ModelConfig, vocab_size: int, mask_id: int, backend: str | None = None, autoregressive: bool = False
) -> TransformerSpec:
    """The spec of `model` (its preset resolved) for a tokenizer, with `backend` as its attention kernel."""
    resolved = model.resolved()
    if backend is not None:
        resolved = replace(resolved, attention_backend=backend)
    return TransformerSpec(resolved, vocab_size, mask_id, autoregressive)


def _normal_init(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def _parallel_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """megatron-core's parallel linears return (output, bias); the bias is already added."""
    return layer(x)[0]


def _column(mp: ModelParallelConfig, fan_in: int, fan_out: int, bias: bool, stride: int = 1,
            no_weight: bool = False) -> nn.Module:  # fmt: skip
    return tensor_parallel.ColumnParallelLinear(
        fan_in, fan_out, config=mp, init_method=_normal_init(0.02), bias=bias, gather_output=False, stride=stride,
        skip_weight_param_allocation=no_weight,
    )  # fmt: skip


def _row(mp: ModelParallelConfig, fan_in: int, fan_out: int, bias: bool, std: float) -> nn.Module:
    return tensor_parallel.RowParallelLinear(
        fan_in, fan_out, config=mp, init_method=_normal_init(std), bias=bias, input_is_parallel=True,
        skip_bias_add=False,
    )  # fmt: skip


class SelfAttention(network.Attention):
    project = staticmethod(_parallel_output)

    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig, out_std: float):
        # Fused q/k/v rows per key/value group, so a column shard holds whole groups (and their query heads).
        m = spec.model
        qkv = _column(mp, m.hidden_size, m.qkv_rows, bias=m.qkv_bias)
        proj = _row(mp, m.num_heads * m.head_dim, m.hidden_size, bias=m.out_bias, std=out_std)
        q_norm, k_norm = qk_norms(m)
        for norm in (q_norm, k_norm):
            for p in norm.parameters() if norm is not None else ():
                p.sums_over_heads = True  # a TP rank's gradient covers its own heads only: summed over TP
        super().__init__(qkv, proj, m.head_dim, m.attention_backend, m.query_groups, q_norm, k_norm)

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """A RowsMask names every context-parallel rank's keys: gather them (model/context_parallel.py)."""
        return gather_keys_values(k, v) if isinstance(mask, RowsMask) else (k, v)


class MLP(network.MLP):
    project = staticmethod(_parallel_output)

    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig, out_std: float):
        m = spec.model
        # SwiGLU: stride 2, so rank r holds rows [gate_r; up_r] of fc1 = [gate; up] (and initialises them
        # from the same whole matrix on every layout).
        fc1 = _column(mp, m.hidden_size, m.fc1_rows, bias=m.mlp_bias, stride=2 if m.mlp == "swiglu" else 1)
        fc2 = _row(mp, m.ffn_hidden_size, m.hidden_size, bias=m.mlp_bias, std=out_std)
        super().__init__(fc1, fc2, m.mlp)


class TransformerLayer(network.Layer):
    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        out_std = 0.02 / math.sqrt(2 * spec.model.num_layers)
        attn = SelfAttention(spec, mp, out_std)
        m = spec.model
        super().__init__(m.hidden_size, attn, MLP(spec, mp, out_std), m.dropout, m.norm, m.norm_eps)
        self.sequence_parallel = mp.sequence_parallel

    def keep_rows(self, h: torch.Tensor, keep: int) -> torch.Tensor:
        return first_rows(h, keep, self.sequence_parallel)


class Embedding(network.Embedding):
    """Vocabulary-sharded under TP; this rank's [s/TP, b, hidden] slice under sequence parallelism."""

    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        super().__init__(
            tensor_parallel.VocabParallelEmbedding(
                spec.padded_vocab_size, spec.model.hidden_size, init_method=_normal_init(0.02), config=mp
            )
        )
        self.sequence_parallel = mp.sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return split_sequence(super().forward(tokens), self.sequence_parallel)


def output_layer(spec: TransformerSpec, mp: ModelParallelConfig) -> nn.Module:
    """The vocabulary-parallel output linear; weightless when tied (it then reads the embedding's)."""
    m = spec.model
    return _column(mp, m.hidden_size, spec.padded_vocab_size, bias=False, no_weight=m.tie_embeddings)


def output_blocked_ids(spec: TransformerSpec) -> torch.Tensor:
    """The never-predicted columns of this rank's vocabulary shard: padding rows and (SUBS) the mask."""
    shard = spec.padded_vocab_size // parallel_state.get_tensor_model_parallel_world_size()
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    return subs_blocked_ids(first, shard, spec.known_ids, spec.blocked_mask_id)


def parallel_head(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The output layer, with the embedding's weight when tied (megatron-core's shared embedding path)."""
    return layer(x, weight=weight)[0]


class OutputHead(network.OutputHead):
    """The vocabulary-sharded output layer: logits of this rank's shard, padding ids and [MASK] at -inf.
    With tied embeddings it allocates no weight and reads the embedding's (the same rows per rank)."""

    project = staticmethod(parallel_head)

    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        m = spec.model
        super().__init__(m.hidden_size, output_layer(spec, mp), output_blocked_ids(spec), m.norm, m.norm_eps)
        self.spec = spec


def shard_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [b, n] of labels [b, n] from vocabulary-sharded logits [n, b, V/TP]."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1)


def init_seed(base: int, component: int) -> None:
    """Seed each component's initialisation on its own, so a pipeline stage that builds only some
    layers gets exactly the weights the whole model would have."""
    torch.manual_seed((base * 1_000_003 + component) % 2**63)


class SAD3Transformer(network.Network):
    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        base = torch.initial_seed()
        init_seed(base, 0)
        embedding = Embedding(spec, mp)
        layers = []
        for i in range(spec.model.num_layers):
            init_seed(base, 1 + i)
            layers.append(TransformerLayer(spec, mp))
        init_seed(base, 1 + spec.model.num_layers)
        head = OutputHead(spec, mp)
        super().__init__(embedding, rotary_embedding(spec.model), layers, head, spec.known_ids, spec.model.tie_embeddings)
        self.spec = spec

    def token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return shard_nll(logits, labels)

    def labelled_nll(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """With `loss_chunk_tokens`, the output layer and its vocab-parallel cross-entropy run chunk by
        chunk and never hold the whole [tokens, vocabulary] logits (model/chunked_loss.py)."""
        if not self.spec.model.loss_chunk_tokens:
            return super().labelled_nll(h, labels)
        weight = self.head.output.weight if self.output_weight() is None else self.output_weight()
        x = self.head.norm(h)
        if self.embedding.sequence_parallel:  # the output layer sees the whole sequence, as megatron's would
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
        else:  # identity forward; the input gradient is summed over the TP ranks' vocabulary shards
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        n, b, hidden = x.shape
        nll = chunked_vocab_parallel_nll(
            x.reshape(n * b, hidden), weight, labels.transpose(0, 1).reshape(-1), self.head.blocked_ids,
            vocab_start=parallel_state.get_tensor_model_parallel_rank() * weight.shape[0],
            chunk_tokens=self.spec.model.loss_chunk_tokens, group=parallel_state.get_tensor_model_parallel_group(),
        )  # fmt: skip
        return nll.view(n, b).transpose(0, 1)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return super().full_logits(tensor_parallel.gather_from_tensor_model_parallel_region(logits))
