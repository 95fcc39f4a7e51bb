# Shared by the recipe launchers: run `sad3 train` under the DeepSpeed launcher (default), torchrun,
# or inside a Slurm allocation. Settings come from the environment:
#   LAUNCHER   deepspeed | torchrun | slurm                      (default deepspeed)
#   HOSTFILE   DeepSpeed hostfile, "host slots=N" per line        (default launchers/hostfile if present)
#   NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun / multi-node settings
#   SAD3       the sad3 executable                                (default: .venv/bin/sad3, else sad3)
#   DRY_RUN=1  print each stage's resolved plan instead of training
#   SCHEDULE_SEARCH  elbo | grad | off: the finetune stages' (beta, omega) search   (default elbo)
#   TENSOR_PARALLEL, CONTEXT_PARALLEL, ZERO_STAGE   parallel.tensor_parallel / context_parallel / zero_stage
#              of every stage (unset: the config's); CONTEXT_PARALLEL=C splits the rows of x_t ⊕ x over C
#              ranks (docs/context-parallel.md)
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

# The parallel layout the environment asks for, as overrides.
layout_overrides() {
  [[ -n "${TENSOR_PARALLEL:-}" ]] && echo "parallel.tensor_parallel=$TENSOR_PARALLEL"
  [[ -n "${CONTEXT_PARALLEL:-}" ]] && echo "parallel.context_parallel=$CONTEXT_PARALLEL"
  [[ -n "${ZERO_STAGE:-}" ]] && echo "parallel.zero_stage=$ZERO_STAGE"
  return 0
}

# run_stage CONFIG [--stage NAME] [section.key=value ...]
run_stage() {
  local config="$1"; shift
  set -- "$@" $(layout_overrides)
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

# A stage stopped by SIGTERM/SIGUSR1 (preemption) saved a checkpoint, exited 0 and left a `preempted`
# marker in its run directory: later stages must not start; rerunning the recipe resumes that stage.
stopped_early() { [[ "${DRY_RUN:-0}" != 1 && -e "$1/preempted" ]]; }

# run_recipe CONFIG RUN_ROOT BLOCK_SIZES...: stage 1 (pretrain, L' = L) once, then stage 2 (finetune) per L'.
# Rerunning it resumes: finished stages only reload their final checkpoint.
run_recipe() {
  local config="$1" root="$2"; shift 2
  run_stage "$config" --stage pretrain "run.out_dir=$root/pretrain" ${EXTRA_OVERRIDES:-}
  if stopped_early "$root/pretrain"; then return 0; fi
  for block in "$@"; do
    # Table 7's clipped rates per block size start the stage; the finetune stage's schedule search
    # (diffusion.schedule_search, Sec. 5.3) then re-picks (beta, omega) at every evaluation.
    local beta=0.3 omega=0.8
    [[ "$block" == 4 ]] && beta=0.45 omega=0.95
    run_stage "$config" --stage finetune "run.out_dir=$root/finetune-L$block" "train.init_from=$root/pretrain" \
      "diffusion.block_size=$block" "diffusion.beta=$beta" "diffusion.omega=$omega" \
      "diffusion.schedule_search=${SCHEDULE_SEARCH:-elbo}" ${EXTRA_OVERRIDES:-}
    if stopped_early "$root/finetune-L$block"; then return 0; fi
  done
}
