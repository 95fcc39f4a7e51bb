"""Pipeline parallelism with DeepSpeed's PipelineEngine, from the model's own building blocks.

The stages are the classes of `model/transformer.py` (Embedding, TransformerLayer, OutputHead),
built with the same per-component seeds, so a pipelined model starts from exactly the weights of
the single-process one. Everything data-dependent (x_t ⊕ x, labels, loss weights) is made before
the pipeline by the objective's `training_pass`; the stages only need the objective's static
layout (rotary positions, the block-diffusion mask, how many rows the last layer keeps), plus, for
rows packed by document, the document labels, which travel with the hidden states.

Tied embeddings (`model.tie_embeddings`) put the embedding on the first and the last stage as
DeepSpeed's `TiedLayerSpec`: the last stage's copy computes the logits, and the engine sums the
tied weight's gradients over the two stages after backward (its ReduceTiedGrads step), which is the
gradient of the one shared matrix.

Why DeepSpeed's engine and not megatron-core's schedules: megatron-core 0.16's pipeline schedules
and p2p communication allocate on CUDA and fail on CPU, while DeepSpeed's PipelineEngine runs over
gloo as well as NCCL, so the same pipeline is tested on CPU and run on GPUs. Its limit is that it
accepts ZeRO stage 1 at most (validated in the config).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

from sad3_megatron.core.likelihood import BoundEstimate, rows_and_documents
from sad3_megatron.core.masks import AttentionMask, DocumentMask
from sad3_megatron.core.network import make_norm, rotary_embedding
from sad3_megatron.core.objectives import TrainingPass
from sad3_megatron.core.schedules import evaluation_schedule
from sad3_megatron.model.transformer import (
    Embedding,
    OutputHead,
    TransformerLayer,
    TransformerSpec,
    init_seed,
    output_blocked_ids,
    output_layer,
    parallel_head,
    shard_nll,
)

TIED = "embedding"  # the TiedLayerSpec key of a tied embedding


def pipeline_batch(objective, batch: TrainingPass, document_ids: torch.Tensor | None) -> tuple:
    """One micro-batch as the pipeline takes it: the stage inputs, then the loss targets. Rows packed
    by document also send their window's document labels through the stages, for the mask."""
    inputs = batch.tokens if document_ids is None else (batch.tokens, objective.document_window(document_ids))
    return inputs, (batch.labels, batch.weights)


class EmbeddingStage(Embedding):
    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig, base_seed: int):
        init_seed(base_seed, 0)
        super().__init__(spec, mp)

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (tokens, document labels): the labels ride along
            return super().forward(inputs[0]), inputs[1]
        return super().forward(inputs)


class LayerStage(TransformerLayer):
    """Transformer layer `index` with the objective's positions and mask built in."""

    def __init__(
        self, spec: TransformerSpec, mp: ModelParallelConfig, base_seed: int, index: int,
        positions: torch.Tensor, mask: AttentionMask, keep: int | None,
    ):  # fmt: skip
        init_seed(base_seed, 1 + index)
        super().__init__(spec, mp)
        self.rotary = rotary_embedding(spec.model)
        self.register_buffer("positions", positions.clone(), persistent=False)
        self.mask, self.keep = mask, keep

    def forward(self, inputs):
        h, windows = inputs if isinstance(inputs, tuple) else (inputs, None)
        mask = self.mask if windows is None else DocumentMask(self.mask, windows)
        rows = self.keep or self.mask.q_len  # the whole sequence: h may be a sequence-parallel slice
        out, _ = super().forward(h, self.rotary(self.positions), mask.first_rows(rows), None, rows)
        return out if windows is None else (out, windows)


class HeadStage(OutputHead):
    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig, base_seed: int):
        init_seed(base_seed, 1 + spec.model.num_layers)
        super().__init__(spec, mp)

    def forward(self, inputs):
        return super().forward(inputs[0] if isinstance(inputs, tuple) else inputs)


class FinalNormStage(torch.nn.Module):
    """The output head's norm, on the last stage of a tied model (named `head.norm` in checkpoints)."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.norm = make_norm(spec.model.norm, spec.model.hidden_size, spec.model.norm_eps)

    def forward(self, inputs):
        return self.norm(inputs[0] if isinstance(inputs, tuple) else inputs)


class TiedLogits:
    """The tied output layer: the last stage's copy of the embedding's rows as a column-parallel linear
    (no weight of its own), with the SUBS-blocked columns at -inf, as `OutputHead` computes them."""

    def __init__(self, spec: TransformerSpec, mp: ModelParallelConfig):
        self.output = output_layer(spec, mp)
        self.blocked = output_blocked_ids(spec)

    def __call__(self, embedding: Embedding, h: torch.Tensor) -> torch.Tensor:
        logits = parallel_head(self.output, h, embedding.embed.weight).float()
        logits[..., self.blocked.to(logits.device)] = float("-inf")
        return logits


def pipeline_loss(logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Eq. 8 per token on the last stage: weights × vocab-parallel cross-entropy, averaged."""
    labels, weights = targets
    return (weights * shard_nll(logits, labels)).mean()


def build_pipeline(spec: TransformerSpec, mp: ModelParallelConfig, objective, base_seed: int) -> PipelineModule:
    """The model as a PipelineModule over megatron-core's process groups (same rank layout)."""
    n, tied = spec.model.num_layers, spec.model.tie_embeddings
    first = (TiedLayerSpec(TIED, EmbeddingStage, spec, mp, base_seed, tied_weight_attr="embed.weight") if tied
             else LayerSpec(EmbeddingStage, spec, mp, base_seed))  # fmt: skip
    layers = [first]
    for i in range(n):
        keep = objective.num_outputs if i == n - 1 else None
        layers.append(LayerSpec(LayerStage, spec, mp, base_seed, i, objective.positions, objective.mask, keep))
    if tied:
        layers.append(LayerSpec(FinalNormStage, spec))
        layers.append(TiedLayerSpec(TIED, EmbeddingStage, spec, mp, base_seed, forward_fn=TiedLogits(spec, mp),
                                    tied_weight_attr="embed.weight"))  # fmt: skip
    else:
        layers.append(LayerSpec(HeadStage, spec, mp, base_seed))
    topology = PipeModelDataParallelTopology(
        num_pp=parallel_state.get_pipeline_model_parallel_world_size(),
        num_mp=parallel_state.get_tensor_model_parallel_world_size(),
        num_dp=parallel_state.get_data_parallel_world_size(),
    )
    # Balance transformer layers across stages; the embedding joins the first, the head the last.
    return PipelineModule(layers=layers, loss_fn=pipeline_loss, topology=topology, partition_method="type:LayerStage")


def canonical_name(name: str, num_layers: int) -> str:
    """PipelineModule's "{index}.rest" (or "tied_modules.embedding.rest") → the SAD3Transformer name the
    checkpoints use."""
    if name.startswith(f"tied_modules.{TIED}."):
        return f"embedding.{name.removeprefix(f'tied_modules.{TIED}.')}"
    index, rest = name.split(".", 1)
    index = int(index)
    if index == 0:
        return f"embedding.{rest}"
    if index <= num_layers:
        return f"layers.{index - 1}.{rest}"
    return f"head.{rest}"


def to_canonical(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """This stage's tensors renamed, then merged over the pipeline group (collective)."""
    local = {canonical_name(k, num_layers): v for k, v in tensors.items()}
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return local
    pieces: list[dict] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(pieces, local, group=parallel_state.get_pipeline_model_parallel_group())
    return {k: v for piece in pieces for k, v in piece.items()}


def to_local(tensors: dict[str, torch.Tensor], module: torch.nn.Module, num_layers: int) -> dict[str, torch.Tensor]:
    """Canonical tensors → this stage's names, keeping only the stage's own."""
    names = {canonical_name(k, num_layers): k for k, _ in module.named_parameters()}
    return {names[k]: v for k, v in tensors.items() if k in names}


@torch.no_grad()
def pipeline_bound(
    engine, objective, sequences, device: torch.device, batch_size: int, draws: int = 1, seed: int = 0,
    autocast_dtype: torch.dtype | None = None, max_sequences: int | None = None,
) -> BoundEstimate:  # fmt: skip
    """The held-out bound of `evaluation.estimate_bound`, run through the pipeline stages (one draw
    of t ~ U[0, 1] per block; whole micro-batches only, as the pipeline's buffers are fixed-size).
    The stages hold the training objective's layout, which its bound shares: objective.bound() changes
    the weights only (config validation refuses the one exception, an AR term at L' = L)."""
    objective = objective.bound()
    exact = objective.autoregressive
    schedule = None if exact else evaluation_schedule()
    generator = torch.Generator().manual_seed(seed * 1_000_003)
    losses = []
    available = len(sequences) if not max_sequences else min(max_sequences, len(sequences))
    usable = available // batch_size * batch_size
    for start in range(0, usable, batch_size):
        x, document_ids, scored = rows_and_documents(sequences, start, start + batch_size, device)
        batch = pipeline_batch(objective, objective.training_pass(x, generator, schedule, scored), document_ids)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = engine.eval_batch(iter([batch]), num_micro_batches=1)
        losses.append(float(loss))
    mean = sum(losses) / len(losses)
    tokens = usable * objective.scored_per_row
    block = None if exact else objective.block_size
    return BoundEstimate(mean, 0.0, math.exp(mean) if mean < 700 else math.inf, 0.0, 1, tokens, usable, block, exact)
