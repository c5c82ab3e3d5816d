#!/usr/bin/env bash
# The checks of the families added after scripts/gpu_session.sh's time limits were set, for a GPU machine if device
# time remains after it (about 180 s): their model-parity tests (Mixtral, Qwen2-MoE, Qwen3-MoE, Gemma 1/2/3,
# OLMo 2/3, SmolLM3, gpt-oss with its attention sinks, GLM-4.5 and ERNIE 4.5 MoE with their leading dense layers,
# DeepSeek-V3 with its latent attention (the Pallas kernels over a 48-wide latent head padded to 64)
# against transformers on tiny checkpoints, with our Pallas
# kernels compiled, Gemma 2's capped logits and the layers of two kinds among them, and float32 matmuls), then
# scripts/bench_moe.py at the layer shapes of Qwen3-30B-A3B and Mixtral-8x7B in bfloat16: the engine's dense
# experts against `ragged_dot` and the blocked form, which the CPU cannot answer for a GPU (docs/benchmarks.md); last,
# scripts/bench_hybrid_kv.py at Gemma 3 1B's shape in bfloat16 (up to 180 s more): how many more sequences KV
# cache groups run at once in a 1 GiB pool, and what that buys in output tokens/s where a decode step's cost
# hardly grows with its rows.
#   bash scripts/gpu_moe.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 -m pytest -q -o addopts= -p no:cacheprovider \
  tests/test_model_parity.py -k "(moe or mixtral or gemma or olmo or smollm3 or gpt_oss or deepseek) \
  and not logit_bias and not fp8" 2>&1 \
  | tee "$out/gpu_moe_parity.log" | tail -6
parity=${PIPESTATUS[0]}
timeout 30 python3 scripts/bench_moe.py --experts 128 --k 8 --hidden 2048 --width 768 --tokens 64 512 2048 \
  --dtype bfloat16 --repeats 10 2>&1 | tee "$out/bench_moe_qwen3.log" | grep -v Warning
timeout 25 python3 scripts/bench_moe.py --experts 8 --k 2 --hidden 4096 --width 14336 --tokens 64 512 2048 \
  --dtype bfloat16 --repeats 10 2>&1 | tee "$out/bench_moe_mixtral.log" | grep -v Warning
timeout 180 python3 scripts/bench_hybrid_kv.py --layers 26 --hidden 1152 --heads 4 --head-dim 256 --vocab 262144 \
  --window 512 --num-requests 48 --input-len-range 1536 3072 --output-len-range 64 128 --slots 48 --page-size 16 \
  --chunk 512 --max-model-len 3200 --budget-mib 1024 --dtype bfloat16 --json "$out/bench_hybrid_kv.json" 2>&1 \
  | tee "$out/bench_hybrid_kv.log" | tail -6
echo "later families' model parity exit $parity"
