"""The training loop: Alg. 1 through a DeepSpeed engine.

Each optimizer step draws its micro-batches and its noise from seeds derived from
(run seed, step, micro-batch, data-parallel rank), so a resumed run repeats an uninterrupted run
exactly without saving any RNG or sampler state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sad3_megatron.config import Config, adaptation_switches, save_config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.likelihood import estimate_bound, held_out_words
from sad3_megatron.core.schedules import NoiseSchedule
from sad3_megatron.data.corpus import load_corpus
from sad3_megatron.data.sampler import rows_at
from sad3_megatron.engine.build import build_components
from sad3_megatron.engine.checkpoint import (
    TensorFile,
    is_layout_free,
    latest_checkpoint,
    load_ema,
    load_training_state,
    read_config,
    read_state,
    remove_partial_saves,
    require_intact,
    resume_checkpoint,
    save_checkpoint,
    step_name,
)
from sad3_megatron.engine.consolidate import gather_tensor_parallel, model_tensors, shard_tensor_parallel
from sad3_megatron.engine.distributed import context_parallel_info, data_parallel_info, gradient_group, rank
from sad3_megatron.engine.ema import EMA
from sad3_megatron.engine.flops import peak_tflops, training_flops_per_sequence
from sad3_megatron.engine.guard import GuardedAdamW, StepGuard, injected_fault
from sad3_megatron.engine.hf_import import apply_init_architecture, load_init_weights
from sad3_megatron.engine.lr_schedule import lr_multiplier
from sad3_megatron.engine.mask_noise import MaskEmbeddingNoise
from sad3_megatron.engine.metrics import MetricsLog
from sad3_megatron.engine.mpu import MegatronMPU
from sad3_megatron.engine.optimizer_state import (
    LocalTensors,
    gather_moments,
    optimizer_steps,
    restore_moments,
    restore_weights,
)
from sad3_megatron.engine.pipeline import build_pipeline, pipeline_batch, pipeline_bound, to_canonical, to_local
from sad3_megatron.engine.plan import gradient_accumulation, parameter_count
from sad3_megatron.engine.preemption import clear_marker, stop_on_signals, write_marker
from sad3_megatron.engine.resume import check_same_model, data_state, layout, row_offset
from sad3_megatron.engine.run_lock import lock_run, release_run
from sad3_megatron.engine.schedule_search import ScheduleSearch
from sad3_megatron.model.activation_checkpointing import apply_activation_checkpointing
from sad3_megatron.model.build import build_model, model_parallel_config, prepare_tensor_parallel
from sad3_megatron.model.compile import compile_layers
from sad3_megatron.model.context_parallel import ContextParallelDenoiser
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


def dropout_seed(seed: int, step: int, slot: int, cp_rank: int) -> int:
    """Seed of the dropout masks of one micro-batch slot on one context-parallel rank: the slot's own
    without CP; each CP rank drops on its own rows, so ranks get seeds of their own (with one seed,
    their masks would repeat each other's pattern on different rows)."""
    return (step_seed(seed, step, slot) + cp_rank * 0x9E3779B97F4A7C15) % 2**63


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


def _optimizer(model: torch.nn.Module, cfg: Config, guard: StepGuard) -> torch.optim.Optimizer:
    t = cfg.train

    def matrix(p: torch.nn.Parameter) -> bool:  # ZeRO-3 partitioned parameters keep their shape in ds_shape
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if matrix(p)]
    no_decay = [p for p in model.parameters() if not matrix(p)]  # norms and biases
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return GuardedAdamW(groups, guard, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), foreach=True)


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
    """The checkpoint to resume from: the newest intact one in the run (auto), none, or an explicit one."""
    if resume == "auto":
        return resume_checkpoint(ckpt_root)
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
    require_intact(path)
    return path


def local_weights(weights: dict[str, torch.Tensor], module: torch.nn.Module, pipeline_layers: int | None) -> dict:
    """Consolidated (TP = 1, whole-model) tensors → this rank's pipeline stage and TP shard."""
    if pipeline_layers is not None:
        weights = to_local(weights, module, pipeline_layers)
    return shard_tensor_parallel(weights, module)


def _micro_batch(corpus, cfg: Config, step: int, slot: int, device: torch.device, row_offset: int = 0):
    """Rows, document ids (None unless packed by document), scored mask (None unless only some tokens
    are scored: chat rows) and noise generator of one micro-batch slot of one step: pure functions of
    (seed, step, slot), hence exact on resume. `row_offset` shifts the rows after a resume with another
    global batch (engine/resume.py)."""
    t = cfg.train
    dp_size = parallel_state.get_data_parallel_world_size()
    # slot = micro-batch × DP + rank: the slot's rows are the global batch's entries slot × micro onwards
    start = step * t.micro_batch_size * t.grad_accum_steps * dp_size + slot * t.micro_batch_size + row_offset
    rows = rows_at(len(corpus.train), start, t.micro_batch_size, cfg.run.seed)
    batch = corpus.train.batch(rows)
    x = torch.as_tensor(batch.tokens, device=device)
    document_ids = None if batch.document_ids is None else torch.as_tensor(batch.document_ids, device=device)
    scored = None if batch.scored is None else torch.as_tensor(batch.scored, device=device)
    return x, document_ids, scored, torch.Generator().manual_seed(step_seed(cfg.run.seed, step, slot))


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    val: dict | None
    stopped_early: bool = False  # a stop signal ended the run before train.steps (a checkpoint holds it)

    def val_line(self) -> str:
        v = self.val
        return held_out_words(v["nelbo_per_token"], v["ppl"], v["exact"]) if v else "no held-out evaluation"


@dataclass
class StepOutcome:
    loss: torch.Tensor  # summed over this rank's micro-batches
    grad_norm: float | None
    skipped: bool


def schedule_state(schedule: NoiseSchedule | None) -> dict | None:
    """The training noise schedule as checkpoint client state (a search may have changed it)."""
    return None if schedule is None else dataclasses.asdict(schedule)  # name, t_min (β), t_max (ω), ...


class Trainer:
    """Alg. 1 through a DeepSpeed engine, in the pieces the algorithm has: set up (`__init__`), one
    optimizer step (`train_step`), logging, evaluation (and its `on_evaluate` hook), checkpoints.

    State that changes during training and must survive a resume lives here and in
    `client_state`: step, tokens, EMA, skipped-step counters and the noise schedule (β, ω)."""

    def __init__(self, cfg: Config):
        cfg = apply_init_architecture(cfg)  # a run that starts from a checkpoint takes its architecture
        self.cfg, t = cfg, cfg.train
        self.run_dir = Path(cfg.run.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.pipelined = cfg.parallel.pipeline_parallel > 1
        parts = build_components(cfg, with_model=False)
        self.lock = lock_run(self.run_dir)  # one job per run directory; released when run() ends
        if rank() == 0:
            for debris in remove_partial_saves(self.ckpt_root):
                print(f"sad3: removed {str(debris)!r}, left by an interrupted save", file=sys.stderr)
        self.device, self.objective, self.spec = parts.device, parts.objective, parts.spec
        self.schedule: NoiseSchedule | None = getattr(self.objective, "schedule", None)  # AR: none
        self.pipeline_layers = self.spec.model.num_layers if self.pipelined else None
        self.dp_rank, self.dp_size = data_parallel_info()
        self.cp_rank, self.cp_size = context_parallel_info()
        self.is_main = rank() == 0
        t.grad_accum_steps = gradient_accumulation(cfg, self.dp_size)  # from train.global_batch_size when set
        self.amp = autocast_dtype(t.precision, self.device)
        self.zero3 = cfg.parallel.zero_stage == 3
        # ZeRO-1/2/3 check the gradient norm themselves; under ZeRO-0 the guard does (engine/guard.py).
        self.guard = StepGuard(self.device, check_grads=cfg.parallel.zero_stage == 0, enabled=t.nonfinite_guard)
        self.resume_from = _resume_point(t.resume, self.ckpt_root, self.run_dir)
        if self.resume_from is not None:  # before the data and the engine: a refusal comes at once
            check_same_model(read_config(self.resume_from), cfg, self.resume_from)
        self.engine, self.scheduler = self._build_engine(parts.tokenizer)
        self.mask_noise = self._mask_noise(parts.tokenizer.mask_id)
        # What the objective runs: the engine, or under context parallelism this rank's rows of it.
        self.denoiser = ContextParallelDenoiser(self.engine) if self.cp_size > 1 else self.engine
        self.search = None
        if cfg.diffusion.schedule_search != "off":
            self.search = ScheduleSearch.from_config(cfg, parallel_state.get_data_parallel_group())
        self.start_step, self.tokens_seen = 0, 0
        self.skipped_steps, self.consecutive_skips = 0, 0
        self.global_batch = t.micro_batch_size * t.grad_accum_steps * self.dp_size
        self.row_offset = 0  # nonzero after a resume with another global batch
        if t.init_from and self.resume_from is None:
            load_init_weights(self.engine.module, t.init_from, self.spec.model, self.spec.padded_vocab_size, self.zero3,
                              self.pipeline_layers)  # fmt: skip
            refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
            if refresh is not None:  # ZeRO keeps fp32 master copies made at initialize: take the loaded weights
                refresh()
        self.ema = EMA(self.engine.module, t.ema_decay) if t.ema_decay > 0 else None
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self._announce(parts.tokenizer)

    def _build_engine(self, tokenizer):
        cfg, t, spec = self.cfg, self.cfg.train, self.spec
        ds_config = deepspeed_config(cfg, self.amp)
        parallel_ranks = cfg.parallel.tensor_parallel > 1 or self.cp_size > 1
        mpu = MegatronMPU() if parallel_ranks and not self.pipelined else None
        sequence_parallel = cfg.parallel.sequence_parallel
        if self.pipelined:
            model = build_pipeline(spec, model_parallel_config(sequence_parallel), self.objective, cfg.run.seed)
            model = model.to(self.device)
            prepare_tensor_parallel(model, sequence_parallel)
        else:
            # Under ZeRO-3 each layer's weights are partitioned as soon as it is built: no rank ever
            # holds the whole model, which is what lets the largest presets start at all. Partitioned
            # over the data × context-parallel group, the one gradients are averaged over: over the
            # world group, zero.Init would broadcast TP rank 0's shard of every parameter to the other
            # TP ranks.
            with deepspeed.zero.Init(
                config_dict_or_path=ds_config, mpu=mpu, mem_efficient_linear=False, enabled=self.zero3,
                data_parallel_group=gradient_group(),
            ):
                model = build_model(spec, self.device, sequence_parallel)
        if t.fp8:
            require_fp8(self.device)
            enable_fp8(model)
        apply_activation_checkpointing(model, t.activation_checkpointing)  # from outside the model, like fp8
        if t.compile:
            compile_layers(model)
        self.corpus = load_corpus(cfg.data, tokenizer, cfg.model.seq_len)  # prepares token shards on first use
        optimizer = _optimizer(model, cfg, self.guard)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, t.warmup_steps, t.steps, t.lr_schedule, t.min_lr / t.lr)
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu,
            dist_init_required=False,
        )  # fmt: skip
        self.guard.outer = engine.optimizer
        return engine, scheduler

    def _mask_noise(self, mask_id: int) -> MaskEmbeddingNoise | None:
        """LLaDA2's decaying noise on the [MASK] embedding (engine/mask_noise.py), when configured."""
        d = self.cfg.diffusion
        if d.mask_embedding_noise <= 0:
            return None
        dp_rank, dp_size, seed = self.dp_rank, self.dp_size, self.cfg.run.seed
        return MaskEmbeddingNoise(
            self.engine.module, mask_id, d.mask_embedding_noise, d.mask_embedding_noise_steps,
            lambda step, k: step_seed(seed + 1, step, k * dp_size + dp_rank),  # not the masks' stream
        )  # fmt: skip

    def _restore(self, checkpoint: Path) -> None:
        if is_layout_free(checkpoint):
            state = self._restore_layout_free(checkpoint)
        else:
            state = load_training_state(self.engine, checkpoint)
        self.start_step, self.tokens_seen = state["step"], state["tokens"]
        seq_len = self.cfg.model.seq_len
        self.row_offset = row_offset(state.get("data"), self.start_step, self.global_batch, seq_len, self.is_main)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.consecutive_skips = state.get("consecutive_skips", 0)
        if state.get("schedule") is not None:
            self.schedule = NoiseSchedule(**state["schedule"])
        if self.ema is not None:
            shadow = LocalTensors(load_ema(checkpoint), self.engine.module, self.pipeline_layers)
            self.ema.load_state_dict(shadow, self.engine.module, state["ema_updates"])

    def _restore_layout_free(self, checkpoint: Path) -> dict:
        """Weights, fp32 master weights, Adam moments and step count, LR schedule and the engine's
        counters from a layout-free checkpoint, into whatever layout this run has (every rank)."""
        state = read_state(checkpoint)
        module, layers = self.engine.module, self.pipeline_layers
        restore_weights(self.engine, module, TensorFile(checkpoint / "model.safetensors"), layers)
        moments = TensorFile(checkpoint / "optimizer.safetensors")
        restore_moments(self.engine, module, moments, state["optimizer_steps"], layers)
        self.scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # what the scheduler set after the last step saved
        self.engine.global_steps, self.engine.skipped_steps = state["step"], state["skipped_steps"]
        self.engine.global_samples = state["data"]["rows"]
        now = layout(self.cfg, self.dp_size, self.global_batch)
        if self.is_main and state.get("layout") != now:
            written = _layout_text(state.get("layout"))
            print(f"sad3 train: {checkpoint.name} was written on {written}; resuming on {_layout_text(now)}", flush=True)
        return state

    def _announce(self, tokenizer) -> None:
        if not self.is_main:
            return
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        clear_marker(self.run_dir)
        (self.run_dir / "data_stats.json").write_text(json.dumps(vars(self.corpus.stats), indent=1))
        n_params = parameter_count(cfg, tokenizer.vocab_size)  # the whole model, whatever the layout
        resumed = f", resuming from {self.resume_from.name}" if self.resume_from else ""
        print(
            f"sad3 train: {cfg.model.preset} model, {n_params / 1e6:.2f}M parameters, L={cfg.model.seq_len}, "
            f"objective={cfg.diffusion.objective}, L'={cfg.diffusion.block_size}, {len(self.corpus.train)} train / "
            f"{len(self.corpus.val)} val sequences, device={self.device.type}, dp={self.dp_size}"
            f"{f', cp={self.cp_size}' if self.cp_size > 1 else ''}{resumed}",
            flush=True,
        )
        switches = adaptation_switches(cfg.diffusion)
        if switches:
            print(f"sad3 train: adaptation switches: {switches}", flush=True)
        report = self.corpus.stats.skipped.get("report")  # chat data: malformed lines, by file and line
        if report:
            print(f"sad3 train: {report}", file=sys.stderr if self.corpus.stats.skipped.get("malformed_lines") else sys.stdout,
                  flush=True)  # fmt: skip

    # ---- one optimizer step ----------------------------------------------------------------------

    def train_step(self, step: int, logging_step: bool) -> StepOutcome:
        """Forward, backward and (unless the guard skips it on every rank) the optimizer step of
        step `step` (0-based); its micro-batches and noise depend on (seed, step, slot) only."""
        done = step + 1
        if injected_fault("sigterm", done):
            os.kill(os.getpid(), signal.SIGTERM)
        self.guard.reset()
        if self.mask_noise is not None:
            self.mask_noise.begin(step)
        skipped_before = self.engine.skipped_steps
        poison = float("nan") if injected_fault("nan_loss", done) else 1.0
        if self.pipelined:
            loss_sum, grad_norm = self._pipeline_step(step, poison), None
        else:
            loss_sum, grad_norm = self._accumulated_step(step, poison, logging_step)
        skipped = self.engine.skipped_steps > skipped_before
        if not skipped:
            if self.ema is not None:
                self.ema.update(self.engine.module)
            self.tokens_seen += self.global_batch * self.cfg.model.seq_len
        return StepOutcome(loss_sum, grad_norm, skipped)

    def _pipeline_step(self, step: int, poison: float) -> torch.Tensor:
        """DeepSpeed's engine runs the micro-batches through the stages and steps."""
        t = self.cfg.train
        batches = []
        for micro in range(t.grad_accum_steps):
            x, document_ids, scored, generator = _micro_batch(
                self.corpus, self.cfg, step, micro * self.dp_size + self.dp_rank, self.device, self.row_offset
            )
            batch = self.objective.training_pass(x, generator, self.schedule, scored)
            batch.weights = batch.weights * poison
            batches.append(pipeline_batch(self.objective, batch, document_ids))
        # train_batch returns the mean over micro-batches and ranks
        return self.engine.train_batch(iter(batches)).detach() * t.grad_accum_steps

    def micro_step(self, step: int, micro: int, poison: float = 1.0) -> torch.Tensor:
        """Forward and backward of micro-batch `micro` of step `step` (0-based); returns its loss.

        Under context parallelism every rank of the group reads the same rows and noise and runs its
        share of them (model/context_parallel.py); the loss is the whole micro-batch's on each."""
        slot = micro * self.dp_size + self.dp_rank
        torch.manual_seed(dropout_seed(self.cfg.run.seed, step, slot, self.cp_rank))
        x, document_ids, scored, generator = _micro_batch(self.corpus, self.cfg, step, slot, self.device, self.row_offset)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            terms = self.objective(self.denoiser, x, generator, schedule=self.schedule, document_ids=document_ids,
                                   scored=scored)  # fmt: skip
        loss = terms.loss * poison
        # A CP rank's gradient is its rows' share of the micro-batch's, and DeepSpeed averages gradients
        # over data × context-parallel ranks: C × the share averages to the data-parallel mean.
        self.engine.backward(loss * self.cp_size if self.cp_size > 1 else loss)
        return loss.detach()

    def _accumulated_step(self, step: int, poison: float, logging_step: bool) -> tuple[torch.Tensor, float | None]:
        t, engine = self.cfg.train, self.engine
        loss_sum = torch.zeros((), device=self.device)
        grad_norm = None
        for micro in range(t.grad_accum_steps):
            loss_sum += self.micro_step(step, micro, poison)
            if micro == t.grad_accum_steps - 1:
                self.guard.loss_flag = (~torch.isfinite(loss_sum)).float()  # no host sync: read in the step
                if logging_step:
                    grad_norm = _grad_norm(engine)
            engine.step()
        return loss_sum, grad_norm

    def _count_skip(self, skipped: bool) -> None:
        self.skipped_steps += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0

    def _check_skip_limit(self, done: int) -> None:
        """Consecutive skipped steps end the run: the weights are fine, but training is not progressing."""
        limit = self.cfg.train.max_skipped_steps
        if self.consecutive_skips >= limit:
            last = latest_checkpoint(self.ckpt_root)
            raise Sad3Error(
                f"step {done}: {limit} consecutive optimizer steps had a non-finite loss or gradient norm and were "
                f"skipped (train.max_skipped_steps={limit}): lower train.lr or set train.grad_clip; "
                f"the last checkpoint is {str(last) if last else 'none'}"
            )

    # ---- logging, evaluation, checkpoints --------------------------------------------------------

    def log_step(self, done: int, outcome: StepOutcome, window: dict) -> float:
        """One metrics.jsonl record: loss averaged over the global batch, LR, grad norm, throughput."""
        t, engine = self.cfg.train, self.engine
        loss = outcome.loss / t.grad_accum_steps
        ranks = self.dp_size * self.cp_size  # CP ranks hold the same loss, unless one of them went non-finite
        if ranks > 1 and not self.pipelined:
            dist.all_reduce(loss, group=gradient_group())
            loss /= ranks
        now = time.perf_counter()
        elapsed_window = now - window["start"]
        tflops = self.step_flops * window["steps"] / elapsed_window / self.world / 1e12  # per device
        grad_norm = outcome.grad_norm
        if grad_norm is None and not outcome.skipped:
            grad_norm = _optional_float(engine.get_global_grad_norm())
        loss_value = loss.item()
        self.log.log(
            {
                "step": done,
                "loss": loss_value,
                "lr": self.scheduler.get_last_lr()[0],
                "tflops_per_device": tflops,
                "mfu": tflops / self.peak if self.peak else None,
                "grad_norm": grad_norm,
                "skipped": outcome.skipped,
                "skipped_steps": self.skipped_steps,
                "tokens": self.tokens_seen,
                "mask_noise_std": self.mask_noise.current_std if self.mask_noise is not None else None,
                "tokens_per_s": window["tokens"] / elapsed_window,
                "elapsed": now - self.started,
                "max_rss_gib": _peak_memory_per_rank(),
                "max_gpu_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.device.type == "cuda"
                else None,
            }
        )
        window.update(start=now, tokens=0, steps=0)
        return loss_value

    def evaluate(self) -> dict:
        """The held-out bound (EMA weights when kept) under t ~ U[0, 1], whatever the training schedule."""
        t, engine = self.cfg.train, self.engine
        model = engine if self.pipelined else engine.module
        if self.cp_size > 1:  # each rank of the group scores its rows of the same held-out rows
            model = ContextParallelDenoiser(engine.module)
        with self.ema.applied(engine.module) if self.ema is not None else nullcontext():
            bound = (pipeline_bound if self.pipelined else estimate_bound)(
                model,
                self.objective,
                self.corpus.val,
                self.device,
                batch_size=t.micro_batch_size,
                draws=1,
                seed=self.cfg.run.seed,
                autocast_dtype=self.amp,
                max_sequences=t.eval_batches * t.micro_batch_size,
            )
        return bound.to_dict()

    def on_evaluate(self, step: int, val: dict) -> None:
        """After each evaluation, the data-driven clipped schedule (Sec. 5.3, `diffusion.schedule_search`):
        score the (β, ω) grid on held-out batches with the weights just evaluated (EMA when kept),
        spread over the data-parallel ranks, and train on with the range of least variance. Every
        candidate's variance and the choice go to metrics.jsonl; the choice is saved with every
        checkpoint (client state and the checkpoint's config) and restored on resume."""
        if self.search is None:
            return
        module = self.engine.module
        with self.ema.applied(module) if self.ema is not None else nullcontext():
            result = self.search.run(module, self.objective, self.corpus.val, self.device, step, self.amp)
        self.schedule = result.best
        self.log.log({"step": step, **result.metrics()})
        if self.is_main:
            self.log.bar.write(
                f"step {step}: schedule search ({result.criterion}) picks U[{self.schedule.t_min:g}, "
                f"{self.schedule.t_max:g}] of {len(result.candidates)} ranges"
            )

    def consolidated_weights(self) -> tuple[dict, dict | None]:
        """Model and EMA weights in the TP = 1 layout (collective over TP; ZeRO-3 gathers first)."""
        module, ema = self.engine.module, self.ema
        if self.zero3:  # one parameter at a time: never the whole model gathered on a rank
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
        if self.pipelined:
            weights = to_canonical(weights, self.spec.model.num_layers)
            ema_weights = to_canonical(ema_weights, self.spec.model.num_layers) if ema else None
        return weights, ema_weights

    def client_state(self, step: int) -> dict:
        return {
            "step": step,
            "tokens": self.tokens_seen,
            "ema_updates": self.ema.updates if self.ema else 0,
            "schedule": schedule_state(self.schedule),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "data": data_state(step, self.global_batch, self.row_offset),
            "optimizer_steps": optimizer_steps(self.engine),
            "lr_scheduler": self.scheduler.state_dict(),
            "layout": layout(self.cfg, self.dp_size, self.global_batch),
        }

    def checkpoint(self, step: int) -> None:
        """The layout-free training state (engine/checkpoint.py). Every rank holds the consolidated
        tensors, so all refuse alike if any is not finite."""
        weights, ema_weights = self.consolidated_weights()
        moments = gather_moments(self.engine, self.engine.module, self.pipeline_layers)
        for name, tensors in (("model weights", weights), ("EMA weights", ema_weights or {}), ("Adam moments", moments)):
            if not all(torch.isfinite(v).all() for v in tensors.values()):
                last = latest_checkpoint(self.ckpt_root)
                raise Sad3Error(
                    f"step {step}: the {name} are not finite, so no checkpoint was written; "
                    f"the last checkpoint is {str(last) if last else 'none'}"
                )
        tensors = {"model": weights, "ema": ema_weights, "optimizer": moments}
        save_checkpoint(
            self.ckpt_root, step, self.client_state(step), self.trained_config(), tensors, self.cfg.train.keep_last
        )

    def trained_config(self) -> Config:
        """The run's config with the noise schedule training uses now (a search may have moved it),
        which is what a checkpoint's config.yaml records for evaluation, sampling and the export."""
        s = self.schedule
        if s is None or self.search is None:
            return self.cfg
        diffusion = dataclasses.replace(self.cfg.diffusion, schedule=s.name, beta=s.t_min, omega=s.t_max)
        return dataclasses.replace(self.cfg, diffusion=diffusion)

    # ---- the loop --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, t, spec = self.cfg, self.cfg.train, self.spec
        self.log = MetricsLog(
            self.run_dir / "metrics.jsonl", t.steps, self.start_step, self.is_main, t.progress_bar, t.wandb, cfg
        )
        self.step_flops = self.global_batch * training_flops_per_sequence(spec.model, spec.padded_vocab_size, self.objective)
        self.peak = peak_tflops(self.device, t.peak_tflops)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.started = time.perf_counter()
        window = {"start": self.started, "tokens": 0, "steps": 0}
        loss_value, val, stopped = None, None, False
        self.engine.train()
        with stop_on_signals(self.guard):
            try:
                for step in range(self.start_step, t.steps):
                    done = step + 1
                    logging_step = done % t.log_interval == 0 or done == t.steps
                    outcome = self.train_step(step, logging_step)
                    window["tokens"] += self.global_batch * cfg.model.seq_len
                    window["steps"] += 1
                    self.log.step()
                    stopped = self.guard.stop and done < t.steps
                    self._count_skip(outcome.skipped)
                    if logging_step or outcome.skipped or stopped:
                        loss_value = self.log_step(done, outcome, window)
                    self._check_skip_limit(done)
                    if done % t.eval_interval == 0 or done == t.steps:
                        val = self.evaluate()
                        self._log_eval(done, val)
                        self.on_evaluate(done, val)
                    if done % t.save_interval == 0 or done == t.steps or stopped:
                        self.checkpoint(done)
                    if stopped:
                        self._stopped(done)
                        break
            finally:
                self.log.close()
                if self.lock is not None:
                    self.lock.release()
        if val is None and not stopped and self.start_step >= t.steps:
            val = self.evaluate()
        return TrainResult(self.run_dir, t.steps, loss_value, None if stopped else val, stopped)

    def _log_eval(self, done: int, val: dict) -> None:
        self.log.log(
            {
                "step": done,
                "val_nelbo": val["nelbo_per_token"],
                "val_ppl": val["ppl"],
                "val_exact": val["exact"],
                "elapsed": time.perf_counter() - self.started,
            }
        )

    def _stopped(self, done: int) -> None:
        if self.is_main:
            write_marker(self.run_dir, done)
            print(
                f"sad3 train: stopped by a signal at step {done} of {self.cfg.train.steps}; checkpoint "
                f"{self.ckpt_root / step_name(done)}; run the same command again to resume",
                flush=True,
            )


def _layout_text(layout: dict | None) -> str:
    if not layout:
        return "an unrecorded layout"
    sp = " with sequence parallelism" if layout["sequence_parallel"] else ""
    cp = f" × CP {layout['context_parallel']}" if layout.get("context_parallel", 1) > 1 else ""
    return (
        f"TP {layout['tensor_parallel']}{cp} × PP {layout['pipeline_parallel']} × DP {layout['data_parallel']}{sp}, "
        f"ZeRO-{layout['zero_stage']}, global batch {layout['global_batch']}"
    )


def train(cfg: Config) -> TrainResult:
    """Train (or resume) the run `cfg` describes; see Trainer."""
    try:
        return Trainer(cfg).run()
    finally:
        release_run(Path(cfg.run.out_dir))  # also when setting up failed
