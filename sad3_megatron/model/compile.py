"""`torch.compile` of each transformer layer (`train.compile`), applied from outside the model.

Compiling layer by layer, not the whole model, is what large-scale trainers do (torchtitan,
megatron's fusions): every layer has the same code and shapes, so inductor compiles one graph and
reuses it for all of them, and the graph breaks that the DeepSpeed engine, megatron-core's
tensor-parallel autograd functions or the pipeline engine would cause stay outside. Inductor fuses
the LayerNorms, GELU, dropout, rotary rotations and residual adds into a few kernels, which is where
an eager layer of this size spends most of its memory bandwidth.

The mask object is static per training run (`AttentionMask` is frozen and hashable, so dynamo
guards on it instead of recompiling), and `dynamic=False` keeps one specialised graph per shape.
"""

from __future__ import annotations

from torch import nn


def compile_layers(model: nn.Module, mode: str | None = None) -> int:
    """Compile every transformer layer of `model` in place; returns how many were compiled."""
    from sad3_megatron.model.transformer import TransformerLayer  # the pipeline's stages subclass it

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.compile(dynamic=False, mode=mode)
    return len(layers)
