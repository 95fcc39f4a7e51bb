"""Starting from a checkpoint: a transformers directory (Llama, Qwen2 / 2.5, Qwen3, Mistral) or a sad3
checkpoint, as `train.init_from=PATH` and `sad3 import HF_DIR OUT`.

- The architecture and the tokenizer come from the checkpoint (`apply_init_architecture`): every
  architecture field of the run's `model:` section is filled from it, and a field the run sets
  itself (explicitly, or through a preset other than the default `tiny`) must agree, else a
  one-line error names both values. The run's saved config.yaml then holds the whole architecture.
- The weights stream in (`load_init_weights`): each parameter of this rank, its tensor-parallel
  shard and pipeline stage only, is read by safetensors slices through hf/families.py's row pieces
  (q/k/v merged per key/value group, [gate; up], a grown embedding table) and copied in; under
  ZeRO-3 one parameter is gathered at a time and read by one rank of its group. No process ever
  holds more than one parameter beside its own shard of the model.
- `import_checkpoint` writes a transformers directory as a sad3 checkpoint (config.yaml,
  model.safetensors, manifest.json), tensor by tensor into a safetensors file written in order,
  in the checkpoint's own dtype by default, so `sad3 export --format transformers` gives the
  original tensors back bit for bit.

The mask token: the tokenizer's own if it has one, else the first id past the tokenizer
(data/tokenizers.py). Inside a padded table (Qwen: 151,669 tokens in 151,936 rows) that row already
exists, nothing is resized, and the AR baseline keeps predicting it exactly as the base does. Past a
full table (Llama 3: 128,256 tokens and rows) the embedding and output rows grow to the trainer's
padding, and the new rows start as the mean of the base's rows: a never-trained token whose
embedding sits in the middle of the others, so the first diffusion steps see an input of typical
scale (a random or zero row gives the mask token an embedding unlike any token's, which LLaDA 2.0
reports made early gradients explode).
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from sad3_megatron.config import Config, save_config, validate
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.model_config import ARCHITECTURE_FIELDS, CUSTOM, PRESETS, ModelConfig
from sad3_megatron.data.tokenizers import load_tokenizer
from sad3_megatron.engine.checkpoint import read_config, require_intact, resolve_checkpoint, write_manifest
from sad3_megatron.hf.families import (
    Piece,
    SafetensorsDir,
    check_source,
    read_architecture,
    read_config_json,
    read_rows,
    tensor_plan,
)

DEFAULT_PRESET = ModelConfig.preset  # yields to a checkpoint's architecture without a word
TORCH_TO_SAFETENSORS = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_hf_directory(path: str | Path) -> bool:
    """A transformers model directory that is not a sad3 export or checkpoint."""
    path = Path(path)
    config = path / "config.json"
    return config.is_file() and not (path / "config.yaml").is_file() and json.loads(config.read_text()).get("model_type") != "sad3"


def init_architecture(source: str | Path) -> tuple[dict, str] | None:
    """(architecture fields, tokenizer) of a checkpoint, or None where nothing exists (yet) at `source`."""
    path = Path(source)
    if is_hf_directory(path):
        return read_architecture(read_config_json(path)), str(path.resolve())
    if not path.exists():
        return None
    cfg = read_config(resolve_checkpoint(path))
    return cfg.model.architecture(), cfg.data.tokenizer


def _explicit(model: ModelConfig) -> dict:
    """Architecture fields the run decides itself: set explicitly, or by a preset it chose."""
    preset = PRESETS.get(model.preset, {}) if model.preset not in (DEFAULT_PRESET, CUSTOM) else {}
    values = {name: getattr(model, name) for name in ARCHITECTURE_FIELDS}
    return {k: v if v is not None else preset[k] for k, v in values.items() if v is not None or k in preset}


def _same_tokenizer(mine: str, theirs: str) -> bool:
    return mine == theirs or (Path(mine).is_dir() and Path(theirs).is_dir() and Path(mine).resolve() == Path(theirs).resolve())


def apply_init_architecture(cfg: Config, source: str | None = None) -> Config:
    """The run's config with the architecture and tokenizer of the checkpoint it starts from (`source`,
    default train.init_from); a disagreement is a one-line error naming both values."""
    source = source or cfg.train.init_from
    found = init_architecture(source) if source else None
    if found is None:
        return cfg
    arch, tokenizer = found
    for name, mine in _explicit(cfg.model).items():
        if mine != arch[name]:
            raise Sad3Error(
                f"model.{name}={mine!r} but the checkpoint {source!r} has {name}={arch[name]!r}: the architecture "
                "comes from the checkpoint, so drop the setting (or pick a model.preset that matches it)"
            )
    if not _same_tokenizer(cfg.data.tokenizer, tokenizer):
        raise Sad3Error(
            f"data.tokenizer={cfg.data.tokenizer!r} but the checkpoint {source!r} uses the tokenizer {tokenizer!r}: "
            f"set data.tokenizer={tokenizer}"
        )
    filled = replace(cfg, model=replace(cfg.model, preset=CUSTOM, **arch), data=replace(cfg.data, tokenizer=tokenizer))
    validate(filled, check_files=False)  # e.g. KV heads against this run's tensor parallelism
    return filled


# ---- streaming the weights into a model ----------------------------------------------------------


def _source(init_from: str, model: ModelConfig, table_rows: int) -> tuple[SafetensorsDir, dict[str, list[Piece]]]:
    """The tensors of a transformers directory or a sad3 checkpoint, and sad3's names as their pieces."""
    where = f"train.init_from={init_from!r}"
    if is_hf_directory(init_from):
        source = SafetensorsDir(init_from)
        check_source(source, model, model.vocab_rows, where)
        return source, tensor_plan(model, model.vocab_rows, table_rows)
    checkpoint = resolve_checkpoint(init_from)
    require_intact(checkpoint, ("config.yaml", "model.safetensors"))
    source = SafetensorsDir(checkpoint)
    return source, {name: [Piece(name, 0, shape[0])] for name, shape in source.shapes.items()}


def _local_ranges(p: torch.nn.Parameter, shape: tuple[int, ...]):
    """(row ranges, column range) of the whole tensor that this rank's shard of `p` holds."""
    from megatron.core import parallel_state

    from sad3_megatron.engine.consolidate import shard_range

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return None, None
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    ranges = shard_range(shape[dim] * tp, parallel_state.get_tensor_model_parallel_rank(), tp, stride)
    return (ranges, None) if dim == 0 else (None, ranges[0])


@torch.no_grad()
def _load_parameter(p: torch.nn.Parameter, source: SafetensorsDir, pieces: list[Piece], name: str, where: str,
                    zero3: bool) -> None:  # fmt: skip
    shape = tuple(getattr(p, "ds_shape", p.shape))
    rows, cols = _local_ranges(p, shape)

    def read() -> torch.Tensor:
        tensor = read_rows(source, pieces, rows, cols)
        if tuple(tensor.shape) != shape:
            raise Sad3Error(f"{where}: {name} gives this rank {list(tensor.shape)}, the model holds {list(shape)}")
        return tensor

    if not zero3:
        p.copy_(read())
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # one parameter at a time
        if dist.get_rank(group=p.ds_process_group) == 0:
            p.data.copy_(read())


def load_init_weights(module: torch.nn.Module, init_from: str, model: ModelConfig, table_rows: int, zero3: bool,
                      pipeline_layers: int | None) -> None:  # fmt: skip
    """Start from a checkpoint's weights (this rank's shard and stage only); the optimizer starts fresh."""
    from sad3_megatron.engine.pipeline import canonical_name

    where = f"train.init_from={init_from!r}"
    source, plan = _source(init_from, model, table_rows)
    params = list(module.named_parameters())
    names = [canonical_name(n, pipeline_layers) if pipeline_layers is not None else n for n, _ in params]
    missing = [n for n in names if n not in plan]
    unexpected = sorted(set(plan) - set(names)) if pipeline_layers is None else []
    if missing or unexpected:
        raise Sad3Error(f"{where} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for (_, p), name in zip(params, names, strict=True):
        _load_parameter(p, source, plan[name], name, where, zero3)


# ---- `sad3 import`: a transformers directory as a sad3 checkpoint ----------------------------------


@dataclass
class ImportResult:
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float
    peak_rss_gib: float


def write_safetensors(path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], produce) -> int:
    """A safetensors file written tensor by tensor: the header from the shapes and dtypes, then each
    tensor's bytes as `produce(name)` returns it, so only one tensor is in memory at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dtype) in shapes.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, (shape, dtype) in shapes.items():
            tensor = produce(name).to(dtype).contiguous()
            if tuple(tensor.shape) != shape:
                raise AssertionError(f"{name}: {list(tensor.shape)} != {list(shape)}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return 8 + len(text) + offset


def import_config(hf_dir: Path, overrides: list[str]) -> Config:
    """The imported checkpoint's config: the AR baseline (the base's own function), no dropout, L up to
    2048 within the base's context, the directory's tokenizer and architecture; then `overrides`."""
    from sad3_megatron.config import load_config

    raw = read_config_json(hf_dir)
    seq_len = min(2048, raw.get("max_position_embeddings") or 2048)
    defaults = ["diffusion.objective=ar", "model.dropout=0.0", f"model.seq_len={seq_len}", f"data.tokenizer={hf_dir}"]
    cfg = load_config(None, [*defaults, *overrides], check_files=False)
    return apply_init_architecture(cfg, str(hf_dir))


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, overrides: list[str] = (), dtype: str = "auto") -> ImportResult:
    """Write the transformers directory `hf_dir` as a sad3 checkpoint in `out_dir` (config.yaml,
    model.safetensors, manifest.json): what train.init_from, sad3 eval / sample / export read."""
    start, hf_dir, out_dir = time.perf_counter(), Path(hf_dir).resolve(), Path(out_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise Sad3Error(f"--dtype {dtype!r}: choose auto (the checkpoint's), {', '.join(DTYPES)}")
    cfg = import_config(hf_dir, list(overrides))
    m, tokenizer = cfg.model.resolved(), load_tokenizer(cfg.data.tokenizer)
    source = SafetensorsDir(hf_dir)
    check_source(source, m, m.vocab_rows, f"{str(hf_dir)!r}")
    plan = tensor_plan(m, m.vocab_rows, m.table_rows(tokenizer.vocab_size))
    shapes = {}
    for name, pieces in sorted(plan.items()):
        inner = source.shapes[pieces[0].source][1:]
        shapes[name] = ((sum(p.rows for p in pieces), *inner), DTYPES.get(dtype, source.dtypes[pieces[0].source]))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise Sad3Error(f"{str(out_dir)!r} exists and is not empty: pick a new directory")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    size = write_safetensors(tmp / "model.safetensors", shapes, lambda name: read_rows(source, plan[name]))
    save_config(cfg, tmp / "config.yaml")
    write_manifest(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return ImportResult(out_dir, len(shapes), size, time.perf_counter() - start, rss)
