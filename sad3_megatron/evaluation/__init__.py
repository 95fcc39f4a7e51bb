"""Likelihood bounds, and generative metrics of samples (gen. PPL, entropy, NFEs)."""

from sad3_megatron.evaluation.generative import (
    GenerativePerplexity,
    frame_documents,
    generative_perplexity,
    load_evaluator,
    load_samples,
    sequence_nll,
    split_documents,
    summarize_samples,
)
from sad3_megatron.evaluation.likelihood import BoundEstimate, estimate_bound

__all__ = [
    "BoundEstimate",
    "GenerativePerplexity",
    "estimate_bound",
    "frame_documents",
    "generative_perplexity",
    "load_evaluator",
    "load_samples",
    "sequence_nll",
    "split_documents",
    "summarize_samples",
]
