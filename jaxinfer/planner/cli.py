"""The planner's commands: `jaxinfer bench profile` and `jaxinfer plan`."""

from __future__ import annotations

import dataclasses
import json
import time

from jaxinfer.config import (HF_OVERRIDES_HELP, QUANTIZATION_FLAGS, EngineConfig, default_decode_buckets,
                             default_prefill_seqs, json_object_arg)

PROFILE_HELP = "a cost profile written by `jaxinfer bench profile`"


def add_profile_parser(kinds) -> None:
    p = kinds.add_parser("profile", help="measure this engine's step cost here and fit the planner's cost model",
                         description="Times the bare jitted step at the shapes the cost model needs, for each "
                                     "slot count, measures host time per dispatch, fits the model and writes it "
                                     "as JSON for `jaxinfer plan`.")
    p.add_argument("--model", default="configs/smollm2-135m.json",
                   help="checkpoint directory, `jaxinfer convert` output or config .json (random weights)")
    p.add_argument("--slots", type=int, nargs="+", default=[8, 16, 32], help="engine sizes to measure")
    p.add_argument("--page-size", type=int, default=EngineConfig.page_size)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", help="the KV cache's dtype, as `serve` takes it")
    p.add_argument("--quantization", "-q", choices=QUANTIZATION_FLAGS, default=None,
                   help="fp8 projections, as `serve --quantization fp8` makes them")
    p.add_argument("--hf-overrides", type=json_object_arg, default=None, help=HF_OVERRIDES_HELP)
    p.add_argument("--repeats", type=int, default=5, help="steps timed back to back per shape")
    p.add_argument("--output", required=True, metavar="PATH", help="where to write the profile (JSON)")
    p.add_argument("--from-log", nargs="+", default=None, metavar="LOG",
                   help="fit from these `jaxinfer serve --step-log` files (the server's own steps) instead of "
                        "timing steps here; the engine options above are then taken from the log")
    p.set_defaults(run=_profile)


def _profile(args) -> None:
    from jaxinfer.planner.profile import describe, profile
    from jaxinfer.planner.steplog import fit_from_logs
    if args.from_log:
        model = fit_from_logs(args.from_log)
    else:
        engine = EngineConfig(page_size=args.page_size, prefill_chunk=args.prefill_chunk,
                              decode_steps=args.decode_steps, max_model_len=args.max_model_len, dtype=args.dtype,
                              kv_cache_dtype=args.kv_cache_dtype, hf_overrides=args.hf_overrides,
                              quantization=args.quantization)
        model = profile(args.model, engine, args.slots, args.repeats)
    model.save(args.output)
    print(describe(model))
    print(f"wrote {args.output}")


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="simulate configurations on a traffic trace; recommend the cheapest within an SLO",
                       description="Runs the real scheduler on a simulated clock driven by a cost profile, for "
                                   "every candidate configuration, and recommends the cheapest that meets the SLO.")
    p.add_argument("--profile", required=True, help=PROFILE_HELP)
    p.add_argument("--trace", default=None, help="a `bench serve --save-result` file or JSON lines of "
                   "{arrival, prompt_len, output_len}; default: generated from the options below")
    p.add_argument("--slo", required=True, help="latency limits in ms, e.g. ttft:2000,tpot:500 (also e2el)")
    p.add_argument("--percentile", type=int, choices=(50, 90, 99), default=90, help="the percentile the SLO limits")
    g = p.add_argument_group("a generated trace (as `bench serve --dataset-name random`)")
    g.add_argument("--request-rate", type=float, default=1.0)
    g.add_argument("--duration", type=float, default=None, help="seconds of traffic (instead of --num-requests)")
    g.add_argument("--num-requests", type=int, default=1000)
    g.add_argument("--input-len", type=int, default=64)
    g.add_argument("--output-len", type=int, default=16)
    g.add_argument("--range-ratio", type=float, default=0.5)
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("candidates (each list is a dimension of the grid)")
    c.add_argument("--slots", type=int, nargs="+", default=None, help="default: the profile's slot counts")
    c.add_argument("--page-sizes", type=int, nargs="+", default=None, help="default: the profile's")
    c.add_argument("--prefill-chunks", type=int, nargs="+", default=None, help="default: the profile's")
    c.add_argument("--decode-steps", type=int, nargs="+", default=[1, 2, 4])
    c.add_argument("--kv-pages", type=int, nargs="+", default=None,
                   help="KV pages per replica; default: the engine's CPU rule (every slot at full length four "
                        "times over, at most 1 GiB)")
    c.add_argument("--tensor-parallel", type=int, nargs="+", default=[1], help="degrees, by the bandwidth model")
    c.add_argument("--max-replicas", type=int, default=64)
    c.add_argument("--max-model-len", type=int, default=None, help="default: the profile's")
    p.add_argument("--price-per-hour", type=float, default=1.0, help="one device's price per hour")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every outcome here")
    p.set_defaults(run=_plan)


def _plan(args) -> None:
    from jaxinfer.planner.costmodel import CostModel
    from jaxinfer.planner.plan import check, engine_grid, parse_slo, profile_platform, recommend, search, table
    from jaxinfer.planner.simulator import Trace
    slo = parse_slo(args.slo)
    model = CostModel.load(args.profile)
    profiled = model.notes.get("engine", {})
    if args.trace:
        trace = Trace.load(args.trace)
    else:
        n = args.num_requests if args.duration is None else max(1, round(args.duration * args.request_rate))
        trace = Trace.generate(args.request_rate, n, args.input_len, args.output_len, args.range_ratio,
                               args.burstiness, args.seed)
    # Pack prompts and branch as the profiled engine did (older profiles: the server's default packing for
    # their backend; they all branched on device).
    packs = profiled.get("max_prefill_seqs") or default_prefill_seqs(model.backend)
    windows = profiled.get("kv_windows")  # the profiled model's KV cache groups (older profiles: one global)
    base = EngineConfig(max_model_len=args.max_model_len or profiled.get("max_model_len", 256),
                        enable_prefix_caching=False, max_prefill_seqs=packs,
                        control_flow=profiled.get("control_flow", "dynamic"),
                        kv_windows=tuple(windows) if windows else None)
    engines = engine_grid(base, args.slots or model.notes.get("slots", [EngineConfig.max_slots]),
                          args.page_sizes or [profiled.get("page_size", EngineConfig.page_size)],
                          args.prefill_chunks or [profiled.get("prefill_chunk", EngineConfig.prefill_chunk)],
                          args.decode_steps, args.kv_pages or [None], model.kv_page_bytes_per_token)
    # Decode-only steps shrink to fewer rows as they would on the profiled platform.
    platform = profile_platform(model)
    engines = [dataclasses.replace(e, decode_buckets=default_decode_buckets(e.max_slots, platform)) for e in engines]
    for note in check(model, engines, trace):
        print(f"# warning: {note}", flush=True)
    print(f"# {len(trace)} requests over {trace.arrivals[-1]:.0f} s; {len(engines)} engine shapes x "
          f"{len(args.tensor_parallel)} TP degrees; SLO p{args.percentile} {slo} ms", flush=True)
    start = time.perf_counter()
    outcomes = search(model, engines, args.tensor_parallel, trace, slo, args.percentile, args.price_per_hour,
                      args.max_replicas, progress=lambda line: print(line, flush=True))
    print(f"\n{len(outcomes)} candidates simulated in {time.perf_counter() - start:.1f}s\n")
    print(table(outcomes, args.percentile))
    best = recommend(outcomes, args.percentile)
    if best is None:
        print(f"\nno candidate meets the SLO with up to {args.max_replicas} replicas: raise --max-replicas or "
              "relax the SLO")
    else:
        print(f"\nrecommended: {best.candidate.label()}: {best.candidate.devices} device(s), "
              f"{best.cost_per_hour:.2f}/h, {best.cost_per_million_tokens:.2f} per million output tokens")
    if args.json:
        records = [{"configuration": o.candidate.label(), "engine": dataclasses.asdict(o.candidate.engine),
                    "replicas": o.candidate.replicas, "tensor_parallel": o.candidate.tensor_parallel,
                    "meets_slo": o.meets_slo, "cost_per_hour": o.cost_per_hour,
                    "cost_per_million_output_tokens": o.cost_per_million_tokens, **o.summary,
                    "kv_usage_over_time": o.kv_timeline[::max(1, len(o.kv_timeline) // 500)].tolist()}
                   for o in outcomes]
        with open(args.json, "w") as f:
            json.dump({"slo_ms": slo, "percentile": args.percentile, "outcomes": records,
                       "recommended": best.candidate.label() if best else None}, f, indent=1, default=str)
