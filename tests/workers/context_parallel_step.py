"""One micro-batch of the trainer under context parallelism against the same micro-batch run unsplit,
for several configurations in one torchrun launch:

    torchrun --nproc_per_node N context_parallel_step.py CASES.json OUT.json RUN_ROOT

CASES.json maps a case name to `sad3 train` arguments (a config file, then overrides); each case
must have one micro-batch per rank (grad_accum_steps = 1). Per case, the real Trainer (DeepSpeed
engine, megatron-core groups, mpu, ZeRO) runs forward and backward of step 0 through
`Trainer.micro_step`; its gradients (as DeepSpeed reduced them over data × context-parallel ranks,
TP shards gathered) and its loss (averaged over data-parallel ranks) are compared with an
independent computation: the plain-torch network of core/network.py holding the same weights, run
in one process on every data-parallel rank's whole micro-batch with the same noise, the loss
averaged over them and differentiated. Rank 0 writes {case: {"loss": relative error, "grads":
{parameter: relative error}}} to OUT.json; the test asserts on it."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import groups, safe_get_full_grad
from megatron.core import parallel_state

from sad3_megatron.config import load_config
from sad3_megatron.core.network import build_network
from sad3_megatron.engine.consolidate import gather_tensor_parallel
from sad3_megatron.engine.distributed import shutdown_distributed
from sad3_megatron.engine.run_lock import release_run
from sad3_megatron.engine.trainer import Trainer, _micro_batch


def reset_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    groups.mpu = None
    for name in ("_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)
    groups._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = groups._MPU_TENSOR_MODEL_PARALLEL_RANK = None


def trimmed(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The megatron model's vocabulary-padded rows cut to the plain network's vocabulary."""
    return tensor[: like.shape[0]] if tensor.shape != like.shape else tensor


def reduced_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after DeepSpeed's reduction, whole and in the TP = 1 layout."""
    module = trainer.engine.module
    out = {}
    for name, p in module.named_parameters():
        grad = safe_get_full_grad(p)  # collective under ZeRO-1/2/3: every rank asks for every parameter
        shape = tuple(getattr(p, "ds_shape", p.shape))
        out.update(gather_tensor_parallel({name: grad.reshape(shape)}, module))
    return out


def unsplit(trainer: Trainer, weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of step 0's global batch on the plain network, in this one process."""
    cfg, spec = trainer.cfg, trainer.spec
    net = build_network(cfg.model, spec.vocab_size, spec.mask_id)
    net.load_state_dict({k: trimmed(weights[k], v) for k, v in net.state_dict().items()})
    net.train()
    losses = []
    for slot in range(trainer.dp_size):  # every data-parallel rank's micro-batch, with its noise
        x, document_ids, scored, generator = _micro_batch(trainer.corpus, cfg, 0, slot, trainer.device)
        terms = trainer.objective(net, x, generator, schedule=trainer.schedule, document_ids=document_ids, scored=scored)
        losses.append(terms.loss)
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in net.named_parameters()}


def run_case(argv: list[str], out_dir: Path) -> dict:
    cfg = load_config(argv[0], [*argv[1:], f"run.out_dir={out_dir}"])
    reset_groups()
    trainer = Trainer(cfg)
    loss = trainer.micro_step(0, 0)
    if trainer.dp_size > 1:
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss /= trainer.dp_size
    grads = reduced_grads(trainer)
    weights, _ = trainer.consolidated_weights()
    ref_loss, ref_grads = unsplit(trainer, weights)
    release_run(out_dir)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return {
        "loss": rel(loss, ref_loss),
        "value": ref_loss.item(),
        "grads": {k: rel(trimmed(grads[k], g), g) for k, g in ref_grads.items()},
        "cp": trainer.cp_size,
        "dp": trainer.dp_size,
    }


cases = json.loads(Path(sys.argv[1]).read_text())
root = Path(sys.argv[3])
results = {name: run_case(argv, root / name) for name, argv in cases.items()}
if dist.get_rank() == 0:
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
shutdown_distributed()
