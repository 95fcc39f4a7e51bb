"""Run as one process or under torchrun (gloo): the schedule search over a tiny model's held-out rows,
each rank scoring its share of the batches. Rank 0 writes every candidate's variance, both criteria,
to the JSON file named on the command line."""

import json
import sys

import torch
import torch.distributed as dist

from sad3_megatron.core.model_config import ModelConfig
from sad3_megatron.core.objectives import BlockDiffusionObjective
from sad3_megatron.core.schedules import make_schedule
from sad3_megatron.engine.distributed import init_distributed, shutdown_distributed
from sad3_megatron.engine.schedule_search import ScheduleSearch
from sad3_megatron.model.build import build_model
from sad3_megatron.model.transformer import make_spec

init_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = build_model(make_spec(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, dropout=0.0), 50, 49, "sdpa"), torch.device("cpu"))
rows = torch.randint(0, 49, (5 * 4, 16), generator=torch.Generator().manual_seed(1)).numpy()
objective = BlockDiffusionObjective(16, 4, make_schedule("linear"), 49)
grid = [(0.001, 1.0), (0.3, 0.8), (0.45, 0.95)]
out = {}
for criterion in ("elbo", "grad"):
    search = ScheduleSearch(grid, criterion, batches=5, batch_size=4, seed=3)
    result = search.run(model, objective, rows, torch.device("cpu"), step=7)
    out[criterion] = [c.variance for c in result.candidates]
if not dist.is_initialized() or dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
shutdown_distributed()
