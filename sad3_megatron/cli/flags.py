"""argparse from the library's typed settings: a dataclass's fields become a command's flags.

A field's metadata gives its help text, and `flag` / `invert` where the flag is not the field's
name in dashes (`kv_cache: bool = True` is `--no-kv-cache`). Values are checked by the settings'
own `check()`, so a flag and the Python API refuse the same inputs with the same words.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from sad3_megatron.core.errors import Sad3Error

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise Sad3Error(f"{self.prog}: {message} (see {self.prog} --help)")


def _scalar_type(annotation) -> type:
    """int / float / str of `X`, `X | None` or a Literal of strings."""
    if typing.get_origin(annotation) is typing.Literal:
        return str
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        return _scalar_type(args[0])
    return annotation


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass `cls` (except `skip`)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        text = meta.get("help", "")
        if meta.get("invert"):
            parser.add_argument(flag, dest=f.name, action="store_false", help=text)
        elif hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=text)
        else:
            default = None if f.default is MISSING else f.default
            shown = f" (default {default})" if default not in (None, "") else ""
            parser.add_argument(flag, dest=f.name, type=_scalar_type(hints[f.name]), default=default, help=text + shown)


def settings(args: argparse.Namespace, cls: type[T], **given: Any) -> T:
    """The dataclass `cls` from the parsed flags (fields not on the command line keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})
