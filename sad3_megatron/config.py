"""Experiment configuration: YAML files in configs/ plus `section.key=value` overrides.

The `model:` and `diffusion:` sections are core's `ModelConfig` and `DiffusionConfig` (what the
exported model stores too); the other sections are the trainer's. Enumerated options are `Literal`
types, checked when a value is read; every other mistake a user can make becomes a one-line
Sad3Error from `validate` that names the key and the fix.
"""

from __future__ import annotations

import glob
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.model_config import PRESETS, ModelConfig
from sad3_megatron.core.schedules import make_schedule, parse_grid

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DataConfig:
    tokenizer: str = "bert-base-uncased"  # a bundled name (bert-base-uncased | gpt2) or a tokenizer directory
    # Plain-text files (paragraph documents) used when `recipe` is empty; prepared into token shards on first use.
    train_files: list[str] = field(default_factory=lambda: ["sad3_megatron/assets/corpora/austen/*.txt"])
    val_fraction: float = 0.02  # train_files: the last fraction of each file's paragraphs is held out
    min_val_sequences: int = 8
    recipe: str = ""  # a data recipe YAML (configs/data/*.yaml) or a prepared directory; replaces train_files
    # Chat / instruction data (data/chat.py): JSONL lines {"messages": [{"role", "content"}, ...]} rendered with
    # the tokenizer's chat template; prompts clean and unscored, answers noised and scored. Replaces train_files.
    chat_files: list[str] = field(default_factory=list)
    packing: Literal["wrap", "document"] = "wrap"  # wrap: concatenate and wrap (Suppl. F); document: also per-token document ids
    framing: Literal["rows", "documents"] = "rows"  # rows: [BOS] chunk [EOS], EOS after each document (MDLM); documents: [BOS] doc [EOS]
    cache_dir: str = ""  # where data is prepared on the fly ("" = $SAD3_DATA_CACHE or ~/.cache/sad3/data)


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: Literal["constant", "cosine"] = "constant"  # both after linear warmup
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # 0 disables EMA
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where supported, else fp32
    fp8: bool = False  # fp8 GEMMs in the transformer layers' linears (Hopper/Ada GPUs); see model/fp8.py
    activation_checkpointing: Literal["none", "selective", "full"] = "none"  # see model/activation_checkpointing.py
    compile: bool = False  # torch.compile each transformer layer; see model/compile.py
    log_interval: int = 10
    eval_interval: int = 250
    eval_batches: int = 8
    save_interval: int = 500
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in the run dir) | none | a checkpoint directory
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_bar: bool = True
    global_batch_size: int = 0  # > 0: derive grad_accum_steps from it and the data-parallel size
    init_from: str = ""  # a checkpoint whose weights start this run (stage 2 of the recipe); fresh optimizer
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look the GPU up (unknown on CPU: MFU not reported)
    wandb: Literal["off", "offline", "online"] = "off"
    nonfinite_guard: bool = True  # skip an optimizer step whose loss or gradient norm is not finite (any rank)
    max_skipped_steps: int = 10  # stop the run after this many consecutive skipped steps


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False  # split norms, dropout and residuals along the sequence across TP ranks
    context_parallel: int = 1  # split the rows of x_t ⊕ x across this many ranks (docs/context-parallel.md)


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


_SECTIONS = {f.name: f.default_factory for f in fields(Config)}
YAML_BOOLEANS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def _options(annotation) -> tuple:
    """The allowed values of a Literal annotation (inside `X | None` too), or ()."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return next((_options(arg) for arg in typing.get_args(annotation) if _options(arg)), ())


def _coerce(where: str, value: Any, annotation, label: str | None = None) -> Any:
    """Bring a YAML/override value to the field's type, or say which key is wrong and why."""
    args = typing.get_args(annotation)
    if value is None:
        if type(None) in args:
            return None
        raise Sad3Error(f"{where} cannot be empty")
    options = _options(annotation)
    if options:
        if isinstance(value, bool):  # YAML 1.1 reads off / on / no / yes as booleans: take the option meant
            value = next((o for o in options if str(o).lower() in YAML_BOOLEANS[value]), value)
        if value not in options:
            raise Sad3Error(f"unknown {label or where} {value!r}: choose one of {', '.join(map(str, options))}")
        return value
    if typing.get_origin(annotation) is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Sad3Error(f"{where} must be a list of strings, got {value!r}")
        return value
    base = next((a for a in args if a is not type(None)), annotation)
    try:
        return _scalar(value, base)
    except (TypeError, ValueError):
        raise Sad3Error(f"{where} must be {base.__name__}, got {value!r}") from None


def _scalar(value: Any, base: type) -> Any:
    if base is bool:
        if isinstance(value, bool):
            return value
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[str(value).lower()]
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if base is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if base is str:
        return str(value)
    raise AssertionError(base)


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    if section not in _SECTIONS:
        raise Sad3Error(f"unknown config section {section!r}: choose one of {', '.join(_SECTIONS)}")
    obj = getattr(cfg, section)
    known = {f.name: f for f in fields(obj)}
    if key not in known:
        raise Sad3Error(f"unknown config key {section}.{key}: known keys are {', '.join(known)}")
    hints = typing.get_type_hints(type(obj))
    label = known[key].metadata.get("label")
    try:
        coerced = _coerce(f"{section}.{key}", value, hints[key], label)
    except KeyError:  # a bool spelled neither true nor false
        raise Sad3Error(f"{section}.{key} must be bool, got {value!r}") from None
    setattr(obj, key, coerced)


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None,
    check_files: bool = True,
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
        raw.pop("curriculum", None)  # the order a launcher runs the stages in (stage_sequence)
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
    validate(cfg, check_files)
    return cfg


def stage_sequence(path: str | os.PathLike) -> list[str]:
    """The stages of a config in the order they run one after another (a curriculum, e.g. LLaDA2's block
    sizes 1 -> 4 -> 32 -> 64 -> L -> 32): its `curriculum:` list, else the order of `stages:`. Each stage is
    its own run, initialised from the previous stage's weights (launchers/adapt.sh)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    stages = raw.get("stages") or {}
    order = raw.get("curriculum") or list(stages)
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise Sad3Error(f"curriculum in {str(path)!r} must be a list of stage names")
    unknown = [name for name in order if name not in stages]
    if unknown:
        raise Sad3Error(f"curriculum in {str(path)!r} names {unknown[0]!r}, which is not under stages: ({', '.join(stages)})")
    return order


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
    _validate_model(cfg)
    _validate_diffusion(cfg)
    _validate_search(cfg)
    _validate_train(cfg.train)
    _validate_data(cfg)
    _validate_parallel(cfg)
    _validate_shapes(cfg)
    if check_files and cfg.data.chat_files:
        resolve_data_files(cfg.data.chat_files)
    elif check_files and cfg.data.recipe:
        if not (Path(cfg.data.recipe).expanduser().exists() or (REPO_ROOT / cfg.data.recipe).exists()):
            raise Sad3Error(
                f"data.recipe={cfg.data.recipe!r} not found: give a recipe YAML (configs/data/*.yaml) or a prepared directory"
            )
    elif check_files:
        resolve_data_files(cfg.data.train_files)


def _validate_model(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if m.preset not in PRESETS:
        raise Sad3Error(f"unknown model.preset {m.preset!r}: choose one of {', '.join(PRESETS)}")
    if m.seq_len < 1:
        raise Sad3Error(f"model.seq_len must be positive, got {m.seq_len}")
    if m.loss_chunk_tokens < 0:
        raise Sad3Error(f"model.loss_chunk_tokens must be 0 (whole logits) or positive, got {m.loss_chunk_tokens}")
    if m.loss_chunk_tokens and p.pipeline_parallel > 1:
        raise Sad3Error("model.loss_chunk_tokens is not used by pipeline stages: set it to 0 with parallel.pipeline_parallel > 1")
    if not 0.0 <= m.dropout < 1.0:
        raise Sad3Error(f"model.dropout must be in [0, 1), got {m.dropout}")


def _validate_shapes(cfg: Config) -> None:
    """The model's shape against itself and the tensor-parallel layout (after both are checked)."""
    p, m = cfg.parallel, cfg.model.resolved()
    unset = [k for k in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size") if getattr(m, k) is None]
    if unset:
        raise Sad3Error(f"model.preset={m.preset} leaves model.{unset[0]} unset: set it, or pick another preset")
    if cfg.model.head_dim is None and m.hidden_size % m.num_heads:
        raise Sad3Error(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}: set model.head_dim"
        )
    if m.head_dim % 2:
        raise Sad3Error(f"rotary embeddings need an even head dimension, got model.head_dim={m.head_dim}")
    if m.num_kv_heads < 1 or m.num_heads % m.num_kv_heads:
        raise Sad3Error(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
    if m.num_heads % p.tensor_parallel:
        raise Sad3Error(f"model.num_heads={m.num_heads} is not divisible by parallel.tensor_parallel={p.tensor_parallel}")
    if m.num_kv_heads % p.tensor_parallel:
        raise Sad3Error(
            f"model.num_kv_heads={m.num_kv_heads} is not divisible by parallel.tensor_parallel={p.tensor_parallel}: "
            "tensor parallelism shards whole key/value groups; pick a TP size that divides it"
        )
    if m.ffn_hidden_size % p.tensor_parallel:
        raise Sad3Error(
            f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor_parallel={p.tensor_parallel}"
        )
    if m.vocab_rows is not None and (m.vocab_rows < 1 or m.vocab_rows % p.tensor_parallel):
        raise Sad3Error(
            f"model.vocab_rows={m.vocab_rows} is not divisible by parallel.tensor_parallel={p.tensor_parallel}: "
            "the embedding table shards by rows"
        )
    _validate_rope(m)


def _validate_rope(m) -> None:
    if m.rotary_base <= 0 or m.rope_factor <= 0:
        raise Sad3Error(f"model.rotary_base and model.rope_factor must be positive, got {m.rotary_base}, {m.rope_factor}")
    if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise Sad3Error(
            "model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor < model.rope_high_freq_factor, got "
            f"{m.rope_low_freq_factor} and {m.rope_high_freq_factor}"
        )
    if m.norm_eps <= 0:
        raise Sad3Error(f"model.norm_eps must be positive, got {m.norm_eps}")


def _validate_diffusion(cfg: Config) -> None:
    d, m, p = cfg.diffusion, cfg.model, cfg.parallel
    if d.objective == "sedd" and d.block_size != m.seq_len:
        raise Sad3Error(f"diffusion.objective=sedd is one block (L' = L): set diffusion.block_size={m.seq_len}")
    if d.ar_loss_weight and d.block_size == m.seq_len and p.pipeline_parallel > 1:
        raise Sad3Error("diffusion.ar_loss_weight at L' = L doubles the pass only for the AR term, which pipeline stages cannot drop for the bound: use parallel.pipeline_parallel=1")
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
    _validate_adaptation(d)


_SWITCHES = (  # (what is on, as the message names it): the adaptation switches of the sad3 objective
    (lambda d: d.shift, "shift"),
    (lambda d: d.complementary_masks, "complementary_masks"),
    (lambda d: d.clean_attention == "causal", "clean_attention=causal"),
    (lambda d: d.loss_weighting == "uniform", "loss_weighting=uniform"),
    (lambda d: d.ar_loss_weight != 0.0, "ar_loss_weight"),
    (lambda d: d.diffusion_loss_weight != 1.0, "diffusion_loss_weight"),
    (lambda d: d.mask_embedding_noise != 0.0, "mask_embedding_noise"),
)


def adaptation_switches(d: DiffusionConfig) -> str:
    """The adaptation switches that are on, as `key=value` words ("" when none: the paper's objective)."""
    on = [name for test, name in _SWITCHES if test(d)]
    values = {"shift": "shift", "complementary_masks": "complementary_masks",
              "ar_loss_weight": f"ar_loss_weight={d.ar_loss_weight:g}",
              "diffusion_loss_weight": f"diffusion_loss_weight={d.diffusion_loss_weight:g}",
              "mask_embedding_noise": f"mask_embedding_noise={d.mask_embedding_noise:g} over {d.mask_embedding_noise_steps} steps"}  # fmt: skip
    return ", ".join(values.get(name, name) for name in on)


def _validate_adaptation(d: DiffusionConfig) -> None:
    """The adaptation switches (docs/adaptation.md): settings of the block-diffusion objective only."""
    on = [name for test, name in _SWITCHES if test(d)]
    if on and d.objective != "sad3":
        raise Sad3Error(f"diffusion.{on[0]} is a switch of the block-diffusion objective: use diffusion.objective=sad3 or turn it off")
    if d.ar_loss_weight < 0 or d.diffusion_loss_weight <= 0:
        raise Sad3Error(
            f"diffusion.ar_loss_weight must be >= 0 and diffusion.diffusion_loss_weight > 0 (got {d.ar_loss_weight}, {d.diffusion_loss_weight})"
        )
    if d.ar_loss_weight > 0 and d.clean_attention != "causal":
        raise Sad3Error("diffusion.ar_loss_weight needs diffusion.clean_attention=causal (a block-causal clean row sees the token it would predict)")
    if d.mask_embedding_noise < 0 or d.mask_embedding_noise_steps < 0:
        raise Sad3Error("diffusion.mask_embedding_noise and diffusion.mask_embedding_noise_steps must be >= 0")
    if d.mask_embedding_noise > 0 and d.mask_embedding_noise_steps < 1:
        raise Sad3Error("diffusion.mask_embedding_noise decays to 0 over diffusion.mask_embedding_noise_steps: set it to at least 1")


def _validate_search(cfg: Config) -> None:
    """diffusion.schedule_search and its keys (Sec. 5.3): what the search needs to run."""
    d, p = cfg.diffusion, cfg.parallel
    if d.search_batches < 1 or (d.schedule_search == "grad" and d.search_batches < 2):
        raise Sad3Error(f"diffusion.search_batches must be at least 1 (2 for grad), got {d.search_batches}")
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


_AT_LEAST_ONE = ("steps", "micro_batch_size", "grad_accum_steps", "log_interval", "eval_interval", "save_interval",
                 "keep_last", "eval_batches", "max_skipped_steps")  # fmt: skip


def _validate_train(t: TrainConfig) -> None:
    if t.global_batch_size < 0:
        raise Sad3Error(f"train.global_batch_size must be 0 (unused) or positive, got {t.global_batch_size}")
    for key in _AT_LEAST_ONE:
        if getattr(t, key) < 1:
            raise Sad3Error(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise Sad3Error(f"train.lr must be positive and train.min_lr in [0, lr] (got lr={t.lr}, min_lr={t.min_lr})")
    if not 0.0 <= t.ema_decay < 1.0:
        raise Sad3Error(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")


def _validate_data(cfg: Config) -> None:
    if cfg.data.chat_files and cfg.data.recipe:
        raise Sad3Error("data.chat_files and data.recipe both name the data: keep one")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise Sad3Error(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.data.framing == "rows" and cfg.model.seq_len < 3:
        raise Sad3Error(f"data.framing=rows needs model.seq_len >= 3 ([BOS] chunk [EOS]), got {cfg.model.seq_len}")


def _validate_parallel(cfg: Config) -> None:
    p, m = cfg.parallel, cfg.model
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
    _validate_context_parallel(cfg)


def _validate_context_parallel(cfg: Config) -> None:
    """Each CP rank takes 2 of 2C equal chunks of every half of the input (model/context_parallel.py)."""
    p, m, d = cfg.parallel, cfg.model, cfg.diffusion
    cp = p.context_parallel
    if cp < 1:
        raise Sad3Error(f"parallel.context_parallel must be at least 1, got {cp}")
    if cp == 1:
        return
    if p.pipeline_parallel > 1:
        raise Sad3Error("parallel.context_parallel > 1 does not run with pipeline stages: set parallel.pipeline_parallel=1")
    if d.objective == "sedd":
        raise Sad3Error("diffusion.objective=sedd reads full-vocabulary logits of every row: set parallel.context_parallel=1")
    if d.mask_embedding_noise > 0:  # the hook draws per [MASK] occurrence among a rank's rows, not the whole pass's
        raise Sad3Error(
            "diffusion.mask_embedding_noise draws its noise over each rank's rows, so a context-parallel step would "
            "not be the unsplit one: set diffusion.mask_embedding_noise=0 or parallel.context_parallel=1"
        )
    if m.seq_len % (2 * cp):
        raise Sad3Error(
            f"parallel.context_parallel={cp} cuts each half of the sequence into {2 * cp} chunks: "
            f"model.seq_len={m.seq_len} must be a multiple of {2 * cp}"
        )
    if p.sequence_parallel and (m.seq_len // cp) % p.tensor_parallel:
        raise Sad3Error(
            f"parallel.sequence_parallel splits each CP rank's rows across TP ranks: model.seq_len / context_parallel "
            f"= {m.seq_len // cp} must be a multiple of parallel.tensor_parallel={p.tensor_parallel}"
        )


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = [
    "Config",
    "adaptation_switches",
    "DataConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "resolve_data_files",
    "save_config",
    "stage_sequence",
    "validate",
]
