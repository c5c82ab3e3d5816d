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

    def copy(self) -> Histogram:
        twin = Histogram(self.buckets, total=self.total, count=self.count)
        twin.counts = list(self.counts)
        return twin

    def cumulative(self) -> list[int]:
        """Prometheus style: observations <= each bound, the last entry being +Inf."""
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


@dataclasses.dataclass
class RequestMetrics:
    """A request's latencies in seconds, as vLLM splits them (None where it never got that far). For the
    histograms each of n > 1 samples is a request of its own, as in vLLM; a RequestOutput's metrics run from
    the first sample scheduled or given a token to the last token of any."""

    arrival_time: float
    prompt_tokens: int
    generation_tokens: int  # of all its samples
    queue_time: float | None = None  # arrival -> first scheduled
    time_to_first_token: float | None = None  # arrival -> first token
    inter_token_latencies: list[float] = dataclasses.field(default_factory=list)  # one per step that gave tokens
    e2e_latency: float | None = None  # arrival -> finished
    prefill_time: float | None = None  # first scheduled -> first token
    decode_time: float | None = None  # first token -> last token
    inference_time: float | None = None  # first scheduled -> last token
    time_per_output_token: float | None = None  # decode_time over the tokens after the first (0 for one token)


def request_metrics(seqs) -> RequestMetrics:
    """Finished sequences' latencies from their timestamps (vLLM's split of a request's life)."""
    arrival = seqs[0].arrival
    scheduled = min((s.first_scheduled for s in seqs if s.first_scheduled is not None), default=None)
    first = min((s.first_token for s in seqs if s.first_token is not None), default=None)
    m = RequestMetrics(arrival, len(seqs[0].prompt_ids), sum(len(s.output_ids) for s in seqs),
                       e2e_latency=max(s.finished_at for s in seqs) - arrival,
                       inter_token_latencies=[gap for s in seqs for gap in s.token_gaps])
    if scheduled is not None:
        m.queue_time = scheduled - arrival
    if first is not None:
        last = max(s.last_token for s in seqs if s.last_token is not None)
        tokens = max(len(s.output_ids) for s in seqs)
        m.time_to_first_token, m.decode_time = first - arrival, last - first
        m.prefill_time, m.inference_time = first - scheduled, last - scheduled
        m.time_per_output_token = m.decode_time / (tokens - 1) if tokens > 1 else 0.0  # vLLM's 0
    return m


def token_buckets(limit: int) -> tuple[int, ...]:
    """vLLM's buckets for token counts: 1, 2, 5, 10, 20, 50, ... up to `limit`."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > limit:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


@dataclasses.dataclass(frozen=True)
class HistogramSpec:
    name: str  # vLLM's metric name; the server adds its prefix
    help: str
    buckets: tuple[float, ...] | None  # None: token counts, 1-2-5 up to the context length (as vLLM)
    field: str | None = None  # the RequestMetrics field observed when a request finishes; None: observed live


# The request histograms, in the order /metrics lists them.
TTFT, ITL = "time_to_first_token_seconds", "inter_token_latency_seconds"
HISTOGRAMS = (
    HistogramSpec(TTFT, "Arrival to first token.", TTFT_BUCKETS),
    HistogramSpec(ITL, "Gap between a request's successive engine steps that gave it tokens (one per step, "
                  "however many tokens it gave).", ITL_BUCKETS),
    HistogramSpec("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS, "e2e_latency"),
    HistogramSpec("request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS, "queue_time"),
    HistogramSpec("request_prefill_time_seconds", "First scheduled to first token.", REQUEST_BUCKETS,
                  "prefill_time"),
    HistogramSpec("request_decode_time_seconds", "First token to last token.", REQUEST_BUCKETS, "decode_time"),
    HistogramSpec("request_inference_time_seconds", "First scheduled to last token.", REQUEST_BUCKETS,
                  "inference_time"),
    HistogramSpec("request_time_per_output_token_seconds", "Decode time over the tokens after the first (0 for "
                  "a request of one token).", ITL_BUCKETS, "time_per_output_token"),
    HistogramSpec("request_prompt_tokens", "Prompt tokens per finished request.", None, "prompt_tokens"),
    HistogramSpec("request_generation_tokens", "Generated tokens per finished request.", None,
                  "generation_tokens"),
)


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
    histograms: dict[str, Histogram]  # by HISTOGRAMS name


class LatencyHistograms:
    """As in vLLM, time to first token and inter-token gaps are observed as tokens arrive, the rest when a
    request (each of n > 1 samples apart) finishes."""

    def __init__(self, max_model_len: int):
        self.histograms = {spec.name: Histogram(spec.buckets or token_buckets(max_model_len)) for spec in HISTOGRAMS}
        self.finished: dict[str, int] = {}

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def record(self, metrics: RequestMetrics, finish_reason: str) -> None:
        self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
        for spec in HISTOGRAMS:
            value = None if spec.field is None else getattr(metrics, spec.field)
            if value is not None:
                self.observe(spec.name, value)

    def snapshot(self) -> tuple[dict[str, int], dict[str, Histogram]]:
        return dict(self.finished), {name: h.copy() for name, h in self.histograms.items()}
