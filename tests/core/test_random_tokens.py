"""AR + random batch size (Table 1): a random ~half of the next-token targets in training, all of
them in evaluation."""

import math

import torch

from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.objectives import AutoregressiveObjective
from sad3_megatron.core.registry import build_objective


def test_training_scores_a_random_half_weighted_by_two_and_eval_scores_all(tiny):
    model, x = tiny.network(), tiny.tokens(8, 32)
    objective = build_objective(DiffusionConfig(objective="ar", ar_random_tokens=True), 32, 49)
    assert isinstance(objective, AutoregressiveObjective) and objective.random_tokens
    full = AutoregressiveObjective(32)
    with torch.no_grad():
        nll = model(x[:, :-1], torch.arange(31), full.mask, labels=x[:, 1:]).token_nll  # every target, by hand
    model.eval()
    assert torch.allclose(objective(model, x, torch.Generator().manual_seed(0)).loss, nll.mean())
    model.train()  # dropout is 0, so only the subset differs
    batch = objective.training_pass(x, torch.Generator().manual_seed(1))
    kept = batch.weights > 0
    assert set(batch.weights.unique().tolist()) <= {0.0, 2.0}
    n = kept.numel()
    assert abs(kept.sum().item() - n / 2) < 4 * math.sqrt(n / 4)  # Binomial(n, 1/2) within 4 sd
    with torch.no_grad():
        loss = objective(model, x, torch.Generator().manual_seed(1)).loss
    assert torch.allclose(loss, (2.0 * nll * kept).sum() / n)
