#!/usr/bin/env bash
# The planner's accuracy benchmark of docs/benchmarks.md, on this machine: a cost profile of the server's
# engine size, `jaxinfer bench serve` against `jaxinfer serve` at three rates (scripts/bench_serve_rates.sh),
# a second profile (this machine's speed drifts; the two bracket the runs), then the comparison and its PNG;
# and the same comparison with the profile fitted from the server's own step log of those runs.
# CPU steal time over the whole run is printed last. Usage: bash scripts/plan_accuracy.sh OUT_DIR [RATE...]
set -euo pipefail
out=${1:?usage: plan_accuracy.sh OUT_DIR [RATE...]}
shift
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
steal() { awk '/^cpu /{print $9}' /proc/stat; }
before=$(steal)
profile() {
  "$python" -m jaxinfer.cli bench profile --model configs/smollm2-135m.json --slots 16 --prefill-chunk 128 \
    --max-model-len 256 --repeats 8 --output "$1" | tail -14
}
profile "$out/profile-before.json"
bash scripts/bench_serve_rates.sh "$out/serve" "$@"
profile "$out/profile-after.json"
"$python" -m jaxinfer.cli bench profile --from-log "$out/serve/steps.jsonl" --output "$out/profile-log.json" | tail -14
echo "== predicted from the profiles taken before and after the runs"
"$python" scripts/plan_accuracy.py --profile "$out/profile-before.json" "$out/profile-after.json" \
  --png "$out/plan_accuracy.png" --json "$out/plan_accuracy.json" "$out"/serve/rate-*.json
echo "== predicted from the profile fitted to the server's own steps"
"$python" scripts/plan_accuracy.py --profile "$out/profile-log.json" \
  --png "$out/plan_accuracy_log.png" --json "$out/plan_accuracy_log.json" "$out"/serve/rate-*.json
echo "CPU steal during the run: $(( $(steal) - before )) ticks of 10 ms"
