"""The network's shape, defined once: the `model:` section of a config.

The trainer's megatron-core model (`model/transformer.py`), the plain-torch network of the export
(`hf/modeling_sad3.py`), the memory plan and the FLOP count all read these fields; the HF config
stores them as they are (`hf/configuration_sad3.py`). A field added here is added everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal

AttentionBackend = Literal["auto", "sdpa", "flex", "flash"]

# Sizes only. `small` is the paper's 110M model (12 layers, 768 hidden, 12 heads; Suppl. F).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_layers": 4, "hidden_size": 128, "num_heads": 4, "ffn_hidden_size": 512},
    "small": {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "ffn_hidden_size": 3072},
    "medium": {"num_layers": 24, "hidden_size": 1024, "num_heads": 16, "ffn_hidden_size": 4096},
    "large": {"num_layers": 24, "hidden_size": 1536, "num_heads": 16, "ffn_hidden_size": 6144},
    "xl": {"num_layers": 24, "hidden_size": 2048, "num_heads": 16, "ffn_hidden_size": 8192},
    "2.7b": {"num_layers": 32, "hidden_size": 2560, "num_heads": 32, "ffn_hidden_size": 10240},
}


@dataclass
class ModelConfig:
    """The DiT-style transformer without time conditioning (Suppl. F). `preset` fills the sizes left unset."""

    preset: str = "tiny"
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    ffn_hidden_size: int | None = None
    dropout: float = 0.1
    seq_len: int = 128  # L, the training context
    attention_backend: AttentionBackend = "auto"
    rotary_base: float = 10000.0
    loss_chunk_tokens: int = 0  # > 0: output-layer loss in chunks of this many tokens, never whole logits

    def resolved(self) -> ModelConfig:
        """A copy with every size set: the preset's, unless the field was set explicitly."""
        sizes = PRESETS.get(self.preset, {})
        return replace(self, **{k: v for k, v in sizes.items() if getattr(self, k) is None})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def from_dict(cls: type, raw: dict[str, Any]):
    """A config dataclass from a saved dict, ignoring keys it does not define (a newer or older writer)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known})
