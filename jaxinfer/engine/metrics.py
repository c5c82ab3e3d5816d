"""Engine counters and latency histograms, named after vLLM's metrics (the server exports them).

Host code only; no JAX. Written by the engine thread; readers take a snapshot.
"""

from __future__ import annotations

import bisect
import dataclasses

# Bucket upper bounds in seconds, as vLLM uses for the same histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclasses.dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = dataclasses.field(default_factory=list)  # per bucket, plus one for +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[int]:
        """Prometheus style: observations <= each bound, the last entry being +Inf."""
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


@dataclasses.dataclass
class RequestMetrics:
    """Per-request latencies in seconds, as vLLM splits them (None where the request never got that far).
    With n > 1 samples: from the first sample scheduled or given a token to the last token of any."""

    arrival_time: float
    queue_time: float | None = None  # arrival -> first scheduled
    time_to_first_token: float | None = None  # arrival -> first token
    inter_token_latencies: list[float] = dataclasses.field(default_factory=list)  # one per step that gave tokens
    e2e_latency: float | None = None  # arrival -> finished
    prefill_time: float | None = None  # first scheduled -> first token
    decode_time: float | None = None  # first token -> last token
    inference_time: float | None = None  # first scheduled -> last token
    time_per_output_token: float | None = None  # decode_time over the tokens after the first (two or more)


def request_metrics(seqs, now: float) -> RequestMetrics:
    """A finished request's latencies from its sequences' timestamps (vLLM's split of a request's life)."""
    arrival = seqs[0].arrival
    scheduled = min((s.first_scheduled for s in seqs if s.first_scheduled is not None), default=None)
    first = min((s.first_token for s in seqs if s.first_token is not None), default=None)
    m = RequestMetrics(arrival, e2e_latency=now - arrival,
                       inter_token_latencies=[gap for s in seqs for gap in s.token_gaps])
    if scheduled is not None:
        m.queue_time = scheduled - arrival
    if first is not None:
        last = max(s.last_token for s in seqs if s.last_token is not None)
        tokens = max(len(s.output_ids) for s in seqs)
        m.time_to_first_token, m.decode_time = first - arrival, last - first
        m.prefill_time, m.inference_time = first - scheduled, last - scheduled
        m.time_per_output_token = m.decode_time / (tokens - 1) if tokens > 1 else None
    return m


@dataclasses.dataclass
class EngineStats:
    """A snapshot for /metrics and the benchmark."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of pages held by requests (idle cached pages count as free)
    prompt_tokens: int
    generation_tokens: int
    prefill_tokens_computed: int
    preemptions: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    steps: int
    finished_requests: dict[str, int]  # by finish reason
    ttft: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    queue_time: Histogram
    prefill_time: Histogram
    decode_time: Histogram
    inference_time: Histogram
    time_per_output_token: Histogram


# The histograms observed once per finished request, each named as its RequestMetrics field.
FINISHED = ("e2e_latency", "queue_time", "prefill_time", "decode_time", "inference_time", "time_per_output_token")


class LatencyHistograms:
    """As in vLLM, time to first token and inter-token gaps are observed as tokens arrive, the rest when a
    request finishes."""

    def __init__(self):
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token_latency = Histogram(ITL_BUCKETS)
        self.e2e_latency = Histogram(REQUEST_BUCKETS)
        self.queue_time = Histogram(REQUEST_BUCKETS)
        self.prefill_time = Histogram(REQUEST_BUCKETS)
        self.decode_time = Histogram(REQUEST_BUCKETS)
        self.inference_time = Histogram(REQUEST_BUCKETS)
        self.time_per_output_token = Histogram(ITL_BUCKETS)
        self.finished: dict[str, int] = {}

    def record(self, metrics: RequestMetrics, finish_reason: str) -> None:
        self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
        for name in FINISHED:
            value = getattr(metrics, name)
            if value is not None:
                getattr(self, name).observe(value)
