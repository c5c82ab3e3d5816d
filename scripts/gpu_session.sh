#!/usr/bin/env bash
# Every GPU check the issues ask for, as one prepared command for a lent GPU machine (its stage limits add
# up to 600 s; pytest runs in one process there, `-o addopts=`: two xdist workers would each take 75% of
# the GPU's memory;
# each stage has its own time limit and writes its log to OUTPUT_DIR as it goes, so a stage cut short
# still leaves what it measured):
#   1. scripts/gpu_check.sh: the Pallas kernel tests compiled for the GPU, then the decode-attention benchmark;
#   1b. the decode kernel's tuning sweep at batch 64 x context 2048 (the shape furthest from its target; a
#       knob at a time, 14 settings, none started after 50 s), written as the kernel's tuned table (OUTPUT_DIR/tuned_paged_decode.json: commit it as
#       pallas_kernels/tuned_paged_decode.json), then that shape timed again with the table in place against
#       the bundled kernel;
#   2. jaxinfer bench offline on a Llama-3-8B-shaped random bf16 checkpoint with 1,000 requests: the engine
#      and the bare-step ceiling (transformers and static batching are left out to fit the time), with
#      prompts packed 8 to a step (the default on GPU) into a budget of PREFILL_CHUNK tokens (512);
#   3. the model-parity tests on the GPU: the whole engine with our Pallas kernels (no interpret mode) and
#      float32 matmuls, against transformers on the same tiny checkpoints;
#   4. the sampler's passes at 256 slots x Llama-3's 128,256-token vocabulary (scripts/bench_sampling.py).
#   bash scripts/gpu_session.sh [OUTPUT_DIR]
# If device time remains (it needs about 90 s more), run scripts/gpu_dsf_ab.sh next, on the still-warm
# machine: the 8B decode step with and without XLA's dynamic-slice fusion for the scanned layers' weights;
# then scripts/gpu_moe.sh (about 100 s): the mixture-of-experts families, left out of stage 3 here; then
# scripts/gpu_fp8.sh (about 90 s): the 8B decode step with bf16 and with fp8 weights.
# The engine runs with static control flow (the GPU default: no host syncs inside a step, see
# docs/benchmarks.md, the 8B section); CONTROL_FLOW=dynamic runs the old on-device branching for the
# side-by-side figure.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
KERNEL_TESTS_SECONDS=105 BENCH_SECONDS=120 bash scripts/gpu_check.sh "$out"
check=$?
timeout 70 python3 scripts/bench_attention.py --sweep --batches 64 --contexts 2048 --repeats 5 --seconds 50 \
  --out "$out/attention_sweep.json" --tune "$out/tuned_paged_decode.json" 2>&1 | tee "$out/attention_sweep.log" \
  | grep -v Warning
if [ -f "$out/tuned_paged_decode.json" ]; then  # this copy of the tree only: the session commits it by hand
  cp "$out/tuned_paged_decode.json" pallas_kernels/tuned_paged_decode.json
  timeout 25 python3 scripts/bench_attention.py --batches 64 --contexts 2048 --repeats 10 \
    --out "$out/bench_attention_tuned.json" 2>&1 | tee "$out/bench_attention_tuned.log" | grep -v Warning
fi
# Packed prompts always run one prefill bucket (the whole budget): one step shape per page width.
timeout 210 python3 - "$out" "${PREFILL_CHUNK:-512}" "${CONTROL_FLOW:-static}" <<'EOF' 2>&1 | tee "$out/offline_llama3_8b.log" | grep -v "generating:"
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from jaxinfer.bench import OfflineOptions, offline
from jaxinfer.config import EngineConfig
engine = EngineConfig(max_slots=256, prefill_chunk=int(sys.argv[2]), decode_steps=4, dtype="bfloat16",
                      control_flow=sys.argv[3])
offline(OfflineOptions("configs/llama-3-8b.json", engine, 1000, (32, 512), (32, 256), 0, ("bare",), (8,), 5,
                       f"{sys.argv[1]}/offline_llama3_8b.json"))
EOF
offline=${PIPESTATUS[0]}
# Not the logit-bias parity test: its sampler pass compiles new step shapes, which this time limit did not plan for;
# only the families this limit was set for (Llama, Mistral, Qwen2/3, Phi-3, Granite): scripts/gpu_moe.sh runs the rest.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 40 python3 -m pytest -q -o addopts= -p no:cacheprovider tests/test_model_parity.py \
  -k "not logit_bias and (llama or mistral or qwen or phi3 or granite) and not moe and not fp8" 2>&1 | tee "$out/gpu_model_parity.log" | tail -6
parity=${PIPESTATUS[0]}
timeout 30 python3 scripts/bench_sampling.py --rows 256 --vocab 128256 \
  --kinds greedy random top_p top_k_min_p penalty logprobs 2>&1 | tee "$out/sampling.log"
echo "gpu_check exit $check, model parity exit $parity, offline 8B exit $offline"
