"""One exception type for mistakes a user can fix; the CLI prints it as one line.

Defined in the standalone package (`hf/errors.py`) so that the exported HuggingFace model raises the
same kind of error without importing sad3_megatron."""

from sad3_megatron.hf.errors import Sad3Error

__all__ = ["Sad3Error"]
