"""`sad3 export CHECKPOINT OUT_DIR [--format sad3|transformers|sdar]`: a checkpoint as a transformers
model directory, in one of three layouts.

`sad3` (the default): sad3's own classes as remote code, for every objective and architecture. The checkpoint's consolidated TP = 1 weights (written by every layout the trainer runs: TP/SP, PP,
ZeRO-1/2/3) are renamed with the `model.` prefix of the HF classes and trimmed to the vocabulary (the
trainer pads it to a multiple of 128); nothing else changes, since the exported network is the
trainer's own (`core/network.py`). OUT_DIR gets:

- config.json (the training config, transformers' standard names derived from it, auto_map),
  generation_config.json (the sampling defaults of `sad3 sample`: `SamplingConfig`'s, and the
  objective's sampler from core/registry.py);
- model.safetensors, or shards with model.safetensors.index.json above `--max-shard-size`;
- the tokenizer, with its mask token (GPT-2 has none: it is added at id len(tokenizer), sad3's);
- the code: `SHIPPED_CORE_FILES` of sad3_megatron/core/ verbatim and the two files of sad3_megatron/hf/
  with their `..core.` imports made flat (the remote-code loader wants one directory); torch +
  transformers is all they need. Training-only files (variance, D3PM) stay home;
- README.md, a model card: training config, data, steps and tokens, the run's held-out bound.

`transformers`: an AR-baseline run whose architecture is a standard family's (`hf/families.py`:
Llama, Qwen2, Qwen3, Mistral; an imported base is written as its own family) as that family's own
model: its config.json (transformers 5's `rope_parameters` and the legacy `rope_theta` /
`rope_scaling` that 4.x readers take), its tensor names, the tokenizer, no code, so anything that
loads the base (vLLM, lm-eval, TGI) loads it. The checkpoint's dtype is kept by default, so an
import exported back gives the original tensors bit for bit.

`sdar`: a block-diffusion run of Qwen3's shape (sad3 has no token shift) in the layout of the SDAR
checkpoints that SGLang, lmdeploy and JetEngine serve (JetAstra/SDAR's SDAR-4B-Chat): its config.json
keys (model_type "sdar", architectures SDARForCausalLM, `block_size`, `mask_token_id`, top-level
`rope_theta`, `rope_scaling` null, ...), Qwen3's tensor names, and sad3's classes in `auto_map`
(`SdarConfig`, `SdarForCausalLM`) so that transformers loads it with trust_remote_code too.

The directory is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from sad3_megatron.config import Config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.generate import SamplingConfig
from sad3_megatron.core.registry import objective_entry
from sad3_megatron.data.tokenizers import Tokenizer, load_tokenizer
from sad3_megatron.engine.checkpoint import read_checkpoint
from sad3_megatron.hf.configuration_sad3 import Sad3Config, standard_fields
from sad3_megatron.hf.families import (
    CLASS_NAMES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    check_tensors,
    expressible,
    family_fields,
    family_for,
    hf_pieces,
    tensor_plan,
)
from sad3_megatron.hf.modeling_sad3 import expected_shapes

PACKAGE = Path(__file__).resolve().parent.parent
# What the exported model imports, directly or not (tests/core checks the list against the imports).
SHIPPED_CORE_FILES = (
    "attention.py", "block_context.py", "context_window.py", "diffusion_config.py", "distributions.py",
    "errors.py", "field_help.py", "generate.py", "kv_cache.py", "likelihood.py", "masks.py", "model_config.py", "network.py",
    "noising.py", "objectives.py", "registry.py", "rotary.py", "samplers.py", "schedules.py", "sedd.py",
    "stopping.py",
)  # fmt: skip
SHIPPED_HF_FILES = ("configuration_sad3.py", "families.py", "modeling_sad3.py")
FORMATS = ("sad3", "transformers", "sdar")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOAD_TIME_KEYS = ("is_local", "local_files_only")  # what from_pretrained recorded of its own call
VOCAB_ROWS = ("model.embedding.embed.weight", "model.head.output.weight")  # trimmed to the vocabulary


@dataclass
class ExportResult:
    out_dir: Path
    checkpoint: Path
    files: list[str]
    bytes: int
    seconds: float


def hf_config(cfg: Config, tokenizer: Tokenizer, weights: str) -> Sad3Config:
    """config.json: the training config (the source of truth) and the standard names derived from it."""
    entry = objective_entry(cfg.diffusion.objective)
    head, auto = ("Sad3ForCausalLM", "AutoModelForCausalLM") if entry.autoregressive else ("Sad3ForMaskedLM", "AutoModelForMaskedLM")
    pad = tokenizer.hf.pad_token_id if tokenizer.hf.pad_token_id is not None else tokenizer.eos_id
    return Sad3Config(
        **standard_fields(cfg.model, cfg.diffusion), vocab_size=cfg.model.vocabulary(tokenizer.vocab_size),
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=pad, mask_token_id=tokenizer.mask_id,
        weights=weights, training_config=cfg.to_dict(), architectures=[head],
        auto_map={"AutoConfig": "configuration_sad3.Sad3Config", auto: f"modeling_sad3.{head}"},
    )  # fmt: skip


def hf_tensors(weights: dict[str, torch.Tensor], vocab_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint names → HF names (`model.` prefix), vocabulary rows trimmed, cast to `dtype`."""
    out = {}
    for name, tensor in weights.items():
        key = f"model.{name}"
        tensor = tensor[:vocab_size] if key in VOCAB_ROWS else tensor
        out[key] = tensor.to(dtype).contiguous()
    return out


def generation_defaults(config: Sad3Config) -> dict:
    """generation_config.json: transformers' sampling fields (the AR baseline's `generate()`, which
    stops at the training context L: past it, use `generate_blocks`, which slides its window as
    `sad3 sample` does) and `sad3_sampling`, the defaults of `generate_blocks`: SamplingConfig's, with
    the model's L' and its objective's sampler (core/registry.py)."""
    sampling = SamplingConfig(block_size=config.block_size, sampler=objective_entry(config.objective).default_sampler)
    return {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_length": config.max_position_embeddings,
        "sad3_sampling": asdict(sampling),
    }  # fmt: skip


def export_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Save the tokenizer so that AutoTokenizer loads it with sad3's mask token at sad3's id."""
    hf = type(tokenizer.hf).from_pretrained(tokenizer.hf.name_or_path, local_files_only=True)  # a copy to edit
    if hf.mask_token_id is None:
        hf.add_special_tokens({"mask_token": "<|mask|>"})
    for role, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        if getattr(hf, f"{role}_id") is None:  # BERT: name sad3's document frame ([CLS] ... [SEP])
            hf.add_special_tokens({role: hf.convert_ids_to_tokens(token_id)})
    if hf.mask_token_id != tokenizer.mask_id:
        raise Sad3Error(f"tokenizer {tokenizer.name!r} puts its mask token at {hf.mask_token_id}, sad3 at {tokenizer.mask_id}")
    hf.save_pretrained(str(out_dir))
    _strip_load_time_keys(out_dir)


def save_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: str | int) -> list[str]:
    """One model.safetensors, or shards and an index when the weights exceed `max_shard_size`."""
    from huggingface_hub import split_torch_state_dict_into_shards

    try:
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
    except ValueError as err:
        raise Sad3Error(f"--max-shard-size {max_shard_size!r}: {err} (e.g. 2GB or 500MB)") from None
    for filename, names in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in names}, str(out_dir / filename), metadata={"format": "pt"})
    if not split.is_sharded:
        return [WEIGHTS_NAME]
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": split.tensor_to_filename}  # fmt: skip
    (out_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*split.filename_to_tensors, WEIGHTS_INDEX_NAME]


def flat_imports(source: str) -> str:
    """An hf/ file as the export ships it: `from ..core.X import` becomes `from .X import`."""
    return source.replace("from ..core.", "from .")


def copy_code(out_dir: Path) -> list[str]:
    """The model's code (what `trust_remote_code=True` imports) into one flat directory."""
    for name in SHIPPED_CORE_FILES:
        shutil.copyfile(PACKAGE / "core" / name, out_dir / name)
    for name in SHIPPED_HF_FILES:
        (out_dir / name).write_text(flat_imports((PACKAGE / "hf" / name).read_text()))
    return [*SHIPPED_CORE_FILES, *SHIPPED_HF_FILES]


def _run_records(run_dir: Path) -> tuple[dict | None, dict | None, dict | None]:
    """(last record with a token count, last held-out record, data_stats.json) of a run directory."""
    last = val = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            last = record if "tokens" in record else last
            val = record if "val_nelbo" in record else val
    stats = run_dir / "data_stats.json"
    return last, val, json.loads(stats.read_text()) if stats.is_file() else None


def model_card(cfg: Config, config: Sad3Config, checkpoint: Path, dtype: str) -> str:
    """README.md: what the model is, how it was trained, on what, and its held-out bound."""
    last, val, stats = _run_records(checkpoint.parent.parent)
    autoregressive = objective_entry(config.objective).autoregressive
    step = int(checkpoint.name.removeprefix("step_")) if checkpoint.name.startswith("step_") else None
    tokens = f"{last['tokens']:,} tokens" if last else "tokens not recorded"
    if val is None:
        bound = "none recorded (the run logged no held-out evaluation)"
    else:
        what = "NLL" if autoregressive else "NELBO (linear schedule, t ~ U[0, 1])"
        ppl = f", PPL {'=' if autoregressive else '<='} {val['val_ppl']:.2f}" if "val_ppl" in val else ""
        bound = f"held-out {what} {val['val_nelbo']:.4f} nats/token{ppl} at step {val['step']}"
    kind = "the AR baseline (next-token)" if autoregressive else (
        f"a SAD3-LM (block diffusion, L' = {config.block_size}, L = {config.max_position_embeddings})")
    auto = "AutoModelForCausalLM" if autoregressive else "AutoModelForMaskedLM"
    data = json.dumps(stats, indent=1) if stats is not None else "not recorded (no data_stats.json in the run directory)"
    return f"""---
library_name: transformers
tags: [sad3, block-diffusion, discrete-diffusion]
---

# {cfg.run.name}

{kind}, exported by `sad3 export` from `{checkpoint.name}` ({config.weights} weights, {dtype}).

- {config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads, vocabulary {config.vocab_size} (tokenizer `{cfg.data.tokenizer}`, mask id {config.mask_token_id})
- training: {step if step is not None else 'unknown'} steps, {tokens}; noise schedule `{config.noise_schedule}` (clip range [{config.noise_beta}, {config.noise_omega}])
- held-out bound: {bound}

```python
import torch
from transformers import AutoTokenizer, {auto}

tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=False)  # a standard tokenizer: no custom code
model = {auto}.from_pretrained(DIR, trust_remote_code=True)
ids = [model.config.bos_token_id] + tok("it is a truth universally acknowledged", add_special_tokens=False).input_ids
result = model.generate_blocks(ids, num_tokens=128, steps=16, batch_size=2, seed=0)  # Alg. 2, KV cache
print([tok.decode(s.tokens, skip_special_tokens=True) for s in result.samples])
n = len(ids) // {config.block_size} * {config.block_size}  # score a multiple of L' tokens, at most L
print(model.nelbo(torch.tensor([ids[:n]]), draws=8))  # per-token bound of the NLL (nats)
```

## Data

```json
{data}
```

## Training config

```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}```
"""


def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()):
        config = out_dir / "config.json"
        exports = ("sad3", "sdar", *CLASS_NAMES)
        if not (config.is_file() and json.loads(config.read_text()).get("model_type") in exports):
            raise Sad3Error(f"{str(out_dir)!r} exists and is not a sad3 export: pick a new or empty directory")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _dtype(name: str | None, weights: dict[str, torch.Tensor], default: str) -> tuple[torch.dtype, str]:
    """(dtype, its name) of the exported tensors: fp32 / bf16, or auto, the checkpoint's own."""
    name = name or default
    if name == "auto":
        dtype = next(iter(weights.values())).dtype
        return dtype, {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))
    if name not in DTYPES:
        raise Sad3Error(f"--dtype {name!r}: choose auto (the checkpoint's), {', '.join(DTYPES)}")
    return DTYPES[name], name


def write_sad3(tmp: Path, cfg: Config, weights: dict, ckpt: Path, ema: bool, dtype: str | None, max_shard_size) -> str:
    """The `sad3` layout: sad3's classes and core files, the training config as the source of truth."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    config = hf_config(cfg, tokenizer, "ema" if ema else "raw")
    torch_dtype, name = _dtype(dtype, weights, "fp32")
    tensors = hf_tensors(weights, config.vocab_size, torch_dtype)
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, expected_shapes(config), f"checkpoint {str(ckpt)!r}")
    save_weights(tensors, tmp, max_shard_size)
    config.save_pretrained(str(tmp))
    (tmp / "generation_config.json").write_text(json.dumps(generation_defaults(config), indent=2) + "\n")
    export_tokenizer(tokenizer, tmp)
    copy_code(tmp)
    (tmp / "README.md").write_text(model_card(cfg, config, ckpt, name))
    return name


def family_tensors(weights: dict[str, torch.Tensor], pieces: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A family's tensors from sad3's (the inverse of the import's pieces: hf/families.py)."""
    return {name: torch.cat([weights[ours][row : row + n] for _, ours, row, n in parts]).to(dtype).contiguous()
            for name, parts in pieces.items()}  # fmt: skip


def _family_export(cfg: Config, weights: dict, vocab_rows: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    m = cfg.model.resolved()
    plan = tensor_plan(m, vocab_rows, weights["embedding.embed.weight"].shape[0])
    return family_tensors(weights, hf_pieces(plan), dtype)


def _legacy_rope(fields: dict) -> dict:
    """rope_theta and rope_scaling at the top level: how transformers 4.x (and serving engines built on
    it) read rotary settings; transformers 5 reads rope_parameters, and takes both."""
    rope = dict(fields["rope_parameters"])
    theta = rope.pop("rope_theta")
    return {"rope_theta": theta, "rope_scaling": rope if rope["rope_type"] != "default" else None}


def write_transformers(tmp: Path, cfg: Config, weights: dict, dtype: str | None, max_shard_size) -> str:
    """The `transformers` layout: the AR baseline as its standard family's own model, no code."""
    from transformers import AutoConfig, GenerationConfig

    if not objective_entry(cfg.diffusion.objective).autoregressive:
        raise Sad3Error(
            f"--format transformers writes an AR model; this run is diffusion.objective={cfg.diffusion.objective}: "
            "use --format sad3 (or sdar for a Qwen3-shaped block-diffusion run)"
        )
    m, tokenizer = cfg.model.resolved(), load_tokenizer(cfg.data.tokenizer)
    family, vocab_rows = family_for(m), m.vocab_rows or m.vocabulary(tokenizer.vocab_size)
    torch_dtype, name = _dtype(dtype, weights, "auto")
    save_weights(_family_export(cfg, weights, vocab_rows, torch_dtype), tmp, max_shard_size)
    hf = tokenizer.hf
    fields = family_fields(m, family, vocab_rows)
    config = AutoConfig.for_model(**fields, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
                                  pad_token_id=hf.pad_token_id)  # fmt: skip
    dtype_name = str(torch_dtype).removeprefix("torch.")
    raw = {**json.loads(config.to_json_string(use_diff=True)), **_legacy_rope(fields), "dtype": dtype_name,
           "torch_dtype": dtype_name}  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id).save_pretrained(str(tmp))
    type(hf).from_pretrained(hf.name_or_path, local_files_only=True).save_pretrained(str(tmp))
    _strip_load_time_keys(tmp)
    return name


def _strip_load_time_keys(out_dir: Path) -> None:
    config = out_dir / "tokenizer_config.json"  # drop how this copy was loaded: not the tokenizer's business
    settings = {k: v for k, v in json.loads(config.read_text()).items() if k not in LOAD_TIME_KEYS}
    config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


# SDAR-4B-Chat's training-code keys (JetAstra/SDAR); written with the values it published, so that the
# key set is SDAR's. attn_implementation is left unset: transformers would act on it.
SDAR_TRAINING_KEYS = {"attn_implementation": None, "debug": False, "ep_size": 1, "fuse_cross_entropy": True,
                      "micro_forward": False, "skip_checkpoint": False, "use_deepep": False}  # fmt: skip


def sdar_config(m, tokenizer: Tokenizer, block_size: int, vocab_rows: int, dtype_name: str) -> dict:
    """config.json in SDAR's layout (plain JSON: a transformers 5 config object would write rope_parameters)."""
    import transformers

    return {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar",
        "auto_map": {"AutoConfig": "configuration_sad3.SdarConfig", "AutoModel": "modeling_sad3.SdarForCausalLM",
                     "AutoModelForCausalLM": "modeling_sad3.SdarForCausalLM"},
        "attention_bias": m.qkv_bias, "attention_dropout": 0.0, "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id, "block_size": block_size, "mask_token_id": tokenizer.mask_id,
        "head_dim": m.head_dim, "hidden_act": "silu", "hidden_size": m.hidden_size, "initializer_range": 0.02,
        "intermediate_size": m.ffn_hidden_size, "max_position_embeddings": m.max_positions or m.seq_len,
        "max_window_layers": m.num_layers, "num_attention_heads": m.num_heads, "num_hidden_layers": m.num_layers,
        "num_key_value_heads": m.num_kv_heads, "rms_norm_eps": m.norm_eps, "rope_scaling": None,
        "rope_theta": m.rotary_base, "sliding_window": None, "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": dtype_name, "transformers_version": transformers.__version__, "use_cache": False,
        "use_sliding_window": False, "vocab_size": vocab_rows, **SDAR_TRAINING_KEYS,
    }  # fmt: skip


def _check_sdar(cfg: Config) -> None:
    m = cfg.model.resolved()
    if cfg.diffusion.objective != "sad3":
        raise Sad3Error(f"--format sdar writes a block-diffusion model; this run is diffusion.objective={cfg.diffusion.objective}")
    why = expressible(m, "qwen3") or (f"model.rope_scaling={m.rope_scaling}" if m.rope_scaling != "none" else None)
    if why:
        raise Sad3Error(f"--format sdar needs Qwen3's shape (QK-norm, RMSNorm, SwiGLU, unscaled rope); this run has {why}: use --format sad3")


def write_sdar(tmp: Path, cfg: Config, weights: dict, ckpt: Path, dtype: str | None, max_shard_size) -> str:
    """The `sdar` layout: SDAR's config.json and Qwen3's tensors, with sad3's classes as its code."""
    _check_sdar(cfg)
    m, tokenizer = cfg.model.resolved(), load_tokenizer(cfg.data.tokenizer)
    vocab_rows = m.vocabulary(tokenizer.vocab_size)  # the mask row included
    torch_dtype, name = _dtype(dtype, weights, "auto")
    save_weights(_family_export(cfg, weights, vocab_rows, torch_dtype), tmp, max_shard_size)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    config = sdar_config(m, tokenizer, cfg.diffusion.block_size, vocab_rows, dtype_name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id,
                  "do_sample": True, "sad3_sampling": asdict(SamplingConfig(block_size=cfg.diffusion.block_size))}  # fmt: skip
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    export_tokenizer(tokenizer, tmp)
    copy_code(tmp)
    return name


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, use_ema: bool = True, dtype: str | None = None,
    max_shard_size: str | int = "5GB", format: str = "sad3",
) -> ExportResult:  # fmt: skip
    """Write the transformers directory of `checkpoint` (a run directory, checkpoints/step_*, or a
    `sad3 import`) in `format`; `dtype` fp32 | bf16 | auto (the checkpoint's; default for transformers
    and sdar; sad3 defaults to fp32)."""
    if format not in FORMATS:
        raise Sad3Error(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    start = time.perf_counter()
    cfg, weights, ckpt = read_checkpoint(checkpoint, use_ema)
    ema = use_ema and (ckpt / "ema.safetensors").is_file()
    out_dir = Path(out_dir)
    tmp = _prepare_out_dir(out_dir)
    try:
        if format == "sad3":
            write_sad3(tmp, cfg, weights, ckpt, ema, dtype, max_shard_size)
        elif format == "transformers":
            write_transformers(tmp, cfg, weights, dtype, max_shard_size)
        else:
            write_sdar(tmp, cfg, weights, ckpt, dtype, max_shard_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    files = sorted(p.name for p in out_dir.iterdir())
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return ExportResult(out_dir, ckpt, files, size, time.perf_counter() - start)
