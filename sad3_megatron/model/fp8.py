"""fp8 matmuls for the transformer layers' tensor-parallel linears (`train.fp8`, off by default).

Recipe: dynamic tensorwise scaling. Each of a linear layer's three GEMMs runs in `torch._scaled_mm`:
the forward y = x Wᵀ, the input gradient dx = dy W and the weight gradient dW = dyᵀ x. Each operand
is scaled into the fp8 range by its current absolute maximum. Activations and weights use e4m3;
gradients use e5m2, whose wider range suits them. Products accumulate in fp32. The fp32 master weights,
the optimizer, the embedding and the vocabulary projection stay as they are; the output layer stays
in bf16, as is usual, since it is sensitive and cheap to keep.

Why this and not Transformer Engine or torchao:
- Transformer Engine's layers replace megatron-core's, and its wheels must match the CUDA and torch
  builds exactly.
- torchao's float8 conversion swaps `nn.Linear` modules, and megatron-core's ColumnParallelLinear and
  RowParallelLinear are not `nn.Linear`.
A `_forward_impl` built on megatron-core's public region mappings (model/tp_linear.py) keeps the
layers, their sharding and tensor/sequence parallelism as they are. It changes only the matmul. `_scaled_mm` also runs on
CPU, so the path is tested there against a hand-written quantize–dequantize reference.
"""

from __future__ import annotations

import torch
from torch import nn

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.model.tp_linear import set_forward_impl

E4M3 = getattr(torch, "float8_e4m3fn", None)
E5M2 = getattr(torch, "float8_e5m2", None)


def require_fp8(device: torch.device) -> None:
    """Refuse fp8 where the package or the hardware cannot run it, saying what to change."""
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        raise Sad3Error(f"train.fp8 needs torch >= 2.4 (float8 dtypes and _scaled_mm); this is {torch.__version__}")
    if device.type != "cuda":
        raise Sad3Error("train.fp8 needs a CUDA GPU with fp8 tensor cores (Hopper or Ada): set train.fp8=false on CPU")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise Sad3Error(
            f"train.fp8 needs compute capability 8.9 or newer (Ada, Hopper); {torch.cuda.get_device_name(device)} "
            f"is {major}.{minor}: set train.fp8=false"
        )


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t ≈ q · inverse_scale, with q in `dtype` and one fp32 scale for the whole tensor."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = fmax / amax
    q = (t.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.reciprocal()


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, a_dtype, b_dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """a [m, k] @ b[n, k]ᵀ with both operands quantized to fp8 and an fp32 accumulator."""
    qa, inv_a = quantize(a, a_dtype)
    qb, inv_b = quantize(b, b_dtype)
    # _scaled_mm wants the first operand row-major and the second column-major: bᵀ of a row-major b.
    return torch._scaled_mm(qa, qb.t(), scale_a=inv_a, scale_b=inv_b, out_dtype=out_dtype)


class Fp8Linear(torch.autograd.Function):
    """y = x Wᵀ with all three GEMMs in fp8 (forward e4m3 × e4m3, backward e5m2 × e4m3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.out_dtype = out_dtype
        flat = x.reshape(-1, x.shape[-1])
        return fp8_matmul(flat, weight, E4M3, E4M3, out_dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_x = fp8_matmul(dy, weight.t().contiguous(), E5M2, E4M3, ctx.out_dtype).view_as(x).to(x.dtype)
        grad_w = fp8_matmul(dy.t().contiguous(), flat.t().contiguous(), E5M2, E4M3, torch.float32)
        return grad_x, grad_w.to(weight.dtype), None


def fp8_linear(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ in fp8, returned in the autocast dtype (or the input's dtype outside autocast)."""
    device = input.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else input.dtype
    rows = input.numel() // input.shape[-1]  # the inner size of the weight-gradient GEMM
    if rows % 16 or input.shape[-1] % 16 or weight.shape[0] % 16:
        raise Sad3Error(
            f"fp8 matmuls need sizes divisible by 16, got {rows} tokens × {input.shape[-1]} → {weight.shape[0]}: "
            "pick a micro-batch × context and model sizes that are multiples of 16"
        )
    with torch.autocast(device, enabled=False):
        return Fp8Linear.apply(input, weight, out_dtype)


def enable_fp8(model: nn.Module) -> int:
    """Route every linear inside the transformer layers through fp8; returns how many were switched.
    Applied from outside the model, like the parallel layouts, so the model file stays precision-free."""
    from sad3_megatron.model.transformer import TransformerLayer  # the pipeline's stages subclass it

    linears = [
        linear
        for layer in model.modules()
        if isinstance(layer, TransformerLayer)
        for linear in (layer.attn.qkv, layer.attn.proj, layer.mlp.fc1, layer.mlp.fc2)
    ]
    set_forward_impl(linears, fp8_linear)
    return len(linears)
