"""Assemble tokenizer, model and objective from a config or a checkpoint: one place, used by
training, evaluation and sampling alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sad3_megatron.attention import resolve_backend
from sad3_megatron.config import Config, ParallelConfig
from sad3_megatron.data import Tokenizer, load_tokenizer
from sad3_megatron.diffusion import build_objective, make_schedule
from sad3_megatron.engine.checkpoint import read_checkpoint
from sad3_megatron.engine.distributed import init_distributed, resolve_device
from sad3_megatron.errors import Sad3Error
from sad3_megatron.model import SAD3Transformer, TransformerSpec, build_model, make_spec


@dataclass
class Components:
    cfg: Config
    device: torch.device
    tokenizer: Tokenizer
    spec: TransformerSpec
    model: SAD3Transformer | None  # None when a pipeline builds its own stages
    objective: object  # BlockDiffusionObjective | AutoregressiveObjective


def build_components(
    cfg: Config, device: torch.device | None = None, backend: str | None = None, with_model: bool = True
) -> Components:
    device = device or resolve_device(cfg.train.device)
    init_distributed(device, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    spec = make_spec(
        cfg.model,
        tokenizer.vocab_size,
        tokenizer.mask_id,
        resolve_backend(backend or cfg.model.attention_backend, device),
    )
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every run and every parallel layout
    model = build_model(spec, device, cfg.parallel.sequence_parallel) if with_model else None
    d = cfg.diffusion
    objective = build_objective(
        d.objective,
        cfg.model.seq_len,
        d.block_size,
        make_schedule(d.schedule, d.beta, d.omega),
        tokenizer.mask_id,
        d.antithetic,
    )
    return Components(cfg, device, tokenizer, spec, model, objective)


def load_components(
    checkpoint: str | Path, device: torch.device | None = None, use_ema: bool = True, backend: str | None = None
) -> tuple[Components, Path]:
    """Rebuild the model of a checkpoint for evaluation or sampling (single process)."""
    cfg, weights, path = read_checkpoint(checkpoint, use_ema)
    cfg.parallel = ParallelConfig()  # inference runs one process on consolidated weights
    parts = build_components(cfg, device or resolve_device("auto"), backend or "auto")
    missing, unexpected = parts.model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise Sad3Error(
            f"checkpoint {str(path)!r} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    parts.model.eval()
    return parts, path
