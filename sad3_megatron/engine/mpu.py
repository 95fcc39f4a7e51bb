"""megatron-core's parallel state in the shape DeepSpeed expects of an `mpu` object.

DeepSpeed uses it to find the data-parallel group (the batch arithmetic, ZeRO-3's parameter
offload), the "sequence data parallel" group (gradient averaging, ZeRO-1/2/3 partitions, model
broadcast) and the model-parallel group (a global gradient norm over tensor-parallel shards). Here
model parallel means tensor parallel: pipeline stages are DeepSpeed's own business.

Context parallelism: the sequence-data-parallel hooks return megatron's data × context-parallel
group, so gradients are averaged over it while the batch is counted over data parallel only. Each CP
rank's loss is C × its share (the trainer's scaling), so that average is the data-parallel one. The
Ulysses hooks (`get_sequence_parallel_world_size`, `initialize_sequence_parallel`) are left out on
purpose: with them DeepSpeed sums over the sequence ranks, except ZeRO-3's reduce-scatter, which
does not, and the mpu would stop being read as megatron's.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


class MegatronMPU:
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_sequence_data_parallel_group = staticmethod(lambda: ps.get_data_parallel_group(with_context_parallel=True))
    get_sequence_data_parallel_rank = staticmethod(lambda: ps.get_data_parallel_rank(with_context_parallel=True))
    get_sequence_data_parallel_world_size = staticmethod(
        lambda: ps.get_data_parallel_world_size(with_context_parallel=True)
    )
