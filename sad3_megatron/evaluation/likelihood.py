"""Likelihood bounds with standard errors: `estimate_bound` lives in the standalone package
(`hf/likelihood.py`), so the exported model scores text with the same code as `sad3 eval`."""

from sad3_megatron.hf.likelihood import BoundEstimate, estimate_bound, rows_and_documents

__all__ = ["BoundEstimate", "estimate_bound", "rows_and_documents"]
