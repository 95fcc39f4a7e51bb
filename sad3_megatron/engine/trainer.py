"""The training loop: Alg. 1 through a DeepSpeed engine.

Each optimizer step draws its micro-batches and its noise from seeds derived from
(run seed, step, micro-batch, data-parallel rank), so a resumed run repeats an uninterrupted run
exactly without saving any RNG or sampler state.
"""

from __future__ import annotations

import json
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sad3_megatron.config import Config, save_config
from sad3_megatron.data import batch_rows, load_corpus
from sad3_megatron.engine.build import build_components
from sad3_megatron.engine.checkpoint import (
    latest_checkpoint,
    load_ema,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
)
from sad3_megatron.engine.consolidate import gather_tensor_parallel, model_tensors, shard_tensor_parallel
from sad3_megatron.engine.distributed import data_parallel_info, rank
from sad3_megatron.engine.ema import EMA
from sad3_megatron.engine.flops import peak_tflops, training_flops_per_sequence
from sad3_megatron.engine.lr_schedule import lr_multiplier
from sad3_megatron.engine.metrics import MetricsLog
from sad3_megatron.engine.mpu import MegatronMPU
from sad3_megatron.engine.pipeline import build_pipeline, pipeline_batch, pipeline_bound, to_canonical, to_local
from sad3_megatron.engine.plan import gradient_accumulation, parameter_count
from sad3_megatron.errors import Sad3Error
from sad3_megatron.evaluation import estimate_bound
from sad3_megatron.model import build_model, model_parallel_config, prepare_sequence_parallel
from sad3_megatron.model.fp8 import enable_fp8, require_fp8


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it (auto), or as asked; None means fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type != "cuda":
            # megatron-core's linear layers bind their autocast hooks to CUDA; on CPU the backward mixes dtypes.
            raise Sad3Error(
                "train.precision=bf16 needs a CUDA device (megatron-core layers autocast on CUDA only): use fp32 on CPU"
            )
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def step_seed(seed: int, step: int, slot: int) -> int:
    """Seed of one micro-batch slot of one optimizer step. A slot is the micro-batch's place in the
    global batch (micro × dp_size + dp_rank), so any DP × accumulation split of the same global
    batch draws the same noise for the same rows."""
    return (seed * 1_000_003 + step) * 1_000_033 + slot


def _peak_memory_per_rank() -> list[float]:
    """Peak resident memory (GiB) of every rank so far: host memory on CPU runs; on GPUs this is
    host memory too (see torch.cuda.max_memory_allocated for the device)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB on Linux
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [round(rss, 3)]
    values: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(values, round(rss, 3))
    return values


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def deepspeed_config(cfg: Config, amp: torch.dtype | None) -> dict:
    t = cfg.train
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: no apex, no JIT-built fused op
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.sequence_parallel:
        # DeepSpeed's pipeline splits activations across TP ranks before sending them, assuming TP ranks
        # hold copies; sequence-parallel ranks hold different slices, each sent whole.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if amp is not None:
        # The engine switches off any autocast around its forward unless told to keep it: without this
        # section train.precision=bf16 silently runs in fp32. Master weights and gradients stay fp32.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # the only autocast dtype offered
    return config


def _optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train

    def matrix(p: torch.nn.Parameter) -> bool:  # ZeRO-3 partitioned parameters keep their shape in ds_shape
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if matrix(p)]
    no_decay = [p for p in model.parameters() if not matrix(p)]  # norms and biases
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), foreach=True)


def _grad_norm(engine) -> float | None:
    """Global gradient norm before clipping, over tensor-parallel shards (replicated parameters
    counted once). ZeRO stages report their own norm after the step instead."""
    if engine.zero_optimization_stage() > 0:
        return None  # read after the step from engine.get_global_grad_norm()
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in engine.module.parameters():
        if p.grad is not None:
            square = p.grad.detach().double().pow(2).sum().cpu()
            if getattr(p, "tensor_model_parallel", False):
                sharded += square
            else:
                replicated += square
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    return float((sharded + replicated).sqrt())


def _resume_point(resume: str, ckpt_root: Path, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newest in the run (auto), none, or an explicit one."""
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    if resume == "none":
        if latest_checkpoint(ckpt_root) is not None:
            raise Sad3Error(
                f"{str(run_dir)!r} already holds checkpoints: use train.resume=auto to continue or a new run.out_dir"
            )
        return None
    path = Path(resume)
    if not (path / "config.yaml").is_file():
        raise Sad3Error(
            f"train.resume={resume!r} is not a checkpoint directory: use auto, none, or a checkpoints/step_* path"
        )
    return path


def local_weights(weights: dict[str, torch.Tensor], module: torch.nn.Module, pipeline_layers: int | None) -> dict:
    """Consolidated (TP = 1, whole-model) tensors → this rank's pipeline stage and TP shard."""
    if pipeline_layers is not None:
        weights = to_local(weights, module, pipeline_layers)
    return shard_tensor_parallel(weights, module)


def _load_weights(module: torch.nn.Module, checkpoint: str, zero3: bool, pipeline_layers: int | None) -> None:
    """Start from another run's consolidated weights (stage 2 of a recipe); optimizer starts fresh."""
    _, weights, path = read_checkpoint(checkpoint, use_ema=False)
    gathered = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0) if zero3 else nullcontext()
    with gathered:
        missing, unexpected = module.load_state_dict(local_weights(weights, module, pipeline_layers), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise Sad3Error(
            f"train.init_from={checkpoint!r} ({path}) does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def _micro_batch(corpus, cfg: Config, step: int, slot: int, device: torch.device):
    """Rows, document ids (None unless packed by document) and noise generator of one micro-batch
    slot of one step: pure functions of (seed, step, slot), hence exact on resume."""
    t = cfg.train
    dp_size = parallel_state.get_data_parallel_world_size()
    micro, dp_rank = divmod(slot, dp_size)
    rows = batch_rows(
        len(corpus.train), step, micro, t.micro_batch_size, t.grad_accum_steps, cfg.run.seed, dp_rank, dp_size
    )
    batch = corpus.train.batch(rows)
    x = torch.as_tensor(batch.tokens, device=device)
    document_ids = None if batch.document_ids is None else torch.as_tensor(batch.document_ids, device=device)
    return x, document_ids, torch.Generator().manual_seed(step_seed(cfg.run.seed, step, slot))


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    val: dict | None


def train(cfg: Config) -> TrainResult:
    run_dir = Path(cfg.run.out_dir)
    t, seq_len = cfg.train, cfg.model.seq_len
    pipelined = cfg.parallel.pipeline_parallel > 1
    parts = build_components(cfg, with_model=False)
    device, objective, spec = parts.device, parts.objective, parts.spec
    pipeline_layers = spec.num_layers if pipelined else None
    dp_rank, dp_size = data_parallel_info()
    is_main = rank() == 0
    t.grad_accum_steps = gradient_accumulation(cfg, dp_size)  # from train.global_batch_size when set
    amp = autocast_dtype(t.precision, device)
    ds_config = deepspeed_config(cfg, amp)
    zero3 = cfg.parallel.zero_stage == 3
    mpu = MegatronMPU() if cfg.parallel.tensor_parallel > 1 and not pipelined else None
    sequence_parallel = cfg.parallel.sequence_parallel
    if pipelined:
        model = build_pipeline(spec, model_parallel_config(sequence_parallel), objective, cfg.run.seed).to(device)
        if sequence_parallel:
            prepare_sequence_parallel(model)
    else:
        # Under ZeRO-3 each layer's weights are partitioned as soon as it is built: no rank ever
        # holds the whole model, which is what lets the largest presets start at all.
        with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu, mem_efficient_linear=False, enabled=zero3):
            model = build_model(spec, device, sequence_parallel)
    if t.fp8:
        require_fp8(device)
        enable_fp8(model)
    corpus = load_corpus(cfg.data, parts.tokenizer, seq_len)  # prepares token shards on first use

    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, t.warmup_steps, t.steps, t.lr_schedule, t.min_lr / t.lr)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=mpu,
        dist_init_required=False,
    )
    ckpt_root = run_dir / "checkpoints"
    resume_from = _resume_point(t.resume, ckpt_root, run_dir)
    if t.init_from and resume_from is None:
        _load_weights(engine.module, t.init_from, zero3, pipeline_layers)
    ema = EMA(engine.module, t.ema_decay) if t.ema_decay > 0 else None

    start_step, tokens_seen = 0, 0
    if resume_from is not None:
        state = load_training_state(engine, resume_from)
        start_step, tokens_seen = state["step"], state["tokens"]
        if ema is not None:
            ema.load_state_dict(
                local_weights(load_ema(resume_from), engine.module, pipeline_layers),
                engine.module,
                state["ema_updates"],
            )

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "data_stats.json").write_text(json.dumps(vars(corpus.stats), indent=1))
        n_params = parameter_count(cfg, parts.tokenizer.vocab_size)  # the whole model, whatever the layout
        resumed = f", resuming from {resume_from.name}" if resume_from else ""
        print(
            f"sad3 train: {cfg.model.preset} model, {n_params / 1e6:.2f}M parameters, L={seq_len}, "
            f"objective={cfg.diffusion.objective}, L'={cfg.diffusion.block_size}, {len(corpus.train)} train / "
            f"{len(corpus.val)} val sequences, device={device.type}, dp={dp_size}{resumed}",
            flush=True,
        )

    log = MetricsLog(run_dir / "metrics.jsonl", t.steps, start_step, is_main, t.progress_bar, t.wandb, cfg)
    global_batch = t.micro_batch_size * t.grad_accum_steps * dp_size
    step_flops = global_batch * training_flops_per_sequence(
        spec.num_layers, spec.hidden_size, spec.ffn_hidden_size, spec.padded_vocab_size, seq_len,
        cfg.diffusion.block_size, cfg.diffusion.objective,
    )  # fmt: skip
    peak = peak_tflops(device, t.peak_tflops)
    world = dist.get_world_size() if dist.is_initialized() else 1
    window_steps = 0
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    loss_value, val = None, None

    def evaluate() -> dict:
        with ema.applied(engine.module) if ema is not None else nullcontext():
            bound = (pipeline_bound if pipelined else estimate_bound)(
                engine if pipelined else engine.module,
                objective,
                corpus.val,
                device,
                batch_size=t.micro_batch_size,
                draws=1,
                seed=cfg.run.seed,
                autocast_dtype=amp,
                max_sequences=t.eval_batches * t.micro_batch_size,
            )
        return bound.to_dict()

    def consolidated_weights() -> tuple[dict, dict | None]:
        """Model and EMA weights in the TP = 1 layout (collective over TP; ZeRO-3 gathers first)."""
        module = engine.module

        if zero3:  # one parameter at a time: never the whole model gathered on a rank
            weights = {}
            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    weights.update(gather_tensor_parallel({name: p.data}, module))
        else:
            weights = gather_tensor_parallel(model_tensors(module), module)
        ema_weights = None
        if ema is not None:
            ema_weights = {}
            for name, p in module.named_parameters():
                ema_weights.update(gather_tensor_parallel({name: ema.whole(name, p)}, module))
        if pipelined:
            weights = to_canonical(weights, spec.num_layers)
            ema_weights = to_canonical(ema_weights, spec.num_layers) if ema else None
        return weights, ema_weights

    def checkpoint(step: int) -> None:
        save_checkpoint(
            engine,
            ckpt_root,
            step,
            {"step": step, "tokens": tokens_seen, "ema_updates": ema.updates if ema else 0},
            cfg,
            *consolidated_weights(),
            t.keep_last,
        )

    engine.train()
    for step in range(start_step, t.steps):
        loss_sum = torch.zeros((), device=device)
        logging_step = (step + 1) % t.log_interval == 0 or step + 1 == t.steps
        grad_norm = None
        if pipelined:  # DeepSpeed's engine runs the micro-batches through the stages and steps
            batches = [
                pipeline_batch(objective, objective.training_pass(x, generator), document_ids)
                for x, document_ids, generator in (
                    _micro_batch(corpus, cfg, step, micro * dp_size + dp_rank, device)
                    for micro in range(t.grad_accum_steps)
                )
            ]
            loss_sum += engine.train_batch(iter(batches)).detach()
            loss_sum *= t.grad_accum_steps  # train_batch returns the mean over micro-batches and ranks
        for micro in range(0 if pipelined else t.grad_accum_steps):
            slot = micro * dp_size + dp_rank
            torch.manual_seed(step_seed(cfg.run.seed, step, slot))  # dropout
            x, document_ids, generator = _micro_batch(corpus, cfg, step, slot, device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                terms = objective(engine, x, generator, document_ids=document_ids)
            engine.backward(terms.loss)
            if micro == t.grad_accum_steps - 1 and logging_step:
                grad_norm = _grad_norm(engine)
            engine.step()
            loss_sum += terms.loss.detach()
        if ema is not None:
            ema.update(engine.module)
        tokens_seen += global_batch * seq_len
        window_tokens += global_batch * seq_len
        window_steps += 1
        done = step + 1
        log.step()

        if done % t.log_interval == 0 or done == t.steps:
            loss = loss_sum / t.grad_accum_steps
            if dp_size > 1 and not pipelined:
                dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
                loss /= dp_size
            now = time.perf_counter()
            loss_value = loss.item()
            tflops = step_flops * window_steps / (now - window_start) / world / 1e12  # per device
            log.log(
                {
                    "step": done,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "tflops_per_device": tflops,
                    "mfu": tflops / peak if peak else None,
                    "grad_norm": grad_norm if grad_norm is not None else _optional_float(engine.get_global_grad_norm()),
                    "tokens": tokens_seen,
                    "tokens_per_s": window_tokens / (now - window_start),
                    "elapsed": now - started,
                    "max_rss_gib": _peak_memory_per_rank(),
                    "max_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
                    if device.type == "cuda"
                    else None,
                }
            )
            window_start, window_tokens, window_steps = now, 0, 0
        if done % t.eval_interval == 0 or done == t.steps:
            val = evaluate()
            log.log(
                {
                    "step": done,
                    "val_nelbo": val["nelbo_per_token"],
                    "val_ppl": val["ppl"],
                    "elapsed": time.perf_counter() - started,
                }
            )
        if done % t.save_interval == 0 or done == t.steps:
            checkpoint(done)
    log.close()
    if val is None and start_step >= t.steps:
        val = evaluate()
    return TrainResult(run_dir, t.steps, loss_value, val)
