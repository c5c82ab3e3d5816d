"""`jaxinfer bench profile`: measure this engine's step cost on this machine and fit the cost model.

For each slot count asked for, the engine is built at that size and the bare jitted step is timed at
the shapes the cost model needs to tell its terms apart: decode-only dispatches of 1 and
`decode_steps` rounds at the narrowest and the widest block table, and one round with a quarter of
the slots busy at each; mixed steps (a chunk beside one
decode round of every other slot, the engine's prefill step) for every chunk bucket at the narrowest
and widest table that holds it; and the smallest and largest chunk alone. Each shape is timed as
`repeats` steps dispatched back to back (the engine dispatches a step before reading the last, so host
dispatch work overlaps the device), after an untimed run that compiles it.
Host time per dispatch is measured on the real scheduler with an executor that answers at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import time

import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine.pages import pages_for
from jaxinfer.engine.scheduler import PrefillChunk, StepPlan, StepResult
from jaxinfer.planner.costmodel import CostModel, StepShape, fit, relative_errors, shape_of


def _plans(engine: EngineConfig):
    """(kind, plan) for every profiled shape of one engine size."""
    from jaxinfer.bench import decode_plan, prefill_plan
    Z, widths, chunks = engine.page_size, engine.width_buckets(), engine.prefill_buckets()
    for W in sorted({widths[0], widths[-1]}):
        for k in sorted({1, engine.decode_steps}):
            yield "decode", decode_plan(engine, engine.max_slots, W * Z - k, k)
        # A quarter of the slots busy: tells the KV read per token of context from costs per slot of table width.
        yield "decode", decode_plan(engine, max(1, engine.max_slots // 4), W * Z - 1, 1)
    rng = np.random.default_rng(0)
    for C in chunks:
        fitting = [W for W in widths if W * Z >= C]
        for W in sorted({fitting[0], fitting[-1]}):
            yield "mixed", mixed_plan(engine, rng.integers(0, 100, C), W * Z - C)
    for C in sorted({chunks[0], chunks[-1]}):
        yield "prefill", prefill_plan(engine, rng.integers(0, 100, C), 0)


def mixed_plan(engine: EngineConfig, tokens, start: int) -> StepPlan:
    """The engine's prefill step: a chunk into the last slot at positions start.., sampled, beside one
    decode round of every other slot at context `start` (so the block table is as wide as the chunk's)."""
    from jaxinfer.bench import decode_plan, distinct_tables, prefill_plan
    B, Z = engine.max_slots, engine.page_size
    if B < 2:  # no other slot to decode beside the chunk
        return prefill_plan(engine, tokens, start)
    plan = decode_plan(engine, B - 1, start, 1)
    used, per_slot = int(plan.block_tables.max()), pages_for(start + len(tokens), Z)
    if used + per_slot * len(engine.kv_groups) >= engine.num_pages:
        raise ValueError(f"the KV pool ({engine.num_pages} pages) is too small to profile a full mixed step")
    tables = plan.block_tables.copy()
    tables[B - 1] = distinct_tables(engine, [per_slot], used + 1)[0]
    chunk = PrefillChunk(slot=B - 1, tokens=np.asarray(tokens, np.int32), start=start, sample=True, next_tokens=None,
                         load_rows=False)
    return dataclasses.replace(plan, block_tables=tables, prefills=[chunk], num_steps=1)


class InstantExecutor:
    """An executor whose steps take no time: what is left is the host's planning and reading."""

    def dispatch(self, plan):
        return StepResult(np.zeros((max(plan.num_steps, 1), len(plan.positions)), np.int32))

    def collect(self, handle):
        return handle


def time_back_to_back(runner, plan, repeats: int) -> float:
    """Seconds per step when `repeats` copies are dispatched back to back (as the engine dispatches the
    next step before reading the last), after one untimed run."""
    np.asarray(runner.dispatch(plan))  # compiles if needed
    start = time.perf_counter()
    outputs = [runner.dispatch(plan) for _ in range(repeats)]
    np.asarray(outputs[-1])
    return (time.perf_counter() - start) / repeats


def host_seconds_per_dispatch(engine: EngineConfig, vocab: int, requests: int = 64) -> float:
    """Median host time per step of the real engine loop over `requests` random requests."""
    from jaxinfer.engine.engine import Engine
    from jaxinfer.engine.request import SamplingParams
    rng = np.random.default_rng(0)
    host = Engine(engine, InstantExecutor(), vocab)
    longest = engine.max_model_len // 2
    for _ in range(requests):
        prompt = rng.integers(0, vocab, int(rng.integers(1, longest))).tolist()
        host.add_request(prompt, SamplingParams(max_tokens=int(rng.integers(1, longest)), ignore_eos=True),
                         stream=False)
    times = []
    while host.has_work():
        start = time.perf_counter()
        host.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(model: str | None, engine: EngineConfig, slots: list[int], repeats: int) -> CostModel:
    """Measure, fit and describe; prints each measurement as it goes."""
    from jaxinfer.bench import machine
    from jaxinfer.llm import LLM
    shapes: list[StepShape] = []
    seconds: list[float] = []
    samples, hosts = [], []
    for B in slots:
        llm = LLM(model, dataclasses.replace(engine, max_slots=B), warmup=False)
        cfg = llm.engine_config
        for kind, plan in _plans(cfg):
            t = time_back_to_back(llm.runner, plan, repeats)
            shape = shape_of(plan, cfg)
            shapes.append(shape)
            seconds.append(t)
            samples.append({"kind": kind, **dataclasses.asdict(shape), "seconds": t})
            print(f"slots {B:4d}  {kind:7s}  chunk {shape.chunk:5d}  width {shape.width:6d} tokens  "
                  f"rounds {shape.rounds}  {t * 1e3:9.1f} ms", flush=True)
        hosts.append(host_seconds_per_dispatch(cfg, llm.model_config.vocab_size))
        print(f"slots {B:4d}  host time per dispatch {hosts[-1] * 1e3:.2f} ms", flush=True)
    backend = cfg.attention_backend
    coefficients = fit(shapes, seconds, backend)
    host_fixed, host_slot = _line(slots, hosts)
    mc = llm.model_config
    draft = CostModel(coefficients, backend, host_fixed, host_slot, mc.num_layers, mc.hidden_size,
                      4 if cfg.dtype == "float32" else 2, cfg.kv_bytes_per_page(mc, mc.num_layers) // cfg.page_size,
                      machine(), kv_layers_per_page=cfg.kv_layout(mc).width)
    errors = relative_errors(draft, shapes, seconds)
    notes = {"date": datetime.date.today().isoformat(), "model": model, "engine": dataclasses.asdict(cfg),
             "slots": list(slots), "repeats": repeats, "samples": samples, "host_samples": dict(zip(slots, hosts)),
             "fit_relative_error": {"median": float(np.median(np.abs(errors))), "max": float(np.abs(errors).max())}}
    return dataclasses.replace(draft, notes=notes)


def _line(x: list[int], y: list[float]) -> tuple[float, float]:
    """(intercept, slope) >= 0 through the points; a constant with one point."""
    if len(set(x)) < 2:
        return statistics.mean(y), 0.0
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    if slope < 0:
        return statistics.mean(y), 0.0
    return max(float(intercept), 0.0), float(slope)


def describe(model: CostModel) -> str:
    c, e = model.coefficients, model.notes.get("fit_relative_error", {})
    lines = [f"cost model ({model.backend} attention) on {model.device}:",
             "  seconds = dispatch + [C>0] (chunk + C chunk_token + C S_c chunk_attention)"
             " + [C>0, R=0] (chunk_alone + C chunk_alone_token)"
             " + R (round + B round_slot + A round_attention + [xla] B S round_table)"]
    lines += [f"  {name:16s} {value:.3e} s" for name, value in c.items()]
    lines.append(f"  host per dispatch {model.host_seconds * 1e3:.2f} ms + {model.host_seconds_per_slot * 1e3:.3f} ms "
                 "per slot")
    if e:
        lines.append(f"  fit: median relative error {e['median']:.1%}, largest {e['max']:.1%}")
    return "\n".join(lines)
