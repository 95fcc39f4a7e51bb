"""Experiment configuration: YAML files in configs/ plus `section.key=value` overrides.

Every mistake a user can make here becomes a one-line Sad3Error that names the key and the fix.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sad3_megatron.errors import Sad3Error

REPO_ROOT = Path(__file__).resolve().parent.parent

# Model sizes. `small` is the paper's 110M model (12 layers, 768 hidden, 12 heads; Suppl. F).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_layers": 4, "hidden_size": 128, "num_heads": 4, "ffn_hidden_size": 512},
    "small": {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "ffn_hidden_size": 3072},
    "medium": {"num_layers": 24, "hidden_size": 1024, "num_heads": 16, "ffn_hidden_size": 4096},
    "large": {"num_layers": 24, "hidden_size": 1536, "num_heads": 16, "ffn_hidden_size": 6144},
    "xl": {"num_layers": 24, "hidden_size": 2048, "num_heads": 16, "ffn_hidden_size": 8192},
    "2.7b": {"num_layers": 32, "hidden_size": 2560, "num_heads": 32, "ffn_hidden_size": 10240},
}


@dataclass
class ModelConfig:
    """The DiT-style transformer (no time conditioning). `preset` fills unset sizes (see model/presets.py)."""

    preset: str = "tiny"
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    ffn_hidden_size: int | None = None
    dropout: float = 0.1
    seq_len: int = 128
    attention_backend: str = "auto"
    rotary_base: float = 10000.0
    loss_chunk_tokens: int = 0  # > 0: output-layer loss in chunks of this many tokens, never whole logits


@dataclass
class DiffusionConfig:
    """The objective. `sad3` with block_size = seq_len is MDLM; block_size 1 + full masking is AR (Suppl. B)."""

    objective: str = "sad3"  # sad3 | ar (plain next-token baseline on the same model) | sedd (score entropy, L' = L)
    ar_random_tokens: bool = False  # ar: loss on a random ~half of the tokens (Table 1's "AR + random batch size")
    block_size: int = 4
    schedule: str = "clipped"  # linear | cosine | log | sqrt | square | clipped
    beta: float = 0.3  # clipped schedule: mask rates ~ U[beta, omega] (Sec. 5.2)
    omega: float = 0.8
    antithetic: bool = True
    masking: str = "bernoulli"  # bernoulli | resample (reference code's realised rate in [beta, omega]) | count
    t_floor: float = 1e-3  # smallest t drawn in training (MDLM's; keeps the 1/t weight's variance finite)
    schedule_search: str = "off"  # off | elbo | grad: pick (beta, omega) of least variance at each evaluation
    search_batches: int = 100  # held-out micro-batches the search scores (the reference code's 100)
    search_grid: str = "reference"  # reference (widths .5-.9, starts every .05, + (1e-3, 1)) | "B:W,B:W,..."
    search_parameters: str = ""  # grad search: only parameters whose name contains this ("" = all)


@dataclass
class DataConfig:
    tokenizer: str = "bert-base-uncased"  # a bundled name (bert-base-uncased | gpt2) or a tokenizer directory
    # Plain-text files (paragraph documents) used when `recipe` is empty; prepared into token shards on first use.
    train_files: list[str] = field(default_factory=lambda: ["sad3_megatron/assets/corpora/austen/*.txt"])
    val_fraction: float = 0.02  # train_files: the last fraction of each file's paragraphs is held out
    min_val_sequences: int = 8
    recipe: str = ""  # a data recipe YAML (configs/data/*.yaml) or a prepared directory; replaces train_files
    packing: str = "wrap"  # wrap (concatenate and wrap, Suppl. F) | document (also yield per-token document ids)
    framing: str = "rows"  # rows: [BOS] chunk [EOS], EOS after each document (MDLM) | documents: [BOS] doc [EOS]
    cache_dir: str = ""  # where data is prepared on the fly ("" = $SAD3_DATA_CACHE or ~/.cache/sad3/data)


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: str = "constant"  # constant | cosine (both after linear warmup)
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # 0 disables EMA
    precision: str = "auto"  # auto (bf16 where supported, else fp32) | fp32 | bf16
    fp8: bool = False  # fp8 GEMMs in the transformer layers' linears (Hopper/Ada GPUs); see model/fp8.py
    activation_checkpointing: str = "none"  # none | selective | full; see model/activation_checkpointing.py
    compile: bool = False  # torch.compile each transformer layer; see model/compile.py
    log_interval: int = 10
    eval_interval: int = 250
    eval_batches: int = 8
    save_interval: int = 500
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in the run dir) | none | a checkpoint directory
    device: str = "auto"  # auto | cpu | cuda
    progress_bar: bool = True
    global_batch_size: int = 0  # > 0: derive grad_accum_steps from it and the data-parallel size
    init_from: str = ""  # a checkpoint whose weights start this run (stage 2 of the recipe); fresh optimizer
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look the GPU up (unknown on CPU: MFU not reported)
    wandb: str = "off"  # off | offline | online
    nonfinite_guard: bool = True  # skip an optimizer step whose loss or gradient norm is not finite (any rank)
    max_skipped_steps: int = 10  # stop the run after this many consecutive skipped steps


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False  # split norms, dropout and residuals along the sequence across TP ranks


@dataclass
class RunConfig:
    name: str = "sad3"
    out_dir: str = "runs/sad3"
    seed: int = 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {f.name: f.type for f in fields(Config)}


def _coerce(section: str, key: str, value: Any, annotation: str) -> Any:
    """Bring a YAML/override value to the field's type, or say which key is wrong and why."""
    where = f"{section}.{key}"
    if value is None:
        if "None" in annotation:
            return None
        raise Sad3Error(f"{where} cannot be empty")
    if annotation.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Sad3Error(f"{where} must be a list of strings, got {value!r}")
        return value
    base = annotation.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            return str(value)
    except (TypeError, ValueError):
        raise Sad3Error(f"{where} must be {base}, got {value!r}") from None
    raise AssertionError(annotation)


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    if section not in _SECTIONS:
        raise Sad3Error(f"unknown config section {section!r}: choose one of {', '.join(_SECTIONS)}")
    obj = getattr(cfg, section)
    known = {f.name: f for f in fields(obj)}
    if key not in known:
        raise Sad3Error(f"unknown config key {section}.{key}: known keys are {', '.join(known)}")
    setattr(obj, key, _coerce(section, key, value, str(known[key].type)))


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None
) -> Config:
    """Read a YAML config, apply a named stage's overrides (the YAML's `stages:` mapping, e.g.
    pretrain / finetune of one recipe), then `section.key=value` overrides; validate; return it."""
    cfg = Config()
    stages: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise Sad3Error(f"config file {str(path)!r} not found: pass a YAML file such as configs/demo.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise Sad3Error(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise Sad3Error(f"config file {str(path)!r} must hold a mapping of sections")
        stages = raw.pop("stages", None) or {}
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise Sad3Error(f"config section {section!r} in {str(path)!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value)
    if stage is not None:
        if stage not in stages:
            known = ", ".join(stages) or "none"
            raise Sad3Error(f"config has no stage {stage!r} (stages: {known})")
        for dotted, value in stages[stage].items():
            _apply(cfg, *_split_key(dotted), value)
    for item in overrides:
        if "=" not in item:
            raise Sad3Error(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
        dotted, text = item.split("=", 1)
        _apply(cfg, *_split_key(dotted), yaml.safe_load(text) if text else None)
    validate(cfg)
    return cfg


def _split_key(dotted: str) -> tuple[str, str]:
    if "." not in dotted:
        raise Sad3Error(f"override key {dotted!r} must look like section.key (e.g. train.steps)")
    section, key = dotted.split(".", 1)
    return section, key


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config saved with a checkpoint (no file checks: the data may live elsewhere now)."""
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            _apply(cfg, section, key, value)
    validate(cfg, check_files=False)
    return cfg


def resolve_data_files(patterns: list[str]) -> list[Path]:
    """Expand globs (relative to the working directory, then to the repository) into existing files."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or sorted(glob.glob(str(REPO_ROOT / pattern)))
        if not matches:
            raise Sad3Error(f"data file {pattern!r} not found: set data.train_files to existing text files")
        files.extend(Path(m) for m in matches if Path(m).is_file())
    if not files:
        raise Sad3Error(f"data.train_files {patterns!r} matched no files")
    return files


def validate(cfg: Config, check_files: bool = True) -> None:
    """Reject configurations that cannot train, with one line that names the problem and the fix."""
    from sad3_megatron.attention import BACKENDS
    from sad3_megatron.diffusion import make_schedule

    m, d, t, p = cfg.model, cfg.diffusion, cfg.train, cfg.parallel
    if m.preset not in PRESETS:
        raise Sad3Error(f"unknown model.preset {m.preset!r}: choose one of {', '.join(PRESETS)}")
    if m.seq_len < 1:
        raise Sad3Error(f"model.seq_len must be positive, got {m.seq_len}")
    if m.attention_backend not in BACKENDS:
        raise Sad3Error(f"unknown model.attention_backend {m.attention_backend!r}: choose one of {', '.join(BACKENDS)}")
    if m.loss_chunk_tokens < 0:
        raise Sad3Error(f"model.loss_chunk_tokens must be 0 (whole logits) or positive, got {m.loss_chunk_tokens}")
    if m.loss_chunk_tokens and p.pipeline_parallel > 1:
        raise Sad3Error("model.loss_chunk_tokens is not used by pipeline stages: set it to 0 with parallel.pipeline_parallel > 1")
    if not 0.0 <= m.dropout < 1.0:
        raise Sad3Error(f"model.dropout must be in [0, 1), got {m.dropout}")
    if d.objective not in ("sad3", "ar", "sedd"):
        raise Sad3Error(f"unknown diffusion.objective {d.objective!r}: choose sad3, ar or sedd")
    if d.objective == "sedd" and d.block_size != m.seq_len:
        raise Sad3Error(f"diffusion.objective=sedd is one block (L' = L): set diffusion.block_size={m.seq_len}")
    if d.objective == "sedd" and (p.pipeline_parallel > 1 or p.sequence_parallel):
        raise Sad3Error(
            "diffusion.objective=sedd reads full-vocabulary logits: use parallel.pipeline_parallel=1, no sequence_parallel"
        )
    if d.ar_random_tokens and d.objective != "ar":
        raise Sad3Error("diffusion.ar_random_tokens applies to diffusion.objective=ar only")
    if d.block_size < 1 or m.seq_len % d.block_size:
        raise Sad3Error(
            f"diffusion.block_size={d.block_size} does not divide model.seq_len={m.seq_len}: pick a divisor of the context length"
        )
    make_schedule(d.schedule, d.beta, d.omega, d.t_floor, d.masking)
    _validate_search(cfg)
    if t.lr_schedule not in ("constant", "cosine"):
        raise Sad3Error(f"unknown train.lr_schedule {t.lr_schedule!r}: choose constant or cosine")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise Sad3Error(f"unknown train.precision {t.precision!r}: choose auto, fp32 or bf16")
    if t.activation_checkpointing not in ("none", "selective", "full"):
        raise Sad3Error(
            f"unknown train.activation_checkpointing {t.activation_checkpointing!r}: choose none, selective or full"
        )
    if t.wandb not in ("off", "offline", "online"):
        raise Sad3Error(f"unknown train.wandb {t.wandb!r}: choose off, offline or online")
    if t.global_batch_size < 0:
        raise Sad3Error(f"train.global_batch_size must be 0 (unused) or positive, got {t.global_batch_size}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise Sad3Error(f"unknown train.device {t.device!r}: choose auto, cpu or cuda")
    for key in (
        "steps",
        "micro_batch_size",
        "grad_accum_steps",
        "log_interval",
        "eval_interval",
        "save_interval",
        "keep_last",
        "eval_batches",
        "max_skipped_steps",
    ):
        if getattr(t, key) < 1:
            raise Sad3Error(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise Sad3Error(f"train.lr must be positive and train.min_lr in [0, lr] (got lr={t.lr}, min_lr={t.min_lr})")
    if not 0.0 <= t.ema_decay < 1.0:
        raise Sad3Error(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise Sad3Error(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.data.packing not in ("wrap", "document"):
        raise Sad3Error(f"unknown data.packing {cfg.data.packing!r}: choose wrap or document")
    if cfg.data.framing not in ("rows", "documents"):
        raise Sad3Error(f"unknown data.framing {cfg.data.framing!r}: choose rows or documents")
    if cfg.data.framing == "rows" and m.seq_len < 3:
        raise Sad3Error(f"data.framing=rows needs model.seq_len >= 3 ([BOS] chunk [EOS]), got {m.seq_len}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise Sad3Error(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.tensor_parallel < 1 or p.pipeline_parallel < 1:
        raise Sad3Error("parallel.tensor_parallel and parallel.pipeline_parallel must be at least 1")
    if p.sequence_parallel and p.tensor_parallel < 2:
        raise Sad3Error(
            "parallel.sequence_parallel splits the sequence across TP ranks: it needs parallel.tensor_parallel >= 2"
        )
    if p.sequence_parallel and m.seq_len % p.tensor_parallel:
        raise Sad3Error(
            f"parallel.sequence_parallel needs model.seq_len ({m.seq_len}) divisible by parallel.tensor_parallel ({p.tensor_parallel})"
        )
    if p.pipeline_parallel > 1 and p.zero_stage > 1:
        raise Sad3Error(
            f"parallel.pipeline_parallel={p.pipeline_parallel} allows ZeRO stage 0 or 1 (DeepSpeed's pipeline engine): set parallel.zero_stage=1"
        )
    sizes = resolved_model_sizes(m)
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise Sad3Error(
            f"model.hidden_size={sizes['hidden_size']} is not divisible by model.num_heads={sizes['num_heads']}"
        )
    if (sizes["hidden_size"] // sizes["num_heads"]) % 2:
        raise Sad3Error("rotary embeddings need an even head dimension: change model.hidden_size or model.num_heads")
    if sizes["num_heads"] % p.tensor_parallel:
        raise Sad3Error(
            f"model.num_heads={sizes['num_heads']} is not divisible by parallel.tensor_parallel={p.tensor_parallel}"
        )
    if check_files and cfg.data.recipe:
        if not (Path(cfg.data.recipe).expanduser().exists() or (REPO_ROOT / cfg.data.recipe).exists()):
            raise Sad3Error(
                f"data.recipe={cfg.data.recipe!r} not found: give a recipe YAML (configs/data/*.yaml) or a prepared directory"
            )
    elif check_files:
        resolve_data_files(cfg.data.train_files)


def _validate_search(cfg: Config) -> None:
    """diffusion.schedule_search and its keys (Sec. 5.3): what the search needs to run."""
    d, p = cfg.diffusion, cfg.parallel
    if d.schedule_search not in ("off", "elbo", "grad"):
        raise Sad3Error(f"unknown diffusion.schedule_search {d.schedule_search!r}: choose off, elbo or grad")
    if d.search_batches < 1 or (d.schedule_search == "grad" and d.search_batches < 2):
        raise Sad3Error(f"diffusion.search_batches must be at least 1 (2 for grad), got {d.search_batches}")
    from sad3_megatron.engine.schedule_search import parse_grid

    parse_grid(d.search_grid, d.block_size)
    if d.schedule_search == "off":
        return
    if d.objective == "ar":
        raise Sad3Error("diffusion.schedule_search tunes the diffusion noise: set it off for diffusion.objective=ar")
    if d.masking == "count":
        raise Sad3Error("diffusion.schedule_search picks clipped ranges: use diffusion.masking=bernoulli or resample")
    if p.pipeline_parallel > 1:
        raise Sad3Error(
            "diffusion.schedule_search scores whole models: set parallel.pipeline_parallel=1 or the search off"
        )
    if d.schedule_search == "grad" and (p.tensor_parallel > 1 or p.zero_stage == 3):
        raise Sad3Error(
            "diffusion.schedule_search=grad needs whole gradients on each rank (tensor_parallel=1, zero_stage<3): use elbo"
        )


def resolved_model_sizes(m: ModelConfig) -> dict[str, int]:
    """The preset's sizes with any explicitly set field taking precedence."""
    sizes = dict(PRESETS[m.preset])
    for key in sizes:
        if getattr(m, key) is not None:
            sizes[key] = getattr(m, key)
    return sizes


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = [
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "resolve_data_files",
    "resolved_model_sizes",
    "save_config",
    "validate",
]
