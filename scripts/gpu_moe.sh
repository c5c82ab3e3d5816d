#!/usr/bin/env bash
# The checks of the families added after scripts/gpu_session.sh's time limits were set, for a GPU machine if device
# time remains after it (about 180 s): their model-parity tests (Mixtral, Qwen2-MoE, Qwen3-MoE, Gemma 1/2/3,
# OLMo 2/3, SmolLM3 against transformers on tiny checkpoints, with our Pallas kernels compiled, Gemma 2's capped
# logits and the layers of two kinds among them, and float32 matmuls), then scripts/bench_moe.py at the
# layer shapes of Qwen3-30B-A3B and Mixtral-8x7B in bfloat16: the engine's dense experts against
# `ragged_dot` and the blocked form, which the CPU cannot answer for a GPU (docs/benchmarks.md).
#   bash scripts/gpu_moe.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 120 python3 -m pytest -q -o addopts= -p no:cacheprovider \
  tests/test_model_parity.py -k "(moe or mixtral or gemma or olmo or smollm3) and not logit_bias" 2>&1 \
  | tee "$out/gpu_moe_parity.log" | tail -6
parity=${PIPESTATUS[0]}
timeout 30 python3 scripts/bench_moe.py --experts 128 --k 8 --hidden 2048 --width 768 --tokens 64 512 2048 \
  --dtype bfloat16 --repeats 10 2>&1 | tee "$out/bench_moe_qwen3.log" | grep -v Warning
timeout 25 python3 scripts/bench_moe.py --experts 8 --k 2 --hidden 4096 --width 14336 --tokens 64 512 2048 \
  --dtype bfloat16 --repeats 10 2>&1 | tee "$out/bench_moe_mixtral.log" | grep -v Warning
echo "later families' model parity exit $parity"
