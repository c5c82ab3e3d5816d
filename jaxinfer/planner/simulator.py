"""The engine on a simulated clock: the real `Scheduler` behind a simulated executor.

`simulate` runs the engine loop of `Engine.step` step for step (take the requests that have arrived,
plan, dispatch the next step, then read the previous one), with the real scheduler making every
decision (admission, chunking, prefix cache, preemption, decode rounds per dispatch) and a
`SimulatedExecutor` in place of the device: a step starts when the host dispatches it and the
previous step is done, and lasts what the cost model says. The host pays the cost model's host time
per dispatch. Token ids are placeholders: every request runs to its output length (as with
`ignore_eos`), and prompts are taken to share no prefix (the prefix cache is off: it would not hit).

A long stationary trace stops early once its medians and p90s have settled (`SETTLE_TOLERANCE`
between checks `SETTLE_EVERY` requests apart), or once its waiting queue has grown at four looks in a row past
`OVERLOAD_QUEUE` (more traffic than the replica can serve: its latency only grows); the result says how
many requests it simulated and whether it was overloaded.
Host code only; no JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine.request import SamplingParams, Sequence
from jaxinfer.engine.scheduler import Scheduler, StepPlan, StepResult
from jaxinfer.planner.costmodel import CostModel, shape_of

SETTLE_EVERY = 2000  # requests between two checks of a long trace's percentiles
SETTLE_TOLERANCE = 0.02  # relative change of every reported percentile below which the run has settled
OVERLOAD_EVERY = 256  # steps between two looks at the waiting queue of a long trace
OVERLOAD_QUEUE = 256  # a queue longer than this (and than 8 x slots) that grew at each of 3 looks: overloaded
PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class Trace:
    """Requests in arrival order: seconds from the start, prompt and output lengths in tokens."""

    arrivals: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    stationary: bool = False  # generated from one rate and distribution: may stop once settled

    def __len__(self) -> int:
        return len(self.arrivals)

    @classmethod
    def generate(cls, rate: float, num_requests: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                 burstiness: float = 1.0, seed: int = 0) -> "Trace":
        """The requests `jaxinfer bench serve --dataset-name random` sends with token-id prompts and the same
        seed: its schedule (gamma gaps of mean 1 / rate, burstiness 1: Poisson; the last at n / rate) and its
        lengths, uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]."""
        from jaxinfer.bench_serve import arrival_times, sample_lengths
        if not (rate > 0 and burstiness > 0 and num_requests >= 1 and input_len >= 1 and output_len >= 1
                and 0 <= range_ratio < 1):
            raise ValueError("a generated trace needs rate > 0, burstiness > 0, at least 1 request, lengths >= 1 and "
                             f"0 <= range ratio < 1; got rate={rate}, burstiness={burstiness}, "
                             f"requests={num_requests}, input_len={input_len}, output_len={output_len}, "
                             f"range_ratio={range_ratio}")
        arrivals = arrival_times(num_requests, rate, burstiness, np.random.default_rng([seed, 1]))
        lens = np.random.default_rng([seed, 0])  # bench serve's stream: its requests for the same seed
        prompts = sample_lengths(input_len, range_ratio, num_requests, lens, at_least=1)
        return cls(arrivals, prompts, sample_lengths(output_len, range_ratio, num_requests, lens, at_least=1),
                   stationary=True)

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """A `jaxinfer bench serve --save-result` file (its successful requests), or JSON lines of
        {"arrival": s, "prompt_len": n, "output_len": n} sorted or not."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the trace {path}: {e}") from e
        try:
            data = json.loads(text)
            requests = [(number, r) for number, r in enumerate(data["requests"]) if r.get("error") is None]
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
            rows = [_row(line, f"{path} line {number}", ("arrival", "prompt_len", "output_len"))
                    for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            rows = [_row(r, f"{path} request {number}", ("send_time", "prompt_tokens", "output_tokens"))
                    for number, r in requests]
        if not rows:
            raise ValueError(f"{path} holds no requests")
        rows.sort(key=lambda r: r[0])
        arrivals, prompt, output = (np.array(column) for column in zip(*rows))
        return cls(arrivals - arrivals[0], prompt, output)


def _row(record, where: str, keys: tuple[str, str, str]) -> tuple[float, int, int]:
    """(arrival, prompt_len, output_len) of one request: a JSON line or a bench serve result's request."""
    try:
        if isinstance(record, str):
            record = json.loads(record)
        arrival, prompt, output = (record[key] for key in keys)
        if not (isinstance(arrival, (int, float)) and math.isfinite(arrival) and type(prompt) is int
                and type(output) is int and prompt >= 1 and output >= 1):
            raise ValueError(f"got {arrival!r}, {prompt!r}, {output!r}")
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: need a JSON object with {', '.join(keys[:2])} and {keys[2]}: finite seconds and "
                         f"two integers >= 1 ({type(e).__name__}: {e})") from None
    return float(arrival), prompt, output


class SimClock:
    """Simulated seconds: the scheduler reads it, the host loop and the executor move it forward."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimulatedExecutor:
    """The executor seam on a simulated device: `dispatch` books the step on the device timeline (it
    starts when dispatched and the previous step is done, and lasts what the cost model says); `collect`
    waits for it, moving the clock to its end, and returns placeholder tokens."""

    def __init__(self, model: CostModel, engine: EngineConfig, clock: SimClock, tensor_parallel: int = 1):
        self.model, self.engine, self.clock, self.tensor_parallel = model, engine, clock, tensor_parallel
        self.device_free = 0.0  # when the device finishes the last dispatched step
        self.busy = 0.0  # seconds the device worked

    def dispatch(self, plan: StepPlan) -> tuple[float, StepResult]:
        seconds = self.model.step_seconds(shape_of(plan, self.engine), self.tensor_parallel)
        self.device_free = max(self.clock.now, self.device_free) + seconds
        self.busy += seconds
        tokens = np.zeros((max(plan.num_steps, 1), len(plan.positions)), np.int32)
        return self.device_free, StepResult(tokens)

    def collect(self, handle: tuple[float, StepResult]) -> StepResult:
        self.clock.now = max(self.clock.now, handle[0])
        return handle[1]


@dataclasses.dataclass
class SimResult:
    """Per-request latencies (seconds) of the simulated requests and what the engine did."""

    ttft: np.ndarray
    tpot_all: np.ndarray  # per request; 0 for a one-token request (as vLLM's goodput counts it)
    e2el: np.ndarray
    output_lens: np.ndarray
    duration: float  # first arrival to last completion
    trace_requests: int
    preemptions: int
    steps: int
    kv_usage: np.ndarray  # [n, 2]: (time, share of usable pages held) after each step
    device_busy: float  # share of the duration the device worked
    prefix_hit_tokens: int = 0
    overloaded: bool = False  # stopped because the queue kept growing: the latencies are lower bounds
    refused: int = 0  # requests whose prompt leaves no room in max_model_len (the server's 400)

    @property
    def simulated(self) -> int:
        """Requests simulated: fewer than the trace's when a long stationary one settled."""
        return len(self.ttft)

    @property
    def tpot(self) -> np.ndarray:
        return self.tpot_all[self.output_lens > 1]

    @property
    def output_throughput(self) -> float:
        return float(self.output_lens.sum()) / self.duration if self.duration > 0 else 0.0

    def percentiles(self) -> dict[str, dict[int, float]]:
        """{'ttft'|'tpot'|'e2el': {p: milliseconds}}."""
        def pct(values):
            return {p: float(np.percentile(values, p)) * 1e3 if len(values) else math.nan for p in PERCENTILES}
        return {"ttft": pct(self.ttft), "tpot": pct(self.tpot), "e2el": pct(self.e2el)}

    def meets(self, slo_ms: dict[str, float]) -> np.ndarray:
        """Per request: meets every SLO ({'ttft'|'tpot'|'e2el': ms})."""
        values = {"ttft": self.ttft, "tpot": self.tpot_all, "e2el": self.e2el}
        ok = np.ones(len(self.ttft), bool)
        for key, ms in slo_ms.items():
            ok &= values[key] * 1e3 <= ms
        return ok

    def goodput(self, slo_ms: dict[str, float]) -> float:
        """Requests per second meeting every SLO."""
        return float(self.meets(slo_ms).sum()) / self.duration if self.duration > 0 else 0.0

    def summary(self, slo_ms: dict[str, float] | None = None) -> dict:
        usage = self.kv_usage[:, 1] if len(self.kv_usage) else np.zeros(1)
        out = {"simulated_requests": self.simulated, "trace_requests": self.trace_requests,
               "duration_s": self.duration, "output_throughput": self.output_throughput,
               "request_throughput": self.simulated / self.duration if self.duration > 0 else 0.0,
               "latency_ms": self.percentiles(), "preemptions": self.preemptions, "steps": self.steps,
               "kv_usage_mean": float(usage.mean()), "kv_usage_max": float(usage.max()),
               "device_busy": self.device_busy, "prefix_hit_tokens": self.prefix_hit_tokens,
               "overloaded": self.overloaded, "refused": self.refused}
        if slo_ms:
            out["goodput"] = self.goodput(slo_ms)
        return out


def simulate(model: CostModel, engine: EngineConfig, trace: Trace, tensor_parallel: int = 1,
             settle: bool = True) -> SimResult:
    """Run `trace` through one engine replica on the simulated clock. With `settle`, a stationary trace
    stops taking new requests into account once its percentiles settle (the run goes on, arrivals
    included so the load stays as it was, until every request before the cut has finished; the result
    covers those), or stops at once when the replica is overloaded."""
    return _Simulation(model, engine, trace, tensor_parallel, settle and trace.stationary).run()


class _Simulation:
    def __init__(self, model: CostModel, engine: EngineConfig, trace: Trace, tensor_parallel: int, settle: bool):
        self.engine = dataclasses.replace(engine, enable_prefix_caching=False)  # distinct prompts: never a hit
        self.trace, self.settle = trace, settle
        self.clock = SimClock()
        self.scheduler = Scheduler(self.engine, clock=self.clock)
        self.executor = SimulatedExecutor(model, self.engine, self.clock, tensor_parallel)
        self.host = model.host(engine.max_slots)
        self.seqs: list[Sequence] = []
        self.kv: list[tuple[float, float]] = []
        self.next = self.refused = self.done = self.checked = 0  # done: seqs[:done] have all finished
        self.cut = math.inf  # seqs[:cut] are the result once they have finished
        self.last: dict | None = None
        self.queues: list[int] = []  # the waiting queue's length at the last looks
        self.looked = 0  # the step count at the last look
        self.overloaded = False

    def run(self) -> SimResult:
        inflight = None
        while self.done < self.cut and (self.next < len(self.trace) or inflight is not None or self.scheduler.has_work()):
            inflight = self._step(inflight)
            if self.settle:
                self._check_settled()
                if self._check_overloaded():
                    break
        result = _result(self.scheduler, self.executor, self.seqs[:min(self.cut, len(self.seqs))], self.kv,
                         len(self.trace))
        result.overloaded, result.refused = self.overloaded, self.refused
        return result

    def _step(self, inflight):
        """One pass of Engine.step: take what has arrived, plan and dispatch the next step, then read the
        previous one. -> what is now in flight."""
        self._take_arrivals()
        plan, scheduler = self.scheduler.schedule(), self.scheduler
        handle = None
        if plan is not None:
            self.clock.now += self.host
            scheduler.counters.steps += 1
            handle = self.executor.dispatch(plan)
        if inflight is not None:
            scheduler.update(inflight[0], self.executor.collect(inflight[1]))
            self.kv.append((self.clock.now, scheduler.pages.num_used / (scheduler.pages.num_pages - 1)))
        while self.done < len(self.seqs) and self.seqs[self.done].finished:
            self.done += 1
        if plan is None and not scheduler.has_work() and self.next < len(self.trace):
            self.clock.now = max(self.clock.now, float(self.trace.arrivals[self.next]))  # idle until the next one
        elif plan is None and inflight is None and scheduler.has_work():
            raise RuntimeError("the scheduler has work but planned no step with nothing in flight")
        return (plan, handle) if plan is not None else None

    def _take_arrivals(self) -> None:
        trace, limit = self.trace, self.engine.max_model_len
        while self.next < len(trace) and trace.arrivals[self.next] <= self.clock.now:
            prompt, wanted = int(trace.prompt_lens[self.next]), int(trace.output_lens[self.next])
            if prompt >= limit:  # the server answers 400: no room to generate
                self.refused += 1
            else:  # as the engine: the output capped by the context left
                new = min(wanted, limit - prompt)
                seq = Sequence(str(self.next), 0, [0] * prompt, SamplingParams(max_tokens=new, ignore_eos=True), 0,
                               new, arrival=float(trace.arrivals[self.next]))
                self.scheduler.add(seq)
                self.seqs.append(seq)
            self.next += 1

    def _check_settled(self) -> None:
        """Every SETTLE_EVERY finished requests: once the percentiles moved less than SETTLE_TOLERANCE,
        requests arriving from now on are left out of the result."""
        if self.cut < math.inf or self.done < self.checked + SETTLE_EVERY:
            return
        self.checked = self.done
        current = _result(self.scheduler, self.executor, self.seqs[:self.done], self.kv, len(self.trace)).percentiles()
        if self.last is not None and _settled(self.last, current):
            self.cut = len(self.seqs)
        self.last = current

    def _check_overloaded(self) -> bool:
        """Every OVERLOAD_EVERY steps, a look at the queue: longer than the bound and growing at 4 looks in a
        row means more traffic than this replica serves."""
        steps = self.scheduler.counters.steps
        if steps < self.looked + OVERLOAD_EVERY:
            return False
        self.looked = steps
        self.queues = (self.queues + [len(self.scheduler.waiting)])[-4:]
        growing = len(self.queues) == 4 and self.queues == sorted(set(self.queues))
        self.overloaded = growing and min(self.queues) > max(OVERLOAD_QUEUE, 8 * self.engine.max_slots)
        return self.overloaded


def _settled(before: dict, after: dict) -> bool:
    """Medians and p90s (p99 needs far more requests to settle) all within SETTLE_TOLERANCE of before."""
    return all(abs(after[m][p] - before[m][p]) <= SETTLE_TOLERANCE * max(abs(before[m][p]), 1e-9)
               for m in before for p in (50, 90) if not math.isnan(before[m][p]))


def _result(scheduler: Scheduler, executor: SimulatedExecutor, seqs: list[Sequence], kv: list, n: int) -> SimResult:
    done = [s for s in seqs if s.finished]
    lens = np.array([len(s.output_ids) for s in done], np.int64)
    ttft = np.array([s.first_token - s.arrival for s in done])
    e2el = np.array([s.last_token - s.arrival for s in done])
    tpot = np.array([(s.last_token - s.first_token) / (m - 1) if m > 1 else 0.0 for s, m in zip(done, lens)])
    start = min((s.arrival for s in done), default=0.0)
    duration = max((s.last_token for s in done), default=0.0) - start
    return SimResult(ttft, tpot, e2el, lens, duration, n, scheduler.counters.preemptions, scheduler.counters.steps,
                     np.array(kv).reshape(-1, 2), executor.busy / duration if duration > 0 else 0.0,
                     scheduler.counters.prefix_hits)
