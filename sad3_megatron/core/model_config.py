"""The network's shape, defined once: the `model:` section of a config.

The trainer's megatron-core model (`model/transformer.py`), the plain-torch network of the export
(`hf/modeling_sad3.py`), the memory plan, the FLOP count and the transformers import/export
(`hf/families.py`) all read these fields; the HF config stores them as they are
(`hf/configuration_sad3.py`). A field added here is added everywhere.

One network, two kinds of block, chosen by fields:
- the paper's DiT-style block (Suppl. F), the default: LayerNorm, GELU MLP with biases, multi-head
  attention with head_dim = hidden / heads, an untied output layer;
- the modern decoder of Llama / Qwen2 / Qwen3 / Mistral: RMSNorm, SwiGLU, grouped-query attention
  (`num_kv_heads`), `head_dim` independent of the hidden size, QK-norm, optional q/k/v biases, tied
  embeddings, scaled rotary frequencies.

Every architecture field defaults to None, which means "the preset's, else the DiT block's"
(`resolved`), so a preset names a whole architecture and checkpoints written before a field existed
keep their meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

AttentionBackend = Literal["auto", "sdpa", "flex", "flash"]
NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "swiglu"]
RopeScaling = Literal["none", "linear", "llama3"]
Family = Literal["llama", "qwen2", "qwen3", "mistral"]

# The paper's DiT-style block: what a field left unset by the config and the preset means.
DIT_BLOCK: dict[str, Any] = {
    "norm": "layernorm", "norm_eps": 1e-5, "mlp": "gelu", "qk_norm": False, "qkv_bias": False, "out_bias": False,
    "mlp_bias": True, "tie_embeddings": False, "rotary_base": 10000.0, "rope_scaling": "none", "rope_factor": 1.0,
    "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_positions": 8192,
}  # fmt: skip

_LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "mlp_bias": False, "hf_family": "llama"}
_QWEN3 = {"norm": "rmsnorm", "norm_eps": 1e-6, "mlp": "swiglu", "mlp_bias": False, "qk_norm": True, "head_dim": 128,
          "num_kv_heads": 8, "rotary_base": 1e6, "vocab_rows": 151936, "max_positions": 40960, "hf_family": "qwen3"}  # fmt: skip

# Shapes of whole architectures (no weights). `small` is the paper's 110M model (12 layers, 768 hidden,
# 12 heads; Suppl. F); tiny..2.7b are DiT blocks. The others are the public config.json of each base on
# the Hugging Face Hub, cited by repository; `vocab_rows` is the rows of its embedding table.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"num_layers": 4, "hidden_size": 128, "num_heads": 4, "ffn_hidden_size": 512},
    "small": {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "ffn_hidden_size": 3072},
    "medium": {"num_layers": 24, "hidden_size": 1024, "num_heads": 16, "ffn_hidden_size": 4096},
    "large": {"num_layers": 24, "hidden_size": 1536, "num_heads": 16, "ffn_hidden_size": 6144},
    "xl": {"num_layers": 24, "hidden_size": 2048, "num_heads": 16, "ffn_hidden_size": 8192},
    "2.7b": {"num_layers": 32, "hidden_size": 2560, "num_heads": 32, "ffn_hidden_size": 10240},
    # meta-llama/Llama-3.2-1B: tied, rope_theta 500000 with llama3 scaling (factor 32, 1 / 4, original 8192).
    "llama3.2-1b": {**_LLAMA, "num_layers": 16, "hidden_size": 2048, "num_heads": 32, "num_kv_heads": 8,
                    "ffn_hidden_size": 8192, "tie_embeddings": True, "rotary_base": 500000.0, "rope_scaling": "llama3",
                    "rope_factor": 32.0, "vocab_rows": 128256, "max_positions": 131072},  # fmt: skip
    # meta-llama/Meta-Llama-3-8B: untied, rope_theta 500000, no scaling.
    "llama3-8b": {**_LLAMA, "num_layers": 32, "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 8,
                  "ffn_hidden_size": 14336, "rotary_base": 500000.0, "vocab_rows": 128256, "max_positions": 8192},  # fmt: skip
    # Qwen/Qwen2.5-0.5B: q/k/v biases, tied, 14 heads over 2 KV heads.
    "qwen2.5-0.5b": {"norm": "rmsnorm", "norm_eps": 1e-6, "mlp": "swiglu", "mlp_bias": False, "qkv_bias": True,
                     "num_layers": 24, "hidden_size": 896, "num_heads": 14, "num_kv_heads": 2, "ffn_hidden_size": 4864,
                     "tie_embeddings": True, "rotary_base": 1e6, "vocab_rows": 151936, "max_positions": 32768,
                     "hf_family": "qwen2"},  # fmt: skip
    # Qwen/Qwen3-{0.6B,1.7B,4B,8B}: QK-norm, head_dim 128 whatever the hidden size, 8 KV heads.
    "qwen3-0.6b": {**_QWEN3, "num_layers": 28, "hidden_size": 1024, "num_heads": 16, "ffn_hidden_size": 3072,
                   "tie_embeddings": True},  # fmt: skip
    "qwen3-1.7b": {**_QWEN3, "num_layers": 28, "hidden_size": 2048, "num_heads": 16, "ffn_hidden_size": 6144,
                   "tie_embeddings": True},  # fmt: skip
    "qwen3-4b": {**_QWEN3, "num_layers": 36, "hidden_size": 2560, "num_heads": 32, "ffn_hidden_size": 9728,
                 "tie_embeddings": True},  # fmt: skip
    "qwen3-8b": {**_QWEN3, "num_layers": 36, "hidden_size": 4096, "num_heads": 32, "ffn_hidden_size": 12288,
                 "tie_embeddings": False},  # fmt: skip
}
CUSTOM = "custom"  # the preset of an imported architecture: every field set explicitly
PRESETS[CUSTOM] = {}

# What an imported checkpoint decides (hf/families.py fills them from its config.json; a run that starts
# from a checkpoint takes them from it and checks any it sets itself).
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "num_kv_heads", "head_dim", "norm", "norm_eps",
    "mlp", "qk_norm", "qkv_bias", "out_bias", "mlp_bias", "tie_embeddings", "rotary_base", "rope_scaling",
    "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions", "vocab_rows",
    "max_positions", "hf_family",
)  # fmt: skip


@dataclass
class ModelConfig:
    """The transformer without time conditioning (Suppl. F). `preset` fills the fields left unset."""

    preset: str = "tiny"
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None  # query heads
    ffn_hidden_size: int | None = None
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention; 1 = multi-query); None: num_heads
    head_dim: int | None = None  # None: hidden_size / num_heads
    norm: NormKind | None = None  # layernorm (the DiT block) | rmsnorm (as transformers computes it)
    norm_eps: float | None = None  # every norm's epsilon, QK-norm's included
    mlp: MlpKind | None = None  # gelu: fc1 → GELU → fc2; swiglu: fc1 = [gate; up], silu(gate)·up → fc2
    qk_norm: bool | None = None  # a norm over head_dim on every query and key head, before rotary (Qwen3)
    qkv_bias: bool | None = None  # biases on the query/key/value projections (Qwen2 / 2.5)
    out_bias: bool | None = None  # a bias on the attention output projection
    mlp_bias: bool | None = None  # biases on both MLP linears (the DiT block's)
    tie_embeddings: bool | None = None  # the output layer reads the embedding's weight
    rotary_base: float | None = None  # θ of the rotary frequencies
    rope_scaling: RopeScaling | None = None  # none | linear | llama3 (transformers' formulas; core/rotary.py)
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None  # llama3 only
    rope_high_freq_factor: float | None = None  # llama3 only
    rope_original_max_positions: int | None = None  # llama3 only
    vocab_rows: int | None = None  # rows of an imported embedding table (e.g. Qwen's padded 151,936); None: padded tokenizer
    max_positions: int | None = None  # the base's max_position_embeddings, written back by exports; None: seq_len
    hf_family: Family | None = None  # the transformers family of an imported base (what `--format transformers` writes)
    dropout: float = 0.1
    seq_len: int = 128  # L, the training context
    attention_backend: AttentionBackend = "auto"
    loss_chunk_tokens: int = 0  # > 0: output-layer loss in chunks of this many tokens, never whole logits

    def resolved(self) -> ModelConfig:
        """A copy with every field set: explicit values, then the preset's, then the DiT block's; then
        num_kv_heads = num_heads and head_dim = hidden / heads where still unset."""
        preset = PRESETS.get(self.preset, {})
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in values:
            if values[name] is None:
                values[name] = preset.get(name, DIT_BLOCK.get(name))
        if values["num_kv_heads"] is None and values["num_heads"]:
            values["num_kv_heads"] = values["num_heads"]
        if values["head_dim"] is None and values["num_heads"] and values["hidden_size"]:
            values["head_dim"] = values["hidden_size"] // values["num_heads"]
        return replace(self, **values)

    def architecture(self) -> dict[str, Any]:
        """The resolved architecture fields (what an import decides)."""
        resolved = self.resolved()
        return {name: getattr(resolved, name) for name in ARCHITECTURE_FIELDS}

    @property
    def query_groups(self) -> int:
        """Query heads per key/value head (resolved configs)."""
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows(self) -> int:
        """Output rows of the fused q/k/v projection: (heads + 2 · KV heads) · head_dim."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def fc1_rows(self) -> int:
        """Output rows of the MLP's first linear: [gate; up] for SwiGLU."""
        return self.ffn_hidden_size * (2 if self.mlp == "swiglu" else 1)

    def vocabulary(self, tokenizer_ids: int) -> int:
        """Ids the model knows: the tokenizer's (mask token included), or every row of an imported table."""
        return max(tokenizer_ids, self.vocab_rows or 0)

    def table_rows(self, tokenizer_ids: int, tensor_parallel: int = 1) -> int:
        """Rows of the embedding and output layer: an imported table as it is when the tokenizer fits
        inside it (Qwen's padding holds the mask token: no resize); otherwise the vocabulary padded to
        a multiple of 128 (of 128 × TP when TP does not divide 128), so the output layer shards evenly
        and power-of-two TP layouts share one consolidated shape."""
        if self.vocab_rows and self.vocab_rows >= tokenizer_ids and self.vocab_rows % tensor_parallel == 0:
            return self.vocab_rows
        multiple = 128 if 128 % tensor_parallel == 0 else 128 * tensor_parallel
        return math.ceil(self.vocabulary(tokenizer_ids) / multiple) * multiple

    def blocked_mask_id(self, mask_id: int, autoregressive: bool) -> int | None:
        """The mask id the output layer never predicts. A diffusion model always blocks it (SUBS); the AR
        baseline of an imported base predicts every row of the base's table, so that it computes the
        base's function exactly, and blocks only a mask row that sad3 added past it."""
        if autoregressive and self.vocab_rows is not None and mask_id < self.vocab_rows:
            return None
        return mask_id


def from_dict(cls: type, raw: dict[str, Any]):
    """A config dataclass from a saved dict, ignoring keys it does not define (a newer or older writer)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known})
