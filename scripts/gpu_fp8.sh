#!/usr/bin/env bash
# fp8 weights on a GPU machine: the Llama-3-8B-shaped decode step with bf16 projections and with fp8 ones
# (`--quantization fp8`: float8_e4m3fn bits and float32 scales, widened inside the layer scan), side by side in
# one process, at 8 slots (weight reads dominate: what fp8 should halve) and 256 (the offline benchmark's).
# Whether XLA:GPU fuses the widening into the matmuls (fp8 faster) or writes each layer's widened weights out
# first (fp8 slower) is what this measures; the CPU cannot tell (docs/benchmarks.md). About 90 s.
#   bash scripts/gpu_fp8.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
timeout ${FP8_SECONDS:-100} python3 scripts/bench_step.py --config configs/llama-3-8b.json --dtype bfloat16 \
  --batches 8 256 --chunks 512 --context 364 --max-model-len 768 --repeats 5 --skip-load \
  --quantizations none fp8 2>&1 | grep -v Warning | tee "$out/fp8_weights.log"
