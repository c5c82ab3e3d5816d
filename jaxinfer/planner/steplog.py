"""The engine's own step times, logged while it serves, and the cost model fitted from them.

`StepLog` wraps an executor (the seam the engine dispatches through) and writes one JSON line per
collected step: its `StepShape` and three host clock readings (launch, collect called, result ready). A header line first says what runs
(engine settings, model dimensions, attention backend, device). `jaxinfer serve --step-log PATH`
turns it on; `jaxinfer bench profile --from-log PATH` fits the cost model from it, so the profile
describes the machine as it was during that traffic rather than minutes before.

From the readings (seconds on one monotonic clock):
- a step's device time is `ready - max(launched, previous ready)`, kept only where it is known: the
  step's collect had to wait (so `ready` is when the result arrived) and the previous step's end is
  known too (its collect waited, or it was read before this step was launched);
- host time per step is what the simulated engine loop pays before each dispatch: from step n - 1's
  collect returning to step n + 1's launch (the loop dispatches step n + 1 before reading step n). Its
  median is taken: the few samples that span an idle gap (no requests) are far off.
Host code only; no JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import statistics
import time
from pathlib import Path

from jaxinfer.config import RESOLVED_ATTENTION_BACKENDS, EngineConfig, ModelConfig
from jaxinfer.planner.costmodel import CostModel, StepShape, fit, relative_errors, shape_of

WAITED = 1e-3  # a collect that took longer than this waited for the device
SHAPE_FIELDS = {f.name for f in dataclasses.fields(StepShape)}  # a log from an older version may hold more


class StepLog:
    """An executor that times the one it wraps; `header` holds the model and device facts for the fit."""

    def __init__(self, executor, engine: EngineConfig, path: str | Path, header: dict, clock=time.perf_counter):
        self.executor, self.engine, self.clock = executor, engine, clock
        self.file = open(path, "w", buffering=1)
        self.file.write(json.dumps({"header": {"engine": dataclasses.asdict(engine), **header}}) + "\n")
        self.launched = collections.deque()  # (plan, launch time) of the steps in flight

    def dispatch(self, plan):
        handle = self.executor.dispatch(plan)
        self.launched.append((plan, self.clock()))
        return handle

    def collect(self, handle):
        start = self.clock()
        result = self.executor.collect(handle)
        ready = self.clock()
        plan, launched = self.launched.popleft()
        record = {"shape": dataclasses.asdict(shape_of(plan, self.engine)), "launched": launched,
                  "collect": start, "ready": ready}
        self.file.write(json.dumps(record) + "\n")
        return result

    def close(self) -> None:
        self.file.close()

    def __getattr__(self, name):  # the wrapped executor's other attributes (the server reads `runner`)
        return getattr(self.executor, name)


def log_header(engine: EngineConfig, model: ModelConfig, device: str) -> dict:
    """What `fit_from_logs` needs besides the steps: the model's dimensions and the device."""
    return {"layers": model.num_layers, "hidden": model.hidden_size, "dtype_bytes": 4 if engine.dtype == "float32" else 2,
            "kv_bytes_per_token": engine.kv_bytes_per_page(model, model.num_layers) // engine.page_size,
            "kv_layers_per_page": engine.kv_layout(model).width, "device": device}


@dataclasses.dataclass
class LoggedSteps:
    header: dict
    shapes: list[StepShape]
    seconds: list[float]
    host: list[float]
    records: int


def read_log(path: str | Path) -> LoggedSteps:
    """The device-time samples and host-time samples a step log holds (see the module docstring)."""
    lines = Path(path).read_text().splitlines()
    try:
        header = json.loads(lines[0])["header"]
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (IndexError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a jaxinfer step log ({e})") from e
    shapes, seconds, host = [], [], []
    for i, r in enumerate(records):
        prev = records[i - 1] if i else None
        start = r["launched"] if prev is None else max(r["launched"], prev["ready"])
        start_known = prev is None or prev["ready"] <= r["launched"] or prev["ready"] - prev["collect"] > WAITED
        if r["ready"] - r["collect"] > WAITED and start_known:
            shapes.append(StepShape(**{k: v for k, v in r["shape"].items() if k in SHAPE_FIELDS}))
            seconds.append(r["ready"] - start)
        if i + 1 < len(records) and prev is not None:
            host.append(records[i + 1]["launched"] - prev["ready"])
    return LoggedSteps(header, shapes, seconds, host, len(records))


def fit_from_logs(paths: list[str | Path]) -> CostModel:
    """The cost model fitted to the device times of one or more step logs of the same engine and model."""
    logs = [read_log(p) for p in paths]
    header = logs[0].header
    shapes = [s for log in logs for s in log.shapes]
    seconds = [t for log in logs for t in log.seconds]
    host = [t for log in logs for t in log.host]
    if len(shapes) < 10:
        raise ValueError(f"only {len(shapes)} device-bound steps in {', '.join(map(str, paths))}: "
                         "log more traffic before fitting")
    backend = header["engine"]["attention_backend"]
    if backend not in RESOLVED_ATTENTION_BACKENDS:
        raise ValueError(f"the step log's attention backend {backend!r} is not a resolved one")
    draft = CostModel(fit(shapes, seconds, backend), backend, statistics.median(host) if host else 0.0, 0.0,
                      header["layers"], header["hidden"], header["dtype_bytes"], header["kv_bytes_per_token"],
                      header["device"])
    errors = [abs(e) for e in relative_errors(draft, shapes, seconds)]
    notes = {"source": "step log", "logs": [str(p) for p in paths], "engine": header["engine"],
             "steps": sum(log.records for log in logs), "device_samples": len(shapes), "host_samples": len(host),
             "fit_relative_error": {"median": statistics.median(errors), "max": max(errors)}}
    return dataclasses.replace(draft, notes=notes, kv_layers_per_page=header.get("kv_layers_per_page", 0))
