#!/usr/bin/env bash
# OpenWebText recipe: pretrain with L' = L = 1024 for 850K steps, then fine-tune L' = 4, 8, 16 for 150K
# steps each, global batch 512, across nodes. Examples:
#   HOSTFILE=launchers/hostfile.example bash launchers/train_owt.sh            # deepspeed --hostfile
#   LAUNCHER=torchrun NNODES=8 NPROC_PER_NODE=8 NODE_RANK=$i MASTER_ADDR=node0 bash launchers/train_owt.sh
#   sbatch launchers/slurm_owt.sbatch                                        # Slurm
#   DRY_RUN=1 HOSTFILE=launchers/hostfile.example bash launchers/train_owt.sh  # print the plan only
# Arguments are the fine-tuning block sizes (default 4 8 16); EXTRA_OVERRIDES adds section.key=value pairs,
# e.g. EXTRA_OVERRIDES="model.preset=xl parallel.tensor_parallel=2 train.micro_batch_size=8".
source "$(dirname "$0")/common.sh"
run_recipe configs/owt.yaml "${RUN_ROOT:-runs/owt}" ${@:-4 8 16}
