# Shared by the recipe launchers: run `sad3 train` under the DeepSpeed launcher (default), torchrun,
# or inside a Slurm allocation. Settings come from the environment:
#   LAUNCHER   deepspeed | torchrun | slurm                      (default deepspeed)
#   HOSTFILE   DeepSpeed hostfile, "host slots=N" per line        (default launchers/hostfile if present)
#   NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun / multi-node settings
#   SAD3       the sad3 executable                                (default: .venv/bin/sad3, else sad3)
#   DRY_RUN=1  print each stage's resolved plan instead of training
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAUNCHER="${LAUNCHER:-deepspeed}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${SAD3:-}" ]]; then
  if [[ -x .venv/bin/sad3 ]]; then SAD3=.venv/bin/sad3; else SAD3=sad3; fi
fi
PYTHON="$(dirname "$(command -v "$SAD3")")/python"
[[ -x "$PYTHON" ]] || PYTHON=python

world_size() {
  case "$LAUNCHER" in
    deepspeed)
      if [[ -n "${HOSTFILE:-}" && -f "$HOSTFILE" ]]; then
        awk '/slots=/ {split($2, a, "="); n += a[2]} END {print n}' "$HOSTFILE"
      else
        echo "${NPROC_PER_NODE:-1}"
      fi ;;
    torchrun) echo $(( ${NNODES:-1} * ${NPROC_PER_NODE:-1} )) ;;
    slurm) echo "${SLURM_NTASKS:-1}" ;;
  esac
}

# run_stage CONFIG [--stage NAME] [section.key=value ...]
run_stage() {
  local config="$1"; shift
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    "$SAD3" train "$config" "$@" --dry-run --world-size "$(world_size)"
    return
  fi
  case "$LAUNCHER" in
    deepspeed)
      local hosts=()
      [[ -n "${HOSTFILE:-}" ]] && hosts=(--hostfile "$HOSTFILE")
      deepspeed "${hosts[@]}" --master_port "$MASTER_PORT" ${NPROC_PER_NODE:+--num_gpus "$NPROC_PER_NODE"} \
        --module sad3_megatron.cli train "$config" "$@" ;;
    torchrun)
      "$(dirname "$PYTHON")/torchrun" --nnodes "${NNODES:-1}" --nproc_per_node "${NPROC_PER_NODE:-1}" \
        --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" \
        -m sad3_megatron.cli train "$config" "$@" ;;
    slurm)
      srun --kill-on-bad-exit=1 env PYTHON="$PYTHON" MASTER_PORT="$MASTER_PORT" \
        bash "$ROOT/launchers/slurm_task.sh" "$config" "$@" ;;
    *) echo "LAUNCHER must be deepspeed, torchrun or slurm (got $LAUNCHER)" >&2; return 2 ;;
  esac
}

# run_recipe CONFIG RUN_ROOT BLOCK_SIZES...: stage 1 (pretrain, L' = L) once, then stage 2 (finetune) per L'.
run_recipe() {
  local config="$1" root="$2"; shift 2
  run_stage "$config" --stage pretrain "run.out_dir=$root/pretrain" ${EXTRA_OVERRIDES:-}
  for block in "$@"; do
    # Clipped mask rates per block size (Table 7 / Sec. 6.4); re-tune with the variance search as data changes.
    local beta=0.3 omega=0.8
    [[ "$block" == 4 ]] && beta=0.45 omega=0.95
    run_stage "$config" --stage finetune "run.out_dir=$root/finetune-L$block" "train.init_from=$root/pretrain" \
      "diffusion.block_size=$block" "diffusion.beta=$beta" "diffusion.omega=$omega" ${EXTRA_OVERRIDES:-}
  done
}
