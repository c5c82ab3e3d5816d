#!/usr/bin/env bash
# The GPU check of the attention kernels, as one prepared command for a GPU machine (well under 8 minutes):
# the kernel tests compiled for the GPU (no interpret mode), then the decode-attention benchmark, whose
# table is printed last. Run from anywhere; needs jax with CUDA, pytest, transformers and torch.
#   bash scripts/gpu_check.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices(), 'Pallas default: Mosaic GPU' if
  getattr(jax.config, 'jax_pallas_use_mosaic_gpu', None) else 'Pallas default: Triton', '(our kernels ask for Triton)')"
timeout ${KERNEL_TESTS_SECONDS:-150} python3 -m pytest -q -o addopts= -p no:cacheprovider tests/test_pallas_kernels.py 2>&1 | tee "$out/gpu_kernel_tests.log" | tail -15
tests=${PIPESTATUS[0]}
timeout ${BENCH_SECONDS:-270} python3 scripts/bench_attention.py --repeats 10 --out "$out/bench_attention.json"
bench=$?
echo "kernel tests exit $tests, benchmark exit $bench"
exit $(( tests || bench ))
