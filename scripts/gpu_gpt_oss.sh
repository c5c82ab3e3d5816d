#!/usr/bin/env bash
# gpt-oss-20b's shape on a GPU machine: its decode step with bf16 experts and with MXFP4 ones (held 4-bit, as the
# Hub ships them, widened inside the layer scan), side by side in one process, at 8 slots (weight reads dominate:
# what 4-bit experts should cut) and 64, both with random weights. Whether XLA:GPU fuses the widening into the
# expert matmuls or writes each layer's widened experts out first is what this measures; on the CPU the widening
# costs (docs/benchmarks.md). Both models together take about 56 GB. About 4 minutes.
#   bash scripts/gpu_gpt_oss.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
timeout ${GPT_OSS_SECONDS:-300} python3 scripts/bench_step.py --config configs/gpt-oss-20b.json --dtype bfloat16 \
  --batches 8 64 --chunks 512 --context 364 --max-model-len 768 --repeats 3 --skip-load \
  --quantizations none mxfp4 2>&1 | grep -v Warning | tee "$out/gpt_oss_mxfp4.log"
