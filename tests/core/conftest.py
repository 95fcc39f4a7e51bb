"""tests/core: the pure-torch core, without megatron, DeepSpeed or torch.distributed.

`make test` runs this folder on its own with SAD3_CORE_ONLY=1, which makes importing megatron,
DeepSpeed or any sad3_megatron package above core an ImportError: a core test that needed them
would fail there (tests/core/test_imports.py checks the same statically)."""

import importlib.abc
import os
import sys

ABOVE_CORE = ("megatron", "deepspeed", "sad3_megatron.model", "sad3_megatron.engine", "sad3_megatron.data",
              "sad3_megatron.evaluation", "sad3_megatron.cli", "sad3_megatron.config")  # fmt: skip


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == blocked or name.startswith(blocked + ".") for blocked in ABOVE_CORE):
            raise ImportError(f"tests/core must not import {name}")
        return None


if os.environ.get("SAD3_CORE_ONLY"):
    sys.meta_path.insert(0, _Blocker())
