#!/usr/bin/env bash
# The embedded default: install into .venv, train a tiny SAD3-LM (L' = 4) on the bundled Austen
# corpus on CPU, report its held-out perplexity bound, export it for transformers and draw samples. Extra arguments are config overrides,
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
# Export it as a transformers model, then show what it writes: fixed-length samples, and a
# continuation of a line in the corpus's style (both from the exported directory).
.venv/bin/sad3 export "$out_dir" "$out_dir/hf"
.venv/bin/sad3 sample "$out_dir/hf" --num-tokens 128 --steps 16 --batch-size 3 --ignore-eos --seed 0
.venv/bin/sad3 sample "$out_dir/hf" --num-tokens 96 --steps 16 --ignore-eos --seed 1 \
  --prompt "it is a truth universally acknowledged, that a single man in possession of a good fortune"
echo "demo: done in $(( $(date +%s) - start )) s (after install); run directory: $out_dir"
