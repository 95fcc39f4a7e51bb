"""Model FLOPs of a training step, and MFU against the device's dense bf16 peak.

Counted as 2 FLOPs per multiply-add in the forward pass and 3× that for forward + backward:
linear layers see every token of the doubled sequence x_t ⊕ x (L tokens for MDLM and AR, 2L for
block diffusion), attention costs 4·d per visible query/key pair (scores and values, taken from
the mask itself, so block-sparse kernels are credited only with the pairs they must compute), and
the output layer sees only the L noisy positions.
"""

from __future__ import annotations

import torch

from sad3_megatron.core.masks import AttentionMask
from sad3_megatron.core.model_config import ModelConfig
from sad3_megatron.core.objectives import Objective

# Dense bf16 tensor-core peaks (TFLOP/s) by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A6000": 155.0,
    "A5000": 111.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def visible_pairs(mask: AttentionMask) -> int:
    return int(mask.dense().sum())


def layer_matmul_parameters(m: ModelConfig) -> int:
    """Weights one token multiplies in a layer (resolved config): q/k/v (grouped-query: fewer key and
    value rows), the output projection, and the MLP (SwiGLU: gate, up and down)."""
    h = m.hidden_size
    return h * m.qkv_rows + m.num_heads * m.head_dim * h + h * m.fc1_rows + m.ffn_hidden_size * h


def training_flops_per_sequence(model: ModelConfig, vocab: int, objective: Objective) -> float:
    """Forward + backward model FLOPs for one training row under `objective`'s layout: its input length
    (2L for x_t ⊕ x, L for MDLM / SEDD, L - 1 for AR), its mask and the rows it scores. `vocab` is the
    output layer's rows."""
    m = model.resolved()
    tokens, outputs = objective.positions.numel(), objective.num_outputs
    pairs = visible_pairs(objective.mask)
    linear = 2 * tokens * m.num_layers * layer_matmul_parameters(m)
    attention = 4 * pairs * m.num_heads * m.head_dim * m.num_layers  # q·k and p·v for every query head
    output = 2 * outputs * m.hidden_size * vocab
    return 3.0 * (linear + attention + output) * getattr(objective, "copies", 1)  # complementary masks: 2 rows


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPUs): MFU is then not reported."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
