"""The fp8 linear path (model/fp8.py) against a hand-written quantize–dequantize reference in float64,
and a whole fp8 model against the same model in fp32. `torch._scaled_mm` runs on CPU, so this is
the code path a Hopper GPU runs, on other hardware."""

import torch

from sad3_megatron.core.objectives import BlockDiffusionObjective
from sad3_megatron.core.schedules import make_schedule
from sad3_megatron.model.fp8 import E4M3, E5M2, Fp8Linear, enable_fp8


def test_fp8_linear_forward_and_gradients_equal_the_quantized_reference(dequantized, rel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    y = Fp8Linear.apply(x, w, torch.float32)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)

    x2, dy2 = x.reshape(-1, 64), dy.reshape(-1, 48)
    y_ref = dequantized(x2, E4M3) @ dequantized(w, E4M3).T
    dx_ref = dequantized(dy2, E5M2) @ dequantized(w, E4M3)
    dw_ref = dequantized(dy2, E5M2).T @ dequantized(x2, E4M3)
    assert rel(y.reshape(-1, 48), y_ref) < 1e-6
    assert rel(x.grad.reshape(-1, 64), dx_ref) < 1e-6
    assert rel(w.grad, dw_ref) < 1e-6
    # Quantization happened, and stayed within fp8's precision of the exact product.
    exact = x2.detach().double() @ w.detach().double().T
    assert 1e-3 < rel(y.reshape(-1, 48), exact) < 0.1


def test_fp8_model_tracks_the_fp32_model(tiny):
    model = tiny.model(hidden=64, heads=4)
    fp8_model = tiny.model(hidden=64, heads=4)  # the same seed: the same weights
    assert enable_fp8(fp8_model) == 4 * len(model.layers)
    L, objective = 16, BlockDiffusionObjective(16, 4, make_schedule("linear"), tiny.mask_id)
    x = tiny.tokens(4, L)
    noised = objective.noise(x, torch.Generator().manual_seed(1))

    def loss_and_grad(m):
        m.zero_grad()
        loss = objective.loss(m, x, noised).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])

    loss32, grad32 = loss_and_grad(model)
    loss8, grad8 = loss_and_grad(fp8_model)
    assert loss8 != loss32  # the fp8 path ran
    assert abs(loss8 - loss32) / loss32 < 0.02
    assert torch.nn.functional.cosine_similarity(grad8, grad32, dim=0) > 0.99
