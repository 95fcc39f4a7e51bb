"""A layout-free AdamW state: for every parameter, its Adam moments (exp_avg, exp_avg_sq) as whole
tensors in the TP = 1, unpipelined layout, named like the consolidated weights of model.safetensors.

Together with those weights (the fp32 master weights: sad3 keeps its parameters in fp32 in every
precision mode, autocast only casts the forward) and the step count, this is the whole optimizer,
and nothing in it depends on how the model was split. A checkpoint written under DP = 2, ZeRO-1,
TP = 2 or PP = 2 therefore loads under any other data-parallel size, ZeRO stage, TP, PP and sequence
parallelism: each rank takes its slice of each whole tensor, exactly as it does for the weights
(docs/checkpoints.md says why this rather than DeepSpeed's universal checkpoints).

Where DeepSpeed 0.19 keeps the state, per layout (read and written through its public helpers):
- ZeRO-0 (also PP with ZeRO-0): sad3's GuardedAdamW is the engine's optimizer; its state is keyed
  by the (TP-sharded, stage-local) parameters.
- ZeRO-1/2 (also PP with ZeRO-1): the torch optimizer steps one flat fp32 partition per param group;
  `safe_get_full_optimizer_state` all-reduces a parameter's fragments over the data-parallel group,
  `safe_set_full_optimizer_state` writes this rank's fragment.
- ZeRO-3: the same helpers all-gather / slice a parameter's partition of the flat sub-group state.
The moments then go through the weights' own path: `gather_tensor_parallel` / `to_canonical` on save,
`to_local` / `shard_tensor_parallel` on load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_optimizer_state,
    safe_set_full_optimizer_state,
)
from torch import nn

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.engine.consolidate import gather_tensor_parallel, shard_tensor_parallel
from sad3_megatron.engine.pipeline import canonical_name, to_canonical

MOMENTS = ("exp_avg", "exp_avg_sq")


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that steps (ZeRO wraps it; under ZeRO-0 the engine holds it directly)."""
    optimizer = engine.optimizer
    return optimizer.optimizer if engine.zero_optimization_stage() > 0 else optimizer


def optimizer_steps(engine) -> int:
    """How many optimizer steps AdamW has applied (its bias correction): skipped steps do not count."""
    for state in inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _whole_local(engine, param: nn.Parameter, key: str) -> torch.Tensor:
    """`key` of `param` as a whole tensor of this rank's TP shard (collective over DP under ZeRO)."""
    if engine.zero_optimization_stage() == 0:
        state = inner_optimizer(engine).state.get(param, {})
        return state[key] if key in state else torch.zeros_like(param)
    return safe_get_full_optimizer_state(param, key)


def gather_moments(engine, module: nn.Module, num_layers: int | None) -> dict[str, torch.Tensor]:
    """Every parameter's moments, whole and TP = 1, as {"exp_avg.<name>": tensor, ...} (collective:
    every rank of the world calls it; one parameter at a time is gathered). `num_layers` is set for
    a pipelined model, whose stage names map to the canonical ones."""
    started = optimizer_steps(engine) > 0  # before the first step no rank has any state
    if started and engine.zero_optimization_stage() in (1, 2):
        _link_zero_state(engine)
    out: dict[str, torch.Tensor] = {}
    for key in MOMENTS:
        tensors = {}
        for name, p in module.named_parameters():
            value = _whole_local(engine, p, key) if started else torch.zeros(getattr(p, "ds_shape", p.shape))
            tensors.update(gather_tensor_parallel({name: value}, module))
        if num_layers is not None:
            tensors = to_canonical(tensors, num_layers)
        out.update({f"{key}.{name}": value for name, value in tensors.items()})
    return out


def _local(tensors: Mapping[str, torch.Tensor], key: str, name: str, module: nn.Module, num_layers: int | None):
    """This rank's slice of the consolidated tensor `key` + local parameter `name` (read on demand:
    one whole tensor at a time is held)."""
    canonical = name if num_layers is None else canonical_name(name, num_layers)
    return shard_tensor_parallel({name: tensors[key + canonical]}, module)[name]


def _fresh_state(flat: torch.Tensor, steps: int) -> dict:
    """AdamW's per-tensor state as torch creates it on a first step (step: a CPU float tensor)."""
    return {
        "step": torch.tensor(float(steps), dtype=torch.float32),
        "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
    }


class LocalTensors(Mapping):
    """This rank's slices of consolidated tensors, by local parameter name, each made when asked
    for: iterating holds one whole tensor at a time (e.g. the EMA on resume)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], module: nn.Module, num_layers: int | None):
        self.tensors, self.module, self.num_layers = tensors, module, num_layers
        self.names = [name for name, _ in module.named_parameters()]

    def __getitem__(self, name: str) -> torch.Tensor:
        return _local(self.tensors, "", name, self.module, self.num_layers).clone()

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _link_zero_state(engine) -> None:
    """Point every parameter's ZeRO-1/2 fragment at AdamW's state on its flat partition. DeepSpeed
    links them once, right after the first param group's first step, when the other groups have
    no state yet (their fragments stay empty); linking again once all groups have state fixes that."""
    zero, inner = engine.optimizer, inner_optimizer(engine)
    for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups, strict=True):
        lazy_init_hp_params_optimizer_state(params, flat, inner.state)


def _prepare_zero_state(engine, steps: int) -> None:
    """Create AdamW's state on DeepSpeed's flat fp32 partitions, which it otherwise creates lazily
    at the first step, and link each parameter's fragment to it (what DeepSpeed's universal
    checkpoint loader does before it fills the state)."""
    zero, inner = engine.optimizer, inner_optimizer(engine)
    stage3 = engine.zero_optimization_stage() == 3
    for flat in zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups:
        inner.state[flat] = _fresh_state(flat, steps)
    if not stage3:
        _link_zero_state(engine)


def restore_moments(engine, module: nn.Module, moments: Mapping[str, torch.Tensor], steps: int, num_layers):
    """Load consolidated moments and the step count into the engine's optimizer (every rank)."""
    if steps == 0:
        return  # saved before any optimizer step: AdamW starts fresh, as it did then
    stage = engine.zero_optimization_stage()
    if stage > 0:
        _prepare_zero_state(engine, steps)
    inner = inner_optimizer(engine)
    for name, p in module.named_parameters():
        if stage == 0:
            inner.state[p] = _fresh_state(p.detach(), steps)
        for key in MOMENTS:
            value = _local(moments, key + ".", name, module, num_layers)
            if stage == 0:
                inner.state[p][key].copy_(value)
            else:
                safe_set_full_optimizer_state(p, value.to(p.device), key)


def _partition(whole: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a whole tensor: its slice of the flattened tensor, zero-padded."""
    size = p.ds_tensor.numel()
    start = size * torch.distributed.get_rank(group=p.ds_process_group)
    part = torch.zeros(size, dtype=p.ds_tensor.dtype)
    chunk = whole.flatten()[start : start + size]
    part[: chunk.numel()] = chunk
    return part


@torch.no_grad()
def restore_weights(engine, module: nn.Module, weights: Mapping[str, torch.Tensor], num_layers: int | None) -> None:
    """Load consolidated weights into the model and DeepSpeed's fp32 master copy (every rank). Under
    ZeRO-3 each rank writes only its partition: the whole model is never gathered."""
    for name, p in module.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        try:
            value = _local(weights, "", name, module, num_layers)
        except KeyError:
            raise Sad3Error(f"the checkpoint has no weight {name!r}: resume with the model it was trained with") from None
        if tuple(value.shape) != shape:
            raise Sad3Error(
                f"the checkpoint's weight {name!r} has shape {tuple(value.shape)}, this model's {shape}: "
                "resume with the model it was trained with"
            )
        if hasattr(p, "ds_tensor"):
            p.ds_tensor.copy_(_partition(value, p))
        else:
            p.copy_(value)
    if engine.zero_optimization_stage() > 0:
        engine.optimizer.refresh_fp32_params()  # the master partitions from the weights just loaded
