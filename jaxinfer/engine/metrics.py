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
    """Per-request latencies in seconds (None where the request never got that far)."""

    arrival_time: float
    queue_time: float | None = None  # arrival -> first scheduled
    time_to_first_token: float | None = None
    inter_token_latencies: list[float] = dataclasses.field(default_factory=list)
    e2e_latency: float | None = None


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


class LatencyHistograms:
    def __init__(self):
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token_latency = Histogram(ITL_BUCKETS)
        self.e2e_latency = Histogram(REQUEST_BUCKETS)
        self.queue_time = Histogram(REQUEST_BUCKETS)
        self.finished: dict[str, int] = {}

    def record(self, metrics: RequestMetrics, finish_reason: str) -> None:
        self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
        for hist, value in ((self.ttft, metrics.time_to_first_token), (self.e2e_latency, metrics.e2e_latency),
                            (self.queue_time, metrics.queue_time)):
            if value is not None:
                hist.observe(value)
        for gap in metrics.inter_token_latencies:
            self.inter_token_latency.observe(gap)
