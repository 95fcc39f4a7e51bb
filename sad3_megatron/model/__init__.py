"""The transformer x_θ on megatron-core layers, and how to build it from a config."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

from sad3_megatron.config import PRESETS, ModelConfig, resolved_model_sizes
from sad3_megatron.model.transformer import KV, ModelOutput, SAD3Transformer, TransformerSpec


def make_spec(cfg: ModelConfig, vocab_size: int, mask_id: int, backend: str) -> TransformerSpec:
    return TransformerSpec(
        **resolved_model_sizes(cfg),
        vocab_size=vocab_size,
        mask_id=mask_id,
        dropout=cfg.dropout,
        rotary_base=cfg.rotary_base,
        attention_backend=backend,
    )


def model_parallel_config() -> ModelParallelConfig:
    """megatron-core layer settings for this process's tensor-parallel group."""
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=True,  # identical init on every TP layout; GPU init needs CUDA RNG trackers
        perform_initialization=True,
        params_dtype=torch.float32,
    )


def build_model(spec: TransformerSpec, device: torch.device) -> SAD3Transformer:
    """Instantiate x_θ for this rank's tensor-parallel shard (parallel_state must be initialized)."""
    return SAD3Transformer(spec, model_parallel_config()).to(device)


__all__ = [
    "KV",
    "PRESETS",
    "ModelOutput",
    "SAD3Transformer",
    "TransformerSpec",
    "build_model",
    "make_spec",
    "model_parallel_config",
]
