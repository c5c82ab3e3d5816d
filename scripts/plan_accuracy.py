"""The planner's accuracy: its predictions against `jaxinfer bench serve` measurements of the same traces.

Each results file (`bench serve --save-result`, e.g. from scripts/bench_serve_rates.sh) gives a trace (send
times, prompt and output lengths of its requests) and the measured latencies. The trace is simulated on the
server's engine settings with the given cost profile; the table compares median and p90 TTFT and TPOT, and
the PNG plots predicted against measured percentiles across the request rates.

    python scripts/plan_accuracy.py --profile profile.json --png accuracy.png OUT/rate-1.json OUT/rate-2.json ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from jaxinfer.config import EngineConfig
from jaxinfer.planner.costmodel import CostModel
from jaxinfer.planner.simulator import Trace, simulate

METRICS = ("ttft", "tpot")
STATS = ((50, "median"), (90, "p90"))


def compare(model: CostModel, engine: EngineConfig, path: str) -> dict:
    measured = json.loads(open(path).read())
    result = simulate(model, engine, Trace.load(path), settle=False)
    predicted = result.percentiles()
    rows = {}
    for metric in METRICS:
        for p, name in STATS:
            real, guess = measured[f"{name}_{metric}_ms"], predicted[metric][p]
            rows[f"{name}_{metric}"] = {"measured_ms": real, "predicted_ms": guess, "error": guess / real - 1}
    return {"rate": measured["options"]["request_rate"], "requests": result.simulated, "rows": rows,
            "preemptions": result.preemptions, "kv_usage_max": float(result.kv_usage[:, 1].max())}


def average(models: list[CostModel]) -> CostModel:
    """The profiles' constants averaged: the machine's speed drifts between runs, and a profile taken on each
    side of the measured runs brackets it."""
    coefficients = {name: sum(m.coefficients[name] for m in models) / len(models) for name in models[0].coefficients}
    host = sum(m.host_seconds for m in models) / len(models)
    per_slot = sum(m.host_seconds_per_slot for m in models) / len(models)
    return dataclasses.replace(models[0], coefficients=coefficients, host_seconds=host, host_seconds_per_slot=per_slot)


def plot(comparisons: list[dict], path: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 6), layout="constrained")
    axes = fig.subplots(1, 2)
    rates = [c["rate"] for c in comparisons]
    for ax, metric in zip(axes, METRICS):
        for (_, name), color in zip(STATS, ("tab:blue", "tab:orange")):
            key = f"{name}_{metric}"
            ax.plot(rates, [c["rows"][key]["measured_ms"] for c in comparisons], "o-", color=color,
                    label=f"{name} measured")
            ax.plot(rates, [c["rows"][key]["predicted_ms"] for c in comparisons], "x--", color=color,
                    label=f"{name} predicted")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("jaxinfer plan: predicted against bench serve's measured latency")
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="bench serve --save-result files, one per request rate")
    parser.add_argument("--profile", required=True, nargs="+",
                        help="cost profile(s); several (say, measured before and after the runs) are averaged")
    parser.add_argument("--max-slots", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--prefill-chunk", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=None, help="default: the server's CPU rule")
    parser.add_argument("--png", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    engine = EngineConfig(max_slots=args.max_slots, max_model_len=args.max_model_len, prefill_chunk=args.prefill_chunk,
                          decode_steps=args.decode_steps, page_size=args.page_size)
    model = average([CostModel.load(path) for path in args.profile])
    pages = args.num_pages or engine.cpu_kv_pages(model.kv_bytes_per_token * engine.page_size)
    engine = dataclasses.replace(engine, num_pages=pages)
    comparisons = sorted((compare(model, engine, path) for path in args.results), key=lambda c: c["rate"])
    print("| rate (req/s) | metric | measured (ms) | predicted (ms) | error |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for c in comparisons:
        for key, row in c["rows"].items():
            print(f"| {c['rate']:g} | {key} | {row['measured_ms']:.0f} | {row['predicted_ms']:.0f} | "
                  f"{row['error']:+.1%} |")
    worst = max(abs(row["error"]) for c in comparisons for row in c["rows"].values())
    print(f"largest error {worst:.1%} (target: within 15%)")
    if args.png:
        plot(comparisons, args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(comparisons, f, indent=1)


if __name__ == "__main__":
    main()
