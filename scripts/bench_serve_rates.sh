#!/usr/bin/env bash
# The serving benchmark of docs/benchmarks.md: `jaxinfer serve` on a random SmolLM2-135M-shaped checkpoint, then
# `jaxinfer bench serve` at three request rates (below, near and beyond saturation), 200 requests each.
# The server logs its steps to OUT_DIR/steps.jsonl (for `jaxinfer bench profile --from-log`).
# Usage: bash scripts/bench_serve_rates.sh OUT_DIR [RATE...]   (default rates: 1 2 8 requests/s)
set -euo pipefail
out=${1:?usage: bench_serve_rates.sh OUT_DIR [RATE...]}
shift
if [ $# -gt 0 ]; then rates=("$@"); else rates=(1 2 8); fi
mkdir -p "$out"
python=${PYTHON:-.venv/bin/python}
port=${PORT:-8391}
model=${MODEL:-configs/smollm2-135m.json}

"$python" -m jaxinfer.cli -v serve --model "$model" --host 127.0.0.1 --port "$port" --served-model-name smollm2 \
  --max-num-seqs 16 --max-model-len 256 --prefill-chunk 128 --max-queue 1024 --step-log "$out/steps.jsonl" \
  >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
  kill -0 $server 2>/dev/null || { echo "the server died:"; tail -20 "$out/server.log"; exit 1; }
  sleep 2
done
grep -E "loaded|warm-up|ready" "$out/server.log"

# Each rate gets its own prompts (its own seed): with one seed for all, a later rate's prompts would already
# sit in the server's prefix cache from the earlier rates, and its prefill would be mostly skipped.
seed=0
for rate in "${rates[@]}"; do
  seed=$((seed + 1))
  "$python" -m jaxinfer.cli bench serve --base-url "http://127.0.0.1:$port" --num-prompts 200 \
    --request-rate "$rate" --random-input-len 64 --random-output-len 16 --random-range-ratio 0.5 \
    --vocab-size 49152 --goodput ttft:2000 tpot:500 --seed $seed --disable-tqdm \
    --save-result "$out/rate-$rate.json" --plot "$out/rate-$rate.png" | tee "$out/rate-$rate.txt"
done
kill -TERM $server
wait $server
