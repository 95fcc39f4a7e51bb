"""Likelihood bounds and, with the sampling issue, generative metrics."""

from sad3_megatron.evaluation.likelihood import BoundEstimate, estimate_bound

__all__ = ["BoundEstimate", "estimate_bound"]
