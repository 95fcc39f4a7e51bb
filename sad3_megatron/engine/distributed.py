"""Process groups: torch.distributed (gloo on CPU, nccl on GPU) and megatron-core's parallel state.

A single process started without a launcher gets a one-rank group on a free local port, so
the same code path serves a laptop run and a multi-node DeepSpeed launch.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(
    device: torch.device, tensor_parallel: int = 1, pipeline_parallel: int = 1, context_parallel: int = 1
) -> None:
    """Initialise torch.distributed and megatron-core's parallel state once per process. Ranks are laid
    out TP fastest, then CP, then DP (megatron's tp-cp-ep-dp-pp order)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
            )
        if device.type == "cuda":  # before NCCL starts: each rank drives its own GPU
            index = device.index if device.index is not None else int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(index)
            dist.init_process_group("nccl", device_id=torch.device("cuda", index))
        else:
            dist.init_process_group("gloo")
    if pipeline_parallel > 1:
        import deepspeed

        # DeepSpeed's communication layer wraps the same group: its PipelineModule needs it at build time.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    if not parallel_state.model_parallel_is_initialized():
        world = dist.get_world_size()
        if world % (tensor_parallel * pipeline_parallel * context_parallel):
            from sad3_megatron.core.errors import Sad3Error

            raise Sad3Error(
                f"world size {world} is not divisible by TP × PP × CP = {tensor_parallel} × {pipeline_parallel} × "
                f"{context_parallel}: change the process count or the parallel sizes"
            )
        parallel_state.initialize_model_parallel(
            tensor_parallel, pipeline_parallel, context_parallel_size=context_parallel
        )


def shutdown_distributed() -> None:
    """Tear the process groups down, every rank together, once a process's work is done. Left to
    interpreter exit, gloo's threads can abort a process that has already finished its work
    ("terminate called without an active exception"), which torchrun reports as a failure."""
    if not dist.is_initialized():
        return
    dist.barrier()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            from sad3_megatron.core.errors import Sad3Error

            raise Sad3Error(
                "train.device=cuda but torch sees no GPU: use train.device=cpu or install a CUDA build of torch"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def data_parallel_info() -> tuple[int, int]:
    """(rank, size) of this process in the data-parallel group: the ranks that read different rows
    (context-parallel ranks read the same rows and split them)."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def context_parallel_info() -> tuple[int, int]:
    """(rank, size) of this process in the context-parallel group."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()


def gradient_group():
    """The ranks DeepSpeed averages gradients over and ZeRO partitions over: data × context parallel."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)
