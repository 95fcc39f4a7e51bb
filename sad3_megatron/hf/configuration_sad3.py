"""The transformers config of an exported SAD3-LM (or of its AR baseline).

The source of truth is `training_config`, the full sad3 config the model was trained with: its
`model` section is the network's shape (`ModelConfig`) and its `diffusion` section the objective and
noise (`DiffusionConfig`), read back by `model_config()` / `diffusion_config()`. The standard names
that tools read (hidden_size, num_hidden_layers, max_position_embeddings = L, block_size, ...) are
derived from those two sections by `standard_fields` (the model's through `MODEL_NAMES`, the one table
of transformers names, in families.py), and checked on load.

`SdarConfig` reads the other layout sad3 exports (`sad3 export --format sdar`): the config.json of
the SDAR checkpoints that SGLang, lmdeploy and JetEngine serve (model_type "sdar", Qwen3's fields plus
`block_size` and `mask_token_id`), mapping Qwen3's fields to `ModelConfig` by families.py's reader.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ..core.diffusion_config import DiffusionConfig
from ..core.errors import Sad3Error
from ..core.model_config import CUSTOM, ModelConfig, from_dict
from ..core.registry import objective_entry
from .families import MODEL_NAMES, read_architecture

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
    num_key_value_heads: int | None = None  # None: an export written before the field existed
    head_dim: int | None = None
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
        wrong = {k: (getattr(self, k, None), v) for k, v in expected.items()
                 if getattr(self, k, None) is not None and getattr(self, k) != v}  # None: older than the field
        if wrong:
            name, (found, want) = next(iter(wrong.items()))
            raise Sad3Error(
                f"config.json: {name} is {found!r} but its training_config says {want!r}: "
                f"edit training_config, not the derived fields ({', '.join(wrong)})"
            )


class SdarConfig(PreTrainedConfig):
    """The config.json of an SDAR-format export: Qwen3's fields, `block_size` (L') and `mask_token_id`
    (JetAstra/SDAR's layout), read as a sad3 block-diffusion model (objective sad3, no token shift)."""

    model_type = "sdar"
    keys_to_ignore_at_inference = ["past_key_values"]
    objective = "sad3"
    weights = "ema"

    def model_config(self) -> ModelConfig:
        raw = self.to_dict()
        arch = read_architecture(raw, family="qwen3")
        return ModelConfig(preset=CUSTOM, **arch, seq_len=raw["max_position_embeddings"], dropout=0.0).resolved()

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(objective="sad3", block_size=self.block_size)

    def check_standard_fields(self) -> None:
        """Nothing is derived: the fields are the model's."""


__all__ = ["MODEL_NAMES", "Sad3Config", "SdarConfig", "standard_fields"]
