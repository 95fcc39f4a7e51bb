#!/usr/bin/env bash
# Turn an AR checkpoint into a SAD3-LM with one of the recipes in configs/adapt/ (docs/adaptation.md), across
# nodes like train_owt.sh (LAUNCHER, HOSTFILE, NNODES, ... from common.sh). Examples:
#   bash launchers/adapt.sh /ckpt/Qwen3-4B configs/adapt/sdar.yaml
#   CHAT_FILES=data/sft.jsonl HOSTFILE=launchers/hostfile.example bash launchers/adapt.sh /ckpt/Qwen2.5-7B-Instruct configs/adapt/fast_dllm_v2.yaml
#   DRY_RUN=1 bash launchers/adapt.sh runs/ar configs/adapt/llada2_curriculum.yaml   # print each stage's plan only
# BASE_DIR: a transformers checkpoint directory (train.init_from; its tokenizer becomes data.tokenizer) or a sad3
# run / checkpoint. The recipe's `curriculum:` stages run in order, each its own run in $RUN_ROOT/<stage>
# initialised from the previous stage's final weights (the first from BASE_DIR), so a block-size curriculum
# restarts the schedule search at every L' and every stage's checkpoints record its L'. Rerunning resumes.
# Environment: RUN_ROOT (default runs/adapt/<recipe>), STAGES (stages to run, in order; default the curriculum),
# CHAT_FILES (comma-separated JSONL, data.chat_files of the stages named sft*), DATA_RECIPE (data.recipe),
# EXTRA_OVERRIDES (section.key=value pairs for every stage).
source "$(dirname "$0")/common.sh"
usage="usage: bash launchers/adapt.sh BASE_DIR RECIPE"
base="${1:?$usage}"
recipe="${2:?$usage}"
name="$(basename "$recipe" .yaml)"
root="${RUN_ROOT:-runs/adapt/$name}"
stages="${STAGES:-$("$SAD3" train "$recipe" --list-stages)}"
shared=()
[[ -f "$base/tokenizer_config.json" ]] && shared+=("data.tokenizer=$base")
[[ -n "${DATA_RECIPE:-}" ]] && shared+=("data.recipe=$DATA_RECIPE")
init="$base"
for stage in $stages; do
  extra=("${shared[@]+"${shared[@]}"}")
  [[ "$stage" == sft* && -n "${CHAT_FILES:-}" ]] && extra+=("data.chat_files=[${CHAT_FILES}]")
  echo "adapt: stage $stage of $recipe from $init -> $root/$stage" >&2
  run_stage "$recipe" --stage "$stage" "run.out_dir=$root/$stage" "run.name=$name-$stage" "train.init_from=$init" \
    ${extra[@]+"${extra[@]}"} ${EXTRA_OVERRIDES:-}
  if stopped_early "$root/$stage"; then exit 0; fi
  init="$root/$stage"
done
