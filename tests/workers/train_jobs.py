"""Run several `sad3 train` command lines, one after another, in one torchrun launch (so their
process group and imports are paid for once): `torchrun ... train_jobs.py JOBS.json`, where JOBS.json
is a list of jobs, each the arguments of `sad3 train`, or {"resave": arguments}: set the run up
(resuming its checkpoint) and save it again at once, without training, or {"argv": arguments,
"fault": $SAD3_FAULT_INJECT, "exit": code}: a run expected to end with that exit code. Megatron-core's parallel
state and DeepSpeed's record of it are reset before each job, so jobs may differ in tensor and
pipeline parallelism. Exits non-zero at the first job that fails (its exit code), printing which."""

import json
import os
import sys
from pathlib import Path

from deepspeed.utils import groups
from megatron.core import parallel_state

from sad3_megatron.cli import main
from sad3_megatron.config import load_config
from sad3_megatron.engine.distributed import shutdown_distributed
from sad3_megatron.engine.guard import FAULT_ENV
from sad3_megatron.engine.run_lock import release_run
from sad3_megatron.engine.trainer import Trainer


def resave(argv: list[str]) -> None:
    """The checkpoint a run resumes from, as loaded on this layout and saved again."""
    cfg = load_config(argv[0], argv[1:])
    trainer = Trainer(cfg)
    trainer.checkpoint(trainer.start_step)
    release_run(Path(cfg.run.out_dir))


for job in json.loads(open(sys.argv[1]).read()):
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    groups.mpu = None  # DeepSpeed keeps the last engine's model-parallel unit (a pipeline's grid)
    for name in ("_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)
    groups._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = groups._MPU_TENSOR_MODEL_PARALLEL_RANK = None
    if isinstance(job, dict) and "resave" in job:
        resave(job["resave"])
        continue
    argv, expected = (job["argv"], job["exit"]) if isinstance(job, dict) else (job, 0)
    os.environ[FAULT_ENV] = job.get("fault", "") if isinstance(job, dict) else ""
    code = main(["train", *argv])
    if code != expected:
        print(f"train_jobs: job ended with exit code {code}, not {expected}: {job}", file=sys.stderr)
        sys.exit(code or 1)
shutdown_distributed()
