"""Likelihood bounds, and generative metrics of samples (gen. PPL, entropy, NFEs)."""

from sad3_megatron.evaluation.generative import (
    GenerativePerplexity,
    generative_perplexity,
    load_evaluator,
    load_samples,
    sequence_nll,
    summarize_samples,
)
from sad3_megatron.evaluation.likelihood import BoundEstimate, estimate_bound

__all__ = [
    "BoundEstimate",
    "GenerativePerplexity",
    "estimate_bound",
    "generative_perplexity",
    "load_evaluator",
    "load_samples",
    "sequence_nll",
    "summarize_samples",
]
