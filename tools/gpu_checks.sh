#!/usr/bin/env bash
# The checks and measurements that need a GPU, as one script of at most 10 minutes: throughput and MFU
# of the 110M model (L = 1024, L' = 4 against MDLM; bf16, fp8, compiled layers, chunked loss, activation
# checkpointing), of the 1.4B `xl` preset (DiT block) and of the 1.2B llama-style `llama3.2-1b` preset
# (RMSNorm, SwiGLU, grouped-query attention, tied 128,256-row table), the output layer's memory, the
# GPU-only paths against their references (pytest -m gpu, context parallelism's Flex kernels included),
# sampling speed (KV cache, batches, confident vs AR), and a short run of the real trainer and sampler.
#   bash tools/gpu_checks.sh [out_dir]
# Each check's exit status is recorded in OUT_DIR/status.txt and the script exits 1 if any failed;
# the measured rows are collected in OUT_DIR/compass.md (one markdown table).
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
COMPASS="$OUT_DIR/compass.md"
printf '| setting | variant | step | tokens/s | MFU | ratio | peak memory |\n|---|---|---|---|---|---|---|\n' > "$COMPASS"

check "throughput: 110M, L=1024, batch 16" "$OUT_DIR/bench.txt" \
  timeout 150 $PY tools/bench_training.py --preset small --seq-len 1024 --batch-size 16 --rounds 8 --warmup 3 \
    --variants bd3:flex:bf16,mdlm:flex:bf16,bd3:flex:bf16:compile+chunk,mdlm:flex:bf16:compile+chunk,bd3:flex:bf16:ckpt-selective,bd3:flex:fp8:compile \
    --markdown "$COMPASS"

check "throughput: 1.4B xl, L=1024, batch 8" "$OUT_DIR/bench_xl.txt" \
  timeout 90 $PY tools/bench_training.py --preset xl --seq-len 1024 --batch-size 8 --vocab-size 50258 --rounds 4 \
    --warmup 2 --variants bd3:flex:bf16,bd3:flex:fp8:compile+chunk --markdown "$COMPASS"

check "throughput: 1.2B llama3.2-1b (GQA 32/8, SwiGLU, tied), L=1024, batch 4" "$OUT_DIR/bench_llama.txt" \
  timeout 70 $PY tools/bench_training.py --preset llama3.2-1b --seq-len 1024 --batch-size 4 --vocab-size 128256 \
    --rounds 4 --warmup 2 --variants bd3:flex:bf16 --markdown "$COMPASS"

check "output layer: full logits vs chunked loss (16 x 1024 tokens, GPT-2 vocabulary)" "$OUT_DIR/output_layer.txt" \
  timeout 30 $PY tools/bench_output_layer.py --tokens 16384 --hidden 768 --vocab 50304 --bf16

# Includes context parallelism's kernels (each rank's rows on Flex against the unsplit attention); a CP
# step itself needs two GPUs (NCCL puts one rank on a device).
check "GPU-only paths against their references" "$OUT_DIR/pytest_gpu.txt" \
  timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py

printf '\n| sampling | setting | speed | ratio / NFEs |\n|---|---|---|---|\n' >> "$COMPASS"
check "sampling: KV cache, batches 1/16/64, confident vs AR (110M, 1024 tokens)" "$OUT_DIR/sampling.txt" \
  timeout 55 $PY tools/bench_sampling.py --preset small --seq-len 1024 --num-tokens 1024 --block-size 16 \
    --steps 16 --batches 1,16,64 --markdown "$COMPASS"

RUN=$(mktemp -d)/run
check "the trainer on the GPU (DeepSpeed engine, bf16, bundled corpus)" "$OUT_DIR/train.txt" \
  timeout 80 $PY -m sad3_megatron.cli train configs/demo.yaml run.out_dir="$RUN" model.preset=small \
    model.seq_len=1024 train.micro_batch_size=16 train.steps=40 train.log_interval=10 train.warmup_steps=5 \
    train.eval_interval=1000 train.save_interval=40 train.precision=bf16 train.progress_bar=false
grep -h '"tokens_per_s"' "$RUN/metrics.jsonl" 2>/dev/null | tail -2
check "the sampler on the GPU" "$OUT_DIR/sample.txt" \
  timeout 30 $PY -m sad3_megatron.cli sample "$RUN" --num-tokens 512 --steps 8 --seed 0 --ignore-eos \
    --out "$OUT_DIR/samples.json"

echo "== compass"; cat "$COMPASS"
echo "== status"; cat "$STATUS"
exit "$FAILED"
