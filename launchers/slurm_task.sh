#!/usr/bin/env bash
# One Slurm task = one GPU rank: translate Slurm's variables into torch.distributed's, then train.
set -euo pipefail
export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
exec "${PYTHON:-python}" -m sad3_megatron.cli train "$@"
