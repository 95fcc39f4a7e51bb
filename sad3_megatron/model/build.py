"""Instantiate the trainer's model for this rank's tensor-parallel shard."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

from sad3_megatron.model.sequence_parallel import sum_head_sharded_grads, sum_sequence_parallel_grads
from sad3_megatron.model.transformer import SAD3Transformer, TransformerSpec


def model_parallel_config(sequence_parallel: bool = False) -> ModelParallelConfig:
    """megatron-core layer settings for this process's tensor-parallel group."""
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,  # identical init on every TP layout; GPU init needs CUDA RNG trackers
        perform_initialization=True,
        params_dtype=torch.float32,
    )


def build_model(spec: TransformerSpec, device: torch.device, sequence_parallel: bool = False) -> SAD3Transformer:
    """Instantiate x_θ for this rank's tensor-parallel shard (parallel_state must be initialized)."""
    model = SAD3Transformer(spec, model_parallel_config(sequence_parallel)).to(device)
    prepare_tensor_parallel(model, sequence_parallel)
    return model


def prepare_tensor_parallel(model: torch.nn.Module, sequence_parallel: bool) -> None:
    """Sum over TP the gradients of replicated parameters that each rank computes in part: under
    sequence parallelism every replicated one (each rank sees a sequence slice), otherwise QK-norm's
    weights (each rank sees its own heads)."""
    if sequence_parallel:
        prepare_sequence_parallel(model)
    elif parallel_state.get_tensor_model_parallel_world_size() > 1:
        sum_head_sharded_grads(model)
        if torch.distributed.get_backend(parallel_state.get_tensor_model_parallel_group()) == "gloo":
            from sad3_megatron.model.gloo_collectives import use_gloo_tensor_parallel  # CPU runs only

            use_gloo_tensor_parallel()


def prepare_sequence_parallel(model: torch.nn.Module) -> None:
    """Hook the gradients of sequence-sliced parameters; on gloo (CPU), swap in collectives gloo has."""
    sum_sequence_parallel_grads(model)
    if torch.distributed.get_backend(parallel_state.get_tensor_model_parallel_group()) == "gloo":
        from sad3_megatron.model.gloo_collectives import use_gloo_sequence_parallel  # CPU runs only

        use_gloo_sequence_parallel(model)
