"""The resolved plan of a run — layout, batch arithmetic, tokens, and a per-GPU memory estimate —
computed without starting any process group (`sad3 train CONFIG --dry-run`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from sad3_megatron.config import Config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.registry import build_objective

GIB = 1024**3


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    steps: int
    tokens: int
    parameters: int
    memory_gib: dict[str, float]
    sequence_parallel: bool = False
    fits: dict[int, int] | None = None  # ZeRO stage -> largest micro-batch within `gpu_memory_gib`
    gpu_memory_gib: float = 80.0
    activation_checkpointing: str = "none"
    cp: int = 1

    def lines(self) -> list[str]:
        mem = ", ".join(f"{k} {v:.2f}" for k, v in self.memory_gib.items())
        cp = f" × CP {self.cp}" if self.cp > 1 else ""
        return [
            f"world size {self.world_size} = TP {self.tp}{cp} × PP {self.pp} × DP {self.dp}"
            + (" (sequence parallel within TP)" if self.sequence_parallel else "")
            + (" (ZeRO partitions over DP × CP)" if self.cp > 1 else ""),
            f"batch: micro {self.micro_batch} × grad-accum {self.grad_accum} × DP {self.dp} = global {self.global_batch} sequences",
            f"steps {self.steps:,}; tokens {self.tokens:,} ({self.tokens / 1e9:.2f}B)",
            f"parameters {self.parameters:,} ({self.parameters / 1e6:.1f}M)",
            f"memory per GPU, estimated (GiB): {mem}",
            *self.fit_lines(),
        ]

    def fit_lines(self) -> list[str]:
        if not self.fits:
            return []
        fits = ", ".join(f"ZeRO-{z} {n if n else 'none (the states alone do not fit)'}" for z, n in self.fits.items())
        return [
            f"largest micro-batch within {self.gpu_memory_gib:g} GiB per GPU "
            f"(activation checkpointing {self.activation_checkpointing}): {fits}"
        ]


def gradient_accumulation(cfg: Config, dp: int) -> int:
    """train.global_batch_size, when set, decides accumulation for the data-parallel size at hand."""
    t = cfg.train
    if t.global_batch_size <= 0:
        return t.grad_accum_steps
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise Sad3Error(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size × data-parallel size "
            f"= {t.micro_batch_size} × {dp}: change one of them"
        )
    return t.global_batch_size // per_step


def _norm_parameters(m, size: int) -> int:
    return size * (2 if m.norm == "layernorm" else 1)  # LayerNorm has a bias, RMSNorm does not


def layer_parameters(m) -> int:
    """Parameters of one transformer layer of a resolved ModelConfig."""
    h, q = m.hidden_size, m.num_heads * m.head_dim
    attention = h * m.qkv_rows + m.qkv_rows * m.qkv_bias + q * h + h * m.out_bias
    mlp = h * m.fc1_rows + m.ffn_hidden_size * h + (m.fc1_rows + h) * m.mlp_bias
    norms = 2 * _norm_parameters(m, h) + (2 * _norm_parameters(m, m.head_dim) if m.qk_norm else 0)
    return attention + mlp + norms


def parameter_count(cfg: Config, vocab_size: int) -> int:
    """Parameters of the whole model: the layers, the embedding and output tables (one when tied; rows
    as the trainer builds them, `ModelConfig.table_rows`) and the final norm."""
    m = cfg.model.resolved()
    tables = (1 if m.tie_embeddings else 2) * m.table_rows(vocab_size) * m.hidden_size
    return m.num_layers * layer_parameters(m) + tables + _norm_parameters(m, m.hidden_size)


def activation_bytes_per_token(m, mode: str) -> tuple[float, float]:
    """(replicated, split by TP) 16-bit bytes per token and hidden unit that one layer keeps for backward
    (Korthikanti et al., 2022, with a fused attention kernel: no s² term), generalised to grouped-query
    attention, head_dim ≠ hidden / heads, QK-norm and SwiGLU. The DiT block (MHA, GELU, 4h MLP) gives
    their 10 + 24/TP; selective checkpointing keeps the matmul and attention outputs and the layer input
    and mid-layer residual (4 + 16/TP there); full keeps the layer input (2)."""
    if mode == "full":
        return 2.0, 0.0
    q, kv = m.num_heads * m.head_dim / m.hidden_size, m.num_kv_heads * m.head_dim / m.hidden_size
    f = m.ffn_hidden_size / m.hidden_size
    qkv_out, attention_out = 2 * (q + 2 * kv), 2 * q
    fc1_out = 2 * f * (2 if m.mlp == "swiglu" else 1)
    if mode == "selective":
        return 4.0, qkv_out + attention_out + fc1_out
    # Q, K, V and the attention output (input to the projection); the MLP's fc1 output and fc2 input
    # (SwiGLU: gate and up, silu(gate) and the product); QK-norm's inputs; the norms, the qkv and fc1
    # inputs and the dropout masks replicated.
    mlp = fc1_out + 2 * f * (2 if m.mlp == "swiglu" else 1)
    return 10.0, qkv_out + attention_out + mlp + (2 * (q + kv) if m.qk_norm else 0.0)


def make_plan(cfg: Config, world_size: int, vocab_size: int, gpu_memory_gib: float = 80.0) -> Plan:
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if world_size % (p.tensor_parallel * p.pipeline_parallel * p.context_parallel):
        raise Sad3Error(
            f"world size {world_size} is not divisible by TP × PP × CP = {p.tensor_parallel} × {p.pipeline_parallel} × "
            f"{p.context_parallel}"
        )
    dp = world_size // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel)
    accum = gradient_accumulation(cfg, dp)
    global_batch = t.micro_batch_size * accum * dp
    params = parameter_count(cfg, vocab_size)
    fits = {z: largest_micro_batch(cfg, params, dp, z, gpu_memory_gib, vocab_size) for z in (1, 3)}
    return Plan(
        world_size, p.tensor_parallel, p.pipeline_parallel, dp, t.micro_batch_size, accum, global_batch,
        t.steps, t.steps * global_batch * m.seq_len, params, memory_estimate(cfg, params, dp, accum, vocab_size),
        p.sequence_parallel, fits, gpu_memory_gib, t.activation_checkpointing, p.context_parallel,
    )  # fmt: skip


def largest_micro_batch(
    cfg: Config, params: int, dp: int, zero_stage: int, budget_gib: float, vocab_size: int = 0
) -> int:
    """The largest micro-batch whose estimated memory fits `budget_gib` per GPU under `zero_stage`
    (0 when even the weights and optimizer states do not fit)."""
    trial = replace(cfg, train=replace(cfg.train), parallel=replace(cfg.parallel, zero_stage=zero_stage))

    def fits(micro: int) -> bool:
        trial.train.micro_batch_size = micro
        return memory_estimate(trial, params, dp, vocab_size=vocab_size)["total"] <= budget_gib

    low, high = 0, 1
    while high <= 1 << 16 and fits(high):
        low, high = high, 2 * high
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def activation_bytes_per_sbh(m, mode: str, tp: int, sequence_parallel: bool, cp: int) -> float:
    """16-bit bytes one layer keeps for backward per (row × sample × hidden unit) of the whole input
    (activation_bytes_per_token): its TP-split part divided by TP and, with sequence parallelism, the
    replicated part too (the DiT block: 10 + 24/TP, 34·sbh at TP = 1).

    Context parallelism divides all of it by C, except the keys and values attention keeps for
    backward (2 · 2 · kv_heads · head_dim / hidden per sbh, split by TP): they are the gathered ones of
    all rows, so the DiT block keeps (30/C + 4)·sbh (TP = 1, no checkpointing). Checkpointing
    recomputes the gather instead of keeping it."""
    replicated, split = activation_bytes_per_token(m, mode)
    local = (replicated + split) / tp if sequence_parallel else replicated + split / tp
    keys_values = 4 * m.num_kv_heads * m.head_dim / m.hidden_size / tp
    gathered = keys_values * (1 - 1 / cp) if mode == "none" else 0.0
    return local / cp + gathered


def memory_estimate(cfg: Config, params: int, dp: int, grad_accum: int = 1, vocab_size: int = 0) -> dict[str, float]:
    """Bytes per GPU: fp32 weights, gradients and Adam moments (ZeRO shards them over DP × CP from
    stage 3, 2 and 1 on), the fp32 EMA, activations of one micro-batch of the doubled sequence (this
    rank's rows under context parallelism), and the output layer's fp32 logits with the
    cross-entropy's saved softmax (on the last pipeline stage; one chunk with model.loss_chunk_tokens)."""
    p, m = cfg.parallel, cfg.model
    model_parallel = p.tensor_parallel * p.pipeline_parallel
    local = params / model_parallel
    z, shards, cp = p.zero_stage, dp * p.context_parallel, p.context_parallel
    weights = 4 * local / (shards if z >= 3 else 1)
    grads = 4 * local / (shards if z >= 2 else 1)
    adam = 8 * local / (shards if z >= 1 else 1)
    ema = 4 * local / (shards if z >= 3 else 1) if cfg.train.ema_decay > 0 else 0.0  # partitioned like the weights
    sizes = m.resolved()
    objective = build_objective(cfg.diffusion, m.seq_len, mask_id=0)  # only its layout is read
    s = objective.positions.numel()  # rows of the transformer input: 2L for x_t ⊕ x
    b, h, layers = cfg.train.micro_batch_size * objective.copies, sizes.hidden_size, sizes.num_layers
    half_precision = cfg.train.precision != "fp32"
    t, mode = p.tensor_parallel, cfg.train.activation_checkpointing
    per_layer = s * b * h * activation_bytes_per_sbh(sizes, mode, t, p.sequence_parallel, cp) * (1 if half_precision else 2)
    # Full checkpointing also holds one layer's whole working set while it recomputes.
    working_set = activation_bytes_per_sbh(sizes, "none", t, p.sequence_parallel, cp)
    recompute = s * b * h * working_set if mode == "full" else 0.0
    # 1F1B keeps up to PP micro-batches in flight on the first stage, each over layers/PP layers.
    in_flight = min(p.pipeline_parallel, grad_accum) if p.pipeline_parallel > 1 else 1
    activations = per_layer * layers / p.pipeline_parallel * in_flight + recompute * (1 if half_precision else 2)
    scored = b * objective.num_outputs / cp
    if m.loss_chunk_tokens:
        scored = min(scored, m.loss_chunk_tokens)
    logits = scored * sizes.table_rows(vocab_size, t) / t * (4 + 4)  # fp32 logits, and the softmax the loss keeps
    # FlexAttention's BlockMask: int32 tile indices, partial and full, and their transposes for backward.
    tiles = -(-s // (128 * cp)) * -(-s // 128)
    block_mask = 4 * 4 * tiles * (b if cfg.data.packing == "document" else 1)
    return {
        "weights": weights / GIB,
        "grads": grads / GIB,
        "adam": adam / GIB,
        "ema": ema / GIB,
        "activations": activations / GIB,
        "logits": logits / GIB,
        "block_mask": block_mask / GIB,
        "total": (weights + grads + adam + ema + activations + logits + block_mask) / GIB,
    }


def describe_plan(cfg: Config, world_size: int) -> list[str]:
    """`sad3 train --dry-run`: the run in one line, then the plan's lines."""
    from sad3_megatron.data.tokenizers import load_tokenizer
    from sad3_megatron.engine.hf_import import apply_init_architecture

    cfg = apply_init_architecture(cfg)  # a run that starts from a checkpoint has its architecture
    plan = make_plan(cfg, world_size, load_tokenizer(cfg.data.tokenizer).vocab_size)
    fp8 = " + fp8 GEMMs" if cfg.train.fp8 else ""
    head = (
        f"sad3 train --dry-run: {cfg.run.name}, {cfg.model.preset} model, L={cfg.model.seq_len}, "
        f"L'={cfg.diffusion.block_size}, objective={cfg.diffusion.objective}, ZeRO-{cfg.parallel.zero_stage}, "
        f"precision {cfg.train.precision}{fp8}"
    )
    return [head, *("  " + line for line in plan.lines())]


def longest_context(cfg: Config, budget_gib: float, vocab_size: int, granule: int = 1024, limit: int = 1 << 22) -> int:
    """The longest L (a multiple of `granule`, at most `limit`) whose estimated memory at micro-batch 1
    fits `budget_gib` per GPU on TP × CP × PP GPUs (one data-parallel replica); 0 when none does."""
    one_block = cfg.diffusion.block_size == cfg.model.seq_len  # MDLM stays MDLM at every L

    def fits(seq_len: int) -> bool:
        diffusion = replace(cfg.diffusion, block_size=seq_len) if one_block else cfg.diffusion
        model = replace(cfg.model, seq_len=seq_len)
        trial = replace(cfg, model=model, diffusion=diffusion, train=replace(cfg.train, micro_batch_size=1))
        return memory_estimate(trial, parameter_count(trial, vocab_size), 1, vocab_size=vocab_size)["total"] <= budget_gib

    if fits(limit):
        return limit
    low, high = 0, granule
    while high < limit and fits(high):
        low, high = high, 2 * high
    high = min(high, limit)
    while high - low > granule:  # fits(low) (or low = 0) and not fits(high)
        mid = (low + high) // 2 // granule * granule
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
