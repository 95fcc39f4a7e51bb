"""Run under torchrun with 2 processes (TP = 2, gloo). Builds the model twice from the same seed:
once with megatron-core's own linear forward, once with model/tp_linear.py's forward (the path fp8
takes, with a plain matmul), and checks the loss and every gradient agree on every rank.
Prints one line, "tp_linear ok" or a mismatch, and exits non-zero on a mismatch."""

import sys

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from sad3_megatron.core.model_config import ModelConfig
from sad3_megatron.core.objectives import BlockDiffusionObjective
from sad3_megatron.core.schedules import make_schedule
from sad3_megatron.engine.distributed import init_distributed, shutdown_distributed
from sad3_megatron.model.build import build_model
from sad3_megatron.model.tp_linear import dense_matmul, set_forward_impl
from sad3_megatron.model.transformer import make_spec

init_distributed(torch.device("cpu"), tensor_parallel=2)
spec = make_spec(ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=128, dropout=0.0), 50, 49, "sdpa")
models = []
for _ in range(2):
    torch.manual_seed(0)
    models.append(build_model(spec, torch.device("cpu")))
linears = [m for m in models[1].modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
set_forward_impl(linears, dense_matmul)

L = 16
objective = BlockDiffusionObjective(L, 4, make_schedule("linear"), 49)
x = torch.randint(0, 49, (3, L), generator=torch.Generator().manual_seed(0))
results = []
for model in models:
    loss = objective(model, x, torch.Generator().manual_seed(1)).loss
    loss.backward()
    results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
(loss_a, grads_a), (loss_b, grads_b) = results
worst = max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b, strict=True))
if abs(loss_a - loss_b) > 1e-6 or worst > 1e-6:
    print(f"tp_linear mismatch: loss {loss_a} vs {loss_b}, largest gradient difference {worst}")
    sys.exit(1)
print("tp_linear ok")
shutdown_distributed()
