"""`/metrics`: the engine's counters in the Prometheus text format, under vLLM's names.

Names are `jaxinfer:` + vLLM's metric name, each labelled with `model_name` as vLLM does,
so dashboards built for vLLM need only the prefix changed.
"""

from __future__ import annotations

from jaxinfer.engine.metrics import HISTOGRAMS, EngineStats, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "jaxinfer:"
FINISH_REASONS = ("stop", "length", "abort")


def format_labels(base: dict, **extra) -> str:
    items = {**base, **extra}
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in items.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _scalar(lines: list[str], name: str, kind: str, help_text: str, value, labels: dict) -> None:
    lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}",
              f"{PREFIX}{name}{format_labels(labels)} {value}"]


def _histogram(lines: list[str], name: str, help_text: str, hist: Histogram, labels: dict) -> None:
    full = PREFIX + name
    lines += [f"# HELP {full} {help_text}", f"# TYPE {full} histogram"]
    bounds = [repr(float(b)) for b in hist.buckets] + ["+Inf"]
    for bound, count in zip(bounds, hist.cumulative()):
        lines.append(f"{full}_bucket{format_labels(labels, le=bound)} {count}")
    lines += [f"{full}_sum{format_labels(labels)} {hist.total}", f"{full}_count{format_labels(labels)} {hist.count}"]


def render(stats: EngineStats, model_name: str, cache_config: dict | None = None) -> str:
    """The Prometheus text; `cache_config` (labels: the KV cache's settings) adds vLLM's `cache_config_info`."""
    labels = {"model_name": model_name}
    lines: list[str] = []
    if cache_config is not None:
        _scalar(lines, "cache_config_info", "gauge", "Information of the engine's KV cache configuration.", 1.0,
                {**labels, **cache_config})
    _scalar(lines, "num_requests_running", "gauge", "Requests with a decode slot (each of n samples apart).",
            stats.num_running, labels)
    _scalar(lines, "num_requests_waiting", "gauge", "Requests queued for a slot (each of n samples apart).",
            stats.num_waiting, labels)
    _scalar(lines, "kv_cache_usage_perc", "gauge", "Fraction of KV pages held by requests (1 = full).",
            stats.kv_usage, labels)
    _scalar(lines, "prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
            stats.prompt_tokens, labels)
    _scalar(lines, "generation_tokens_total", "counter", "Generated tokens.", stats.generation_tokens, labels)
    name = PREFIX + "request_success_total"
    lines += [f"# HELP {name} Finished requests by finish reason (each of n samples apart).",
              f"# TYPE {name} counter"]
    for reason in sorted(set(FINISH_REASONS) | set(stats.finished_requests)):
        lines.append(f"{name}{format_labels(labels, finished_reason=reason)} {stats.finished_requests.get(reason, 0)}")
    _scalar(lines, "num_preemptions_total", "counter", "Sequences preempted to free KV pages.",
            stats.preemptions, labels)
    _scalar(lines, "prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries, labels)
    _scalar(lines, "prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
            stats.prefix_cache_hits, labels)
    for spec in HISTOGRAMS:
        _histogram(lines, spec.name, spec.help, stats.histograms[spec.name], labels)
    return "\n".join(lines) + "\n"
