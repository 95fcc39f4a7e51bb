"""The transformers config of an exported SAD3-LM (or of its AR baseline).

The source of truth is `training_config`, the full sad3 config the model was trained with: its
`model` section is the network's shape (`ModelConfig`) and its `diffusion` section the objective and
noise (`DiffusionConfig`), read back by `model_config()` / `diffusion_config()`. The standard names
that tools read (hidden_size, num_hidden_layers, max_position_embeddings = L, block_size, ...) are
derived from those two sections by `standard_fields`, one table each way, and checked on load.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ..core.diffusion_config import DiffusionConfig
from ..core.errors import Sad3Error
from ..core.model_config import ModelConfig, from_dict
from ..core.registry import objective_entry

# sad3 field -> the name transformers' configs use for it (written for tools, never read back).
MODEL_NAMES = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "ffn_hidden_size": "intermediate_size",
    "seq_len": "max_position_embeddings",
    "rotary_base": "rope_theta",
    "dropout": "hidden_dropout",
}
DIFFUSION_NAMES = {
    "objective": "objective",
    "block_size": "block_size",
    "schedule": "noise_schedule",
    "beta": "noise_beta",
    "omega": "noise_omega",
}


def standard_fields(model: ModelConfig, diffusion: DiffusionConfig) -> dict[str, Any]:
    """The transformers-style top-level fields of `model` (resolved) and `diffusion`. The AR
    baseline's block size is 1: it generates one token at a time."""
    fields = {hf: getattr(model.resolved(), name) for name, hf in MODEL_NAMES.items()}
    fields.update({hf: getattr(diffusion, name) for name, hf in DIFFUSION_NAMES.items()})
    if objective_entry(diffusion.objective).autoregressive:
        fields["block_size"] = 1
    return fields


class Sad3Config(PreTrainedConfig):
    model_type = "sad3"
    keys_to_ignore_at_inference = ["past_key_values"]

    # Derived by `standard_fields` from training_config (see the module docstring).
    vocab_size: int = 30522  # the tokenizer's vocabulary including the mask token
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 1024  # L, the training context
    rope_theta: float = 10000.0
    hidden_dropout: float = 0.0
    objective: str = "sad3"  # a name of core/registry.py: sad3 (MDLM when L' = L), ar, sedd
    block_size: int = 4  # L'
    noise_schedule: str = "clipped"
    noise_beta: float = 0.3  # clipped schedule: training mask rates ~ U[β, ω]
    noise_omega: float = 0.8
    # The tokenizer's.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    weights: str = "ema"  # which weights of the checkpoint were exported: ema | raw
    training_config: dict | None = None  # the sad3 config the model was trained with: the source of truth

    def model_config(self) -> ModelConfig:
        """The network's shape, presets resolved."""
        return from_dict(ModelConfig, self._section("model")).resolved()

    def diffusion_config(self) -> DiffusionConfig:
        return from_dict(DiffusionConfig, self._section("diffusion"))

    def _section(self, name: str) -> dict:
        if not self.training_config or not isinstance(self.training_config.get(name), dict):
            raise Sad3Error(f"config.json has no training_config.{name}: export the checkpoint again")
        return self.training_config[name]

    def check_standard_fields(self) -> None:
        """Refuse a config.json whose standard fields were edited away from its training_config."""
        expected = standard_fields(self.model_config(), self.diffusion_config())
        wrong = {k: (getattr(self, k), v) for k, v in expected.items() if getattr(self, k) != v}
        if wrong:
            name, (found, want) = next(iter(wrong.items()))
            raise Sad3Error(
                f"config.json: {name} is {found!r} but its training_config says {want!r}: "
                f"edit training_config, not the derived fields ({', '.join(wrong)})"
            )


__all__ = ["Sad3Config", "standard_fields"]
