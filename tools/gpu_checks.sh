#!/usr/bin/env bash
# The checks and measurements that need a GPU, as one script: throughput and MFU of the 110M model
# (L = 1024, L' = 4 against MDLM, bf16 and fp8), the GPU-only paths against their references
# (pytest -m gpu), and a short run of the real trainer and sampler on the GPU.
#   bash tools/gpu_checks.sh [out_dir]
# Each check's exit status is recorded in OUT_DIR/status.txt; the script exits 1 if any failed.
set -uo pipefail
OUT_DIR=${1:-gpu_checks_out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS="$OUT_DIR/status.txt"
: > "$STATUS"
FAILED=0

# check NAME LOG CMD...: run CMD (output shown, warnings filtered, and saved to LOG), record its status.
check() {
  local name="$1" log="$2"; shift 2
  echo "== $name"
  "$@" 2>&1 | grep -v -i warn | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "$name: $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")" >> "$STATUS"
  [[ $rc == 0 ]] || FAILED=1
}

nvidia-smi -L; $PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'

check "throughput: 110M, L=1024, batch 16" "$OUT_DIR/bench.txt" \
  timeout 240 $PY tools/bench_training.py --preset small --seq-len 1024 --batch-size 16 --rounds 20 --warmup 3 \
    --variants bd3:flex:bf16,mdlm:flex:bf16,bd3:sdpa:bf16,bd3:flex:fp8,mdlm:flex:fp8

check "GPU-only paths against their references" "$OUT_DIR/pytest_gpu.txt" \
  timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py

RUN=$(mktemp -d)/run
check "the trainer on the GPU (DeepSpeed engine, bf16, bundled corpus)" "$OUT_DIR/train.txt" \
  timeout 120 $PY -m sad3_megatron.cli train configs/demo.yaml run.out_dir="$RUN" model.preset=small \
    model.seq_len=1024 train.micro_batch_size=16 train.steps=40 train.log_interval=10 train.warmup_steps=5 \
    train.eval_interval=1000 train.save_interval=40 train.precision=bf16 train.progress_bar=false
grep -h '"tokens_per_s"' "$RUN/metrics.jsonl" 2>/dev/null | tail -2
check "the sampler on the GPU" "$OUT_DIR/sample.txt" \
  timeout 60 $PY -m sad3_megatron.cli sample "$RUN" --num-tokens 512 --steps 8 --seed 0 --ignore-eos \
    --out "$OUT_DIR/samples.json"

echo "== status"; cat "$STATUS"
exit "$FAILED"
