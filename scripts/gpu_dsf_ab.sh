#!/usr/bin/env bash
# One A/B for a GPU machine: the Llama-3-8B-shaped bf16 decode step (256 slots at the 1,000-request
# workload's mean context of 364, k=4) with XLA's defaults, then with `--xla_gpu_enable_dynamic_slice_fusion`.
# Why: the layers run as a scan over stacked weights, and each layer's weights are a dynamic slice of them.
# Where XLA:GPU does not fold that slice into the cuBLAS call (dynamic-slice fusion, off by default in
# XLA until mid-2026), it copies the layer's weights before every matmul: about 16 GB written and read
# again per decode round, beside the 16 GB the round must read. On the 2-core CPU the same copies cost
# about 18 ms of a 130 ms round (docs/benchmarks.md). Each half is its own process (XLA reads its flags
# once) with a limit of AB_SECONDS (45 s); if the installed XLA does not know the flag, the second half
# fails at start-up.
#   bash scripts/gpu_dsf_ab.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
step=(python3 scripts/bench_step.py --config configs/llama-3-8b.json --dtype bfloat16 --batches 256
      --chunks 512 --context 364 --max-model-len 768 --repeats 5 --skip-load)
for flags in "" "--xla_gpu_enable_dynamic_slice_fusion=true"; do
  echo "## XLA_FLAGS=${flags:-(none)}"
  XLA_FLAGS="${XLA_FLAGS:-} $flags" timeout ${AB_SECONDS:-45} "${step[@]}" 2>&1 | grep -v Warning
done | tee "$out/dynamic_slice_fusion_ab.log"
