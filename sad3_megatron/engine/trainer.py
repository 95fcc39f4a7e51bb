"""The training loop: Alg. 1 through a DeepSpeed engine.

Each optimizer step draws its micro-batches and its noise from seeds derived from
(run seed, step, micro-batch, data-parallel rank), so a resumed run repeats an uninterrupted run
exactly without saving any RNG or sampler state.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from sad3_megatron.config import Config, resolve_data_files, save_config
from sad3_megatron.data import batch_rows, load_corpus
from sad3_megatron.engine.build import build_components
from sad3_megatron.engine.checkpoint import latest_checkpoint, load_ema, load_training_state, save_checkpoint
from sad3_megatron.engine.distributed import data_parallel_info, rank
from sad3_megatron.engine.ema import EMA
from sad3_megatron.engine.lr_schedule import lr_multiplier
from sad3_megatron.engine.metrics import MetricsLog
from sad3_megatron.errors import Sad3Error
from sad3_megatron.evaluation import estimate_bound


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


def step_seed(seed: int, step: int, micro: int, dp_rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 * 64 + micro * 64 + dp_rank


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def deepspeed_config(cfg: Config) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: no apex, no JIT-built fused op
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms and biases
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), foreach=True)


def _grad_norm(engine) -> float | None:
    """Global gradient norm before clipping; ZeRO stages report their own (sharded) norm."""
    if engine.zero_optimization_stage() > 0:
        return None  # read after the step from engine.get_global_grad_norm()
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    val: dict | None


def train(cfg: Config) -> TrainResult:
    run_dir = Path(cfg.run.out_dir)
    t, seq_len = cfg.train, cfg.model.seq_len
    parts = build_components(cfg)
    device, model, objective = parts.device, parts.model, parts.objective
    corpus = load_corpus(
        resolve_data_files(cfg.data.train_files),
        parts.tokenizer,
        seq_len,
        cfg.data.val_fraction,
        cfg.data.min_val_sequences,
    )
    dp_rank, dp_size = data_parallel_info()
    is_main = rank() == 0

    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, t.warmup_steps, t.steps, t.lr_schedule, t.min_lr / t.lr)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg), dist_init_required=False
    )
    ema = EMA(engine.module, t.ema_decay) if t.ema_decay > 0 else None
    amp = autocast_dtype(t.precision, device)

    ckpt_root = run_dir / "checkpoints"
    start_step, tokens_seen = 0, 0
    resume_from = None
    if t.resume == "auto":
        resume_from = latest_checkpoint(ckpt_root)
    elif t.resume != "none":
        resume_from = Path(t.resume)
        if not (resume_from / "config.yaml").is_file():
            raise Sad3Error(
                f"train.resume={t.resume!r} is not a checkpoint directory: use auto, none, or a checkpoints/step_* path"
            )
    elif latest_checkpoint(ckpt_root) is not None:
        raise Sad3Error(
            f"{str(run_dir)!r} already holds checkpoints: use train.resume=auto to continue or a new run.out_dir"
        )
    if resume_from is not None:
        state = load_training_state(engine, resume_from)
        start_step, tokens_seen = state["step"], state["tokens"]
        if ema is not None:
            ema.load_state_dict(load_ema(resume_from), state["ema_updates"])

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "data_stats.json").write_text(json.dumps(vars(corpus.stats), indent=1))
        n_params = sum(p.numel() for p in model.parameters())
        resumed = f", resuming from {resume_from.name}" if resume_from else ""
        print(
            f"sad3 train: {cfg.model.preset} model, {n_params / 1e6:.2f}M parameters, L={seq_len}, "
            f"objective={cfg.diffusion.objective}, L'={cfg.diffusion.block_size}, {len(corpus.train)} train / "
            f"{len(corpus.val)} val sequences, device={device.type}, dp={dp_size}{resumed}",
            flush=True,
        )

    log = MetricsLog(run_dir / "metrics.jsonl", t.steps, start_step, is_main, t.progress_bar)
    global_batch = t.micro_batch_size * t.grad_accum_steps * dp_size
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    loss_value, val = None, None

    def evaluate() -> dict:
        with ema.applied(engine.module) if ema is not None else nullcontext():
            bound = estimate_bound(
                engine.module,
                objective,
                corpus.val[: t.eval_batches * t.micro_batch_size],
                device,
                batch_size=t.micro_batch_size,
                draws=1,
                seed=cfg.run.seed,
                autocast_dtype=amp,
            )
        return bound.to_dict()

    def checkpoint(step: int) -> None:
        save_checkpoint(
            engine,
            ckpt_root,
            step,
            {"step": step, "tokens": tokens_seen, "ema_updates": ema.updates if ema else 0},
            cfg,
            ema.shadow if ema else None,
            t.keep_last,
        )

    engine.train()
    for step in range(start_step, t.steps):
        loss_sum = torch.zeros((), device=device)
        logging_step = (step + 1) % t.log_interval == 0 or step + 1 == t.steps
        grad_norm = None
        for micro in range(t.grad_accum_steps):
            seed = step_seed(cfg.run.seed, step, micro, dp_rank)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator().manual_seed(seed)  # the forward process
            rows = batch_rows(
                len(corpus.train), step, micro, t.micro_batch_size, t.grad_accum_steps, cfg.run.seed, dp_rank, dp_size
            )
            x = torch.as_tensor(corpus.train[rows], device=device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                terms = objective(engine, x, generator)
            engine.backward(terms.loss)
            if micro == t.grad_accum_steps - 1 and logging_step:
                grad_norm = _grad_norm(engine)
            engine.step()
            loss_sum += terms.loss.detach()
        if ema is not None:
            ema.update(engine.module)
        tokens_seen += global_batch * seq_len
        window_tokens += global_batch * seq_len
        done = step + 1
        log.step()

        if done % t.log_interval == 0 or done == t.steps:
            loss = loss_sum / t.grad_accum_steps
            if dist.is_initialized() and dp_size > 1:
                dist.all_reduce(loss)
                loss /= dist.get_world_size()
            now = time.perf_counter()
            loss_value = loss.item()
            log.log(
                {
                    "step": done,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm if grad_norm is not None else _optional_float(engine.get_global_grad_norm()),
                    "tokens": tokens_seen,
                    "tokens_per_s": window_tokens / (now - window_start),
                    "elapsed": now - started,
                }
            )
            window_start, window_tokens = now, 0
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
