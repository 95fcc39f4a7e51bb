"""Sampling from SAD3-LMs (Alg. 2) and the AR baseline: KV cache, context window, within-block
samplers, stopping rules.

The modules live in the standalone package `sad3_megatron.hf`, so an exported HuggingFace model samples with
the very same loop."""

from sad3_megatron.hf.context import CachedContext, RecomputeContext, noisy_block_window
from sad3_megatron.hf.distributions import draw_categorical, shape_probs
from sad3_megatron.hf.generate import GenerationResult, Sample, SamplingConfig, generate, redraw_seed, token_budget
from sad3_megatron.hf.kv_cache import KVCache
from sad3_megatron.hf.samplers import SAMPLERS, denoise_block, make_sampler
from sad3_megatron.hf.stopping import STOP_REASONS, STOP_RULES, StopCriteria, unigram_entropy
from sad3_megatron.hf.window import SLIDING, ContextWindow, context_window

__all__ = [
    "SAMPLERS",
    "SLIDING",
    "STOP_REASONS",
    "STOP_RULES",
    "CachedContext",
    "ContextWindow",
    "GenerationResult",
    "KVCache",
    "RecomputeContext",
    "Sample",
    "SamplingConfig",
    "StopCriteria",
    "context_window",
    "denoise_block",
    "draw_categorical",
    "generate",
    "make_sampler",
    "noisy_block_window",
    "redraw_seed",
    "shape_probs",
    "token_budget",
    "unigram_entropy",
]
