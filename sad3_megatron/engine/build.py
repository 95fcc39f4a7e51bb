"""Assemble tokenizer, model and objective from a config or a checkpoint: one place, used by
training, evaluation and sampling alike."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sad3_megatron.config import Config, ParallelConfig, config_from_dict
from sad3_megatron.core.attention import resolve_backend
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.network import Network, set_attention_backend
from sad3_megatron.core.objectives import Objective
from sad3_megatron.core.registry import build_objective, objective_entry
from sad3_megatron.data.tokenizers import BUNDLED, Tokenizer, load_tokenizer
from sad3_megatron.engine.checkpoint import read_checkpoint
from sad3_megatron.engine.distributed import init_distributed, resolve_device
from sad3_megatron.model.build import build_model
from sad3_megatron.model.transformer import SAD3Transformer, TransformerSpec, make_spec


@dataclass
class Components:
    cfg: Config
    device: torch.device
    tokenizer: Tokenizer
    spec: TransformerSpec | None  # None for an exported model
    # Anything with Eq. 6's interface model(tokens, positions, mask, *, past_kv, num_outputs, labels,
    # return_kv): the megatron-core model, or an export's network. None when a pipeline builds its stages.
    model: SAD3Transformer | Network | None
    objective: Objective  # built by core/registry.py from the config's `diffusion:` section


def build_components(
    cfg: Config, device: torch.device | None = None, backend: str | None = None, with_model: bool = True
) -> Components:
    device = device or resolve_device(cfg.train.device)
    p = cfg.parallel
    init_distributed(device, p.tensor_parallel, p.pipeline_parallel, p.context_parallel)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    backend = resolve_backend(backend or cfg.model.attention_backend, device)
    autoregressive = objective_entry(cfg.diffusion.objective).autoregressive
    spec = make_spec(cfg.model, tokenizer.vocab_size, tokenizer.mask_id, backend, autoregressive)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every run and every parallel layout
    model = build_model(spec, device, cfg.parallel.sequence_parallel) if with_model else None
    objective = build_objective(cfg.diffusion, cfg.model.seq_len, tokenizer.mask_id)
    return Components(cfg, device, tokenizer, spec, model, objective)


def is_export(path: str | Path) -> bool:
    """Whether `path` is a directory written by `sad3 export` (a transformers model directory)."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "sad3"


def load_export(
    path: str | Path, device: torch.device | None = None, use_ema: bool = True, backend: str | None = None
) -> Components:
    """An exported directory as Components: its network (Eq. 6's interface), tokenizer and training config."""
    from transformers.utils import logging as hf_logging

    from sad3_megatron.hf.configuration_sad3 import Sad3Config
    from sad3_megatron.hf.modeling_sad3 import Sad3ForCausalLM, Sad3ForMaskedLM

    hf_logging.disable_progress_bar()  # a local load is quick; keep the CLI output to its result
    device = device or resolve_device("auto")
    hf_config = Sad3Config.from_pretrained(str(path))
    if not use_ema and hf_config.weights == "ema":
        raise Sad3Error(f"export {str(path)!r} holds the EMA weights: export the checkpoint with --no-ema for the raw ones")
    if not hf_config.training_config:
        raise Sad3Error(f"export {str(path)!r} has no training_config in config.json: export the checkpoint again")
    cfg = config_from_dict(hf_config.training_config)
    cfg.parallel = ParallelConfig()
    cls = Sad3ForCausalLM if objective_entry(cfg.diffusion.objective).autoregressive else Sad3ForMaskedLM
    model = cls.from_pretrained(str(path), config=hf_config, dtype=torch.float32).model.to(device).eval()
    set_attention_backend(model, resolve_backend(backend or "auto", device))
    tokenizer = load_tokenizer(cfg.data.tokenizer if cfg.data.tokenizer in BUNDLED else str(path))
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id)
    if ids != (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.mask_token_id):
        raise Sad3Error(f"export {str(path)!r}: its tokenizer's BOS/EOS/mask ids {ids} differ from config.json's")
    objective = build_objective(cfg.diffusion, cfg.model.seq_len, tokenizer.mask_id)
    return Components(cfg, device, tokenizer, None, model, objective)


def load_components(
    checkpoint: str | Path, device: torch.device | None = None, use_ema: bool = True, backend: str | None = None
) -> tuple[Components, Path]:
    """Rebuild the model of a checkpoint, or load an exported directory, for evaluation or sampling
    (single process)."""
    if is_export(checkpoint):
        return load_export(checkpoint, device, use_ema, backend), Path(checkpoint)
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
