"""Help text for the fields of settings dataclasses (SamplingConfig and the evaluation settings).

`sad3_megatron/cli/flags.py` turns such a dataclass into a command's flags: the help text is read
from here, and `flag` / `invert` name a flag that is not the field's name in dashes."""

from __future__ import annotations


def described(help: str, *, flag: str | None = None, invert: bool = False) -> dict:
    """Field metadata: `help`, and optionally the flag's name and whether it stores the negation."""
    meta: dict = {"help": help}
    if flag is not None:
        meta.update(flag=flag, invert=invert)
    return meta
