#!/usr/bin/env bash
# The embedded default: install into .venv, train a tiny SAD3-LM (L' = 4) on the bundled Austen
# corpus on CPU, report its held-out perplexity bound and draw a sample. Extra arguments are config overrides,
# e.g. `bash launchers/demo.sh diffusion.block_size=128` for MDLM.
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory install
out_dir="runs/demo"
for arg in "$@"; do
  case "$arg" in run.out_dir=*) out_dir="${arg#run.out_dir=}" ;; esac
done
start=$(date +%s)
.venv/bin/sad3 train configs/demo.yaml "$@"
.venv/bin/sad3 eval "$out_dir" --split val --draws 8
.venv/bin/sad3 sample "$out_dir" --num-tokens 256 --steps 16 --seed 0
echo "demo: done in $(( $(date +%s) - start )) s (after install); run directory: $out_dir"
