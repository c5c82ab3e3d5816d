"""`jaxinfer plan`: simulate candidate configurations on a trace and recommend the cheapest that meets the SLO.

A candidate is one replica's engine (slots, page size, prefill chunk, decode rounds per dispatch, KV
pages) times a tensor-parallel degree T and a number of replicas R. Replicas take requests in turn
(round robin), so with identical replicas one replica's share of the trace (every R-th request)
stands for all of them and is the part simulated. A candidate meets the SLO when the chosen percentile
of each limited latency is within its limit; its cost is R * T devices at the given price, reported
per hour and per million output tokens at the throughput it serves. For each engine shape the fewest
replicas that meet the SLO are searched for (`search`); the recommendation is the cheapest such
candidate (ties: the lower latency). Host code only; no JAX.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time

import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.planner.costmodel import CostModel
from jaxinfer.planner.simulator import Trace, simulate

SLO_KEYS = ("ttft", "tpot", "e2el")


def parse_slo(text: str) -> dict[str, float]:
    """'ttft:500,tpot:50' -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slo = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if key not in SLO_KEYS or not ms > 0 or key in slo:
            raise ValueError(f"--slo {text!r}: each part is KEY:MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}, "
                             "each KEY once, and a positive number")
        slo[key] = ms
    if not slo:
        raise ValueError("--slo needs at least one limit, e.g. ttft:500,tpot:50")
    return slo


@dataclasses.dataclass(frozen=True)
class Candidate:
    engine: EngineConfig  # one replica's engine (num_pages set)
    replicas: int = 1
    tensor_parallel: int = 1

    @property
    def devices(self) -> int:
        return self.replicas * self.tensor_parallel

    def label(self) -> str:
        e = self.engine
        packs = f" x{e.max_prefill_seqs} prompts" if e.prompts_per_step > 1 else ""
        return (f"slots {e.max_slots}, page {e.page_size}, chunk {e.prefill_chunk}{packs}, k {e.decode_steps}, "
                f"pages {e.num_pages}, TP {self.tensor_parallel}, replicas {self.replicas}")


@dataclasses.dataclass
class Outcome:
    candidate: Candidate
    summary: dict  # SimResult.summary of one replica
    meets_slo: bool
    cost_per_hour: float
    cost_per_million_tokens: float
    kv_timeline: np.ndarray  # [n, 2] (time, share of KV pages held) of the simulated replica


def replica_share(trace: Trace, replicas: int) -> Trace:
    """Every `replicas`-th request, starting with the first: one replica's part under round robin."""
    if replicas == 1:
        return trace
    pick = slice(0, None, replicas)
    return Trace(trace.arrivals[pick], trace.prompt_lens[pick], trace.output_lens[pick], trace.stationary)


def evaluate(model: CostModel, candidate: Candidate, trace: Trace, slo: dict[str, float], percentile: int,
             price_per_hour: float) -> Outcome:
    share = replica_share(trace, candidate.replicas)
    result = simulate(model, candidate.engine, share, candidate.tensor_parallel)
    summary = {**result.summary(slo), "trace_share": len(share) / len(trace)}  # the simulated replica's part
    latency = summary["latency_ms"]
    # NaN: no request has that latency (a TPOT when every output is one token, which bench serve counts as 0).
    meets = all(not latency[key][percentile] > ms for key, ms in slo.items()) and result.simulated > 0 \
        and not result.overloaded
    per_hour = candidate.devices * price_per_hour
    # The simulated replica's share is the largest when R does not divide N: scale by its part, not by R.
    tokens_per_hour = result.output_throughput / summary["trace_share"] * 3600
    per_million = per_hour / tokens_per_hour * 1e6 if tokens_per_hour > 0 else math.inf
    return Outcome(candidate, summary, meets, per_hour, per_million, result.kv_usage)


def profile_platform(model: CostModel) -> str:
    """The platform ('cpu', 'gpu', 'tpu') the profile was measured on, from its device line as
    `jaxinfer.bench.machine` writes it ('1 cpu device(s) (cpu); host ...')."""
    found = re.match(r"\d+ (\w+) device\(s\)", model.device)
    if found is None:
        raise ValueError(f"the profile's device {model.device!r} does not name its platform as `jaxinfer bench "
                         "profile` writes it (e.g. '1 gpu device(s) (NVIDIA H200); host ...'): the plan needs it to "
                         "size decode steps as that platform does")
    return found.group(1)


def check(model: CostModel, engines: list[EngineConfig], trace: Trace) -> list[str]:
    """Warnings on the plan's inputs: candidates past what the profile measured (the cost model is linear, so
    there it extrapolates: past the measured batch sizes a step may turn compute-bound and cost more than it
    says), and requests the server would refuse. Raises when no request fits."""
    notes, profiled = [], model.notes.get("engine", {})
    measured = {"slots": max(model.notes.get("slots") or [profiled.get("max_slots") or 0]),
                "max_model_len": profiled.get("max_model_len") or 0,
                "prefill chunk": profiled.get("prefill_chunk") or 0}
    asked = {"slots": max(e.max_slots for e in engines), "max_model_len": max(e.max_model_len for e in engines),
             "prefill chunk": max(e.prefill_chunk for e in engines)}
    for name, most in measured.items():
        if most and asked[name] > most:
            notes.append(f"{asked[name]} {name}: the profile measured up to {most}; its costs there are extrapolated")
    for limit in sorted({e.max_model_len for e in engines}):
        refused = int((trace.prompt_lens >= limit).sum())
        if refused == len(trace):
            raise ValueError(f"every request's prompt ({trace.prompt_lens.min()} tokens or more) leaves no room in "
                             f"max_model_len {limit}: raise --max-model-len or shorten the prompts")
        if refused:
            notes.append(f"{refused} of {len(trace)} requests have prompts of max_model_len {limit} tokens or more: "
                         "the server refuses them (400) and the plan leaves them out")
    return notes


def engine_grid(base: EngineConfig, slots, page_sizes, chunks, decode_steps, kv_pages,
                kv_page_bytes_per_token: int = 0) -> list[EngineConfig]:
    """Every combination; KV pages None: what the engine takes on CPU (`EngineConfig.cpu_kv_pages`, for pages
    of `kv_page_bytes_per_token` a token: `CostModel.kv_page_bytes_per_token`)."""
    grid = []
    for B, Z, C, k, P in itertools.product(slots, page_sizes, chunks, decode_steps, kv_pages):
        engine = dataclasses.replace(base, max_slots=B, page_size=Z, prefill_chunk=C, decode_steps=k, num_pages=P)
        if P is None:
            engine = dataclasses.replace(engine, num_pages=engine.cpu_kv_pages(kv_page_bytes_per_token * Z))
        grid.append(engine)
    return grid


def search(model: CostModel, engines: list[EngineConfig], tensor_parallel: list[int], trace: Trace,
           slo: dict[str, float], percentile: int, price_per_hour: float, max_replicas: int,
           progress=print) -> list[Outcome]:
    """For each engine and TP degree, the fewest replicas (up to max_replicas) that meet the SLO: the search
    starts where one replica's served request rate says the traffic needs, adds replicas while the SLO is
    missed and removes them while it is still met. Every simulated candidate is returned."""
    if min(tensor_parallel) < 1 or max_replicas < 1 or not price_per_hour > 0:
        raise ValueError(f"need --tensor-parallel degrees >= 1 (got {tensor_parallel}), --max-replicas >= 1 (got "
                         f"{max_replicas}) and a --price-per-hour > 0 (got {price_per_hour})")
    outcomes = []
    rate = len(trace) / max(float(trace.arrivals[-1]), 1e-9)
    for engine, T in itertools.product(engines, tensor_parallel):
        tried: dict[int, Outcome] = {}

        def at(R: int) -> Outcome:
            if R not in tried:
                start = time.perf_counter()
                tried[R] = evaluate(model, Candidate(engine, R, T), trace, slo, percentile, price_per_hour)
                outcomes.append(tried[R])
                progress(f"{tried[R].candidate.label():90s} {_brief(tried[R], percentile)} "
                         f"({time.perf_counter() - start:.1f}s)")
            return tried[R]

        one = at(1).summary
        served = one["request_throughput"]
        R = min(max_replicas, max(1, math.ceil(rate / served))) if one["overloaded"] and served > 0 else 1
        while not at(R).meets_slo and R < max_replicas:
            R += 1
        while R > 1 and at(R).meets_slo and at(R - 1).meets_slo:
            R -= 1
    return outcomes


def recommend(outcomes: list[Outcome], percentile: int) -> Outcome | None:
    """The cheapest among those meeting the SLO; ties go to the lower p-th percentile TTFT. Each serves the
    whole trace, so the cheapest per hour is the cheapest per output token: their costs per million tokens
    differ beyond that only by when the simulation's last request drained, which says nothing of cost."""
    meeting = [o for o in outcomes if o.meets_slo]
    if not meeting:
        return None
    return min(meeting, key=lambda o: (o.cost_per_hour, o.summary["latency_ms"]["ttft"][percentile]))


def _brief(o: Outcome, percentile: int) -> str:
    lat = o.summary["latency_ms"]
    if o.summary["overloaded"]:
        return "overloaded: the queue grows without bound"
    return (f"TTFT p50/p{percentile} {lat['ttft'][50]:8.1f}/{lat['ttft'][percentile]:8.1f} ms  "
            f"TPOT p50/p{percentile} {lat['tpot'][50]:7.1f}/{lat['tpot'][percentile]:7.1f} ms  "
            f"{'meets' if o.meets_slo else 'misses'} the SLO")


def table(outcomes: list[Outcome], percentile: int) -> str:
    rows = ["| configuration | devices | TTFT p50 / p{0} (ms) | TPOT p50 / p{0} (ms) | E2E p50 (ms) | out tok/s "
            "| goodput (req/s) | KV use mean / max | preemptions | $/h | $/M out tokens | SLO |".format(percentile),
            "| --- | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for o in outcomes:
        s, lat = o.summary, o.summary["latency_ms"]
        whole = 1 / s["trace_share"]  # from the simulated replica to all of them
        rows.append(f"| {o.candidate.label()} | {o.candidate.devices} | {lat['ttft'][50]:.0f} / "
                    f"{lat['ttft'][percentile]:.0f} | {lat['tpot'][50]:.1f} / {lat['tpot'][percentile]:.1f} | "
                    f"{lat['e2el'][50]:.0f} | {s['output_throughput'] * whole:.1f} | "
                    f"{s.get('goodput', 0.0) * whole:.2f} | {s['kv_usage_mean']:.0%} / {s['kv_usage_max']:.0%} | "
                    f"{s['preemptions']} | {o.cost_per_hour:.2f} | {o.cost_per_million_tokens:.2f} | "
                    f"{'meets' if o.meets_slo else 'overloaded' if s['overloaded'] else 'misses'} |")
    return "\n".join(rows)
