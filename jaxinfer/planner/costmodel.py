"""The step-cost model the planner simulates with: what one dispatch of the jitted step costs on a device.

Form (roofline-shaped, linear in its features, every constant fitted and non-negative):

    seconds(dispatch) = t_dispatch
                      + [C > 0] * (t_chunk + C * t_chunk_token + C * S_c * t_chunk_attention)
                      + [C > 0 and R = 0] * (t_chunk_alone + C * t_chunk_alone_token)
                      + R * (t_round + B * t_round_slot + A * t_round_attention + [xla] B * S * t_round_table)

with C the prefill chunk's bucket (0: no chunk), S the block-table width in tokens (the page-width bucket
times the page size), S_c the keys the chunk attends to (S for the reference attention, which attends to the
whole table; for the page loop and the Pallas kernel, the chunk's furthest position + 1), R the decode
rounds of the dispatch, B the rows the step computes (the engine's slots, or a decode-only step's decode
bucket) and A the attention work
of one round: B * S for the plain-jnp reference attention (every row pays the block-table width), the sum
of the active rows' context lengths for the page loop (`xla`) and the Pallas kernel (each row reads its own).
The page loop also pays for its work list and final combine over every slot's table width whatever the
slots hold: the `round_table` term, B * S, for `xla` only. t_round is the weight
read of a decode round (memory-bound), t_round_slot and t_chunk_token the per-token matmul cost
(compute-bound), the attention terms the KV read. The engine's usual prefill step is mixed (a chunk
plus one decode round of the running slots) and the device overlaps part of the two; a chunk with no
round beside it (a prompt's first chunks while nothing decodes) pays the `chunk_alone` terms on top. Host time per dispatch (planning and reading results)
is a line in B: host_seconds + B * host_seconds_per_slot.

Tensor parallelism over T devices (`tensor_parallel`) follows a bandwidth model: every device term is
divided by T (weights, KV and matmuls split T ways) and each layer adds two all-reduces of the step's
activations, each costing `allreduce_latency + 2 (T - 1) / T * bytes / link_bandwidth` (ring all-reduce).
Host code only; no JAX.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxinfer.config import RESOLVED_ATTENTION_BACKENDS, EngineConfig
from jaxinfer.engine.scheduler import StepPlan, step_buckets, step_rounds, step_rows

FEATURES = ("dispatch", "chunk", "chunk_token", "chunk_attention", "chunk_alone", "chunk_alone_token", "round",
            "round_slot", "round_attention", "round_table")
LINK_BANDWIDTH = 450e9  # bytes/s one way per device: NVLink 4 (H100/H200 SXM)
ALLREDUCE_LATENCY = 10e-6  # seconds per all-reduce, a small-message NCCL figure


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What the cost of one dispatch depends on."""

    slots: int  # B
    chunk: int  # C, the chunk's bucket; 0 without a prefill chunk
    width: int  # S, tokens of block-table width
    rounds: int  # R
    context: int  # sum of the decoding rows' context lengths in one round (the KV the page loop and Pallas read)
    chunk_keys: int = 0  # the chunk's furthest position + 1 (0: no chunk, or a step log from before this field)


def shape_of(plan: StepPlan, engine: EngineConfig) -> StepShape:
    C, W = step_buckets(engine, [plan])
    decoding = plan.steps > 0
    lengths = plan.positions[decoding] + 1
    rounds = step_rounds(engine, C, plan.num_steps)
    chunk_keys = max((chunk.start + len(chunk.tokens) for chunk in plan.prefills), default=0)
    return StepShape(step_rows(engine, [plan], C), C, W * engine.page_size, rounds, int(lengths.sum()), chunk_keys)


def features(shape: StepShape, backend: str) -> np.ndarray:
    C, S, R, B = shape.chunk, shape.width, shape.rounds, shape.slots
    attention = B * S if backend == "reference" else shape.context
    chunk_keys = S if backend == "reference" else shape.chunk_keys or S
    table = B * S if backend == "xla" else 0
    alone = C > 0 and R == 0
    return np.array([1.0, C > 0, C, C * chunk_keys, alone, alone * C, R, R * B, R * attention, R * table], np.float64)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Fitted constants (seconds) for FEATURES, plus what they were measured on."""

    coefficients: dict[str, float]
    backend: str  # the attention backend ("reference", "xla" or "pallas"): how attention work is counted
    host_seconds: float = 0.0  # host time per dispatch ...
    host_seconds_per_slot: float = 0.0  # ... plus this per slot
    layers: int = 1  # the model's, for the all-reduce term
    hidden: int = 1
    dtype_bytes: int = 4
    kv_bytes_per_token: int = 0  # K and V over all layers; 0: unknown
    device: str = ""
    notes: dict = dataclasses.field(default_factory=dict)  # what the profile measured (samples, fit error)
    kv_layers_per_page: int = 0  # the layers a KV page holds: a KV cache group's (config.KVLayout); 0: every layer

    @property
    def kv_page_bytes_per_token(self) -> int:
        """Bytes a KV page holds per token: every layer's K and V, or with KV cache groups one group's."""
        return self.kv_bytes_per_token * (self.kv_layers_per_page or self.layers) // self.layers

    def step_seconds(self, shape: StepShape, tensor_parallel: int = 1) -> float:
        x = features(shape, self.backend)
        device = float(np.dot([self.coefficients[name] for name in FEATURES], x))
        if tensor_parallel == 1:
            return device
        T = tensor_parallel
        rows = shape.rounds * shape.slots + shape.chunk  # activation rows all-reduced, 2 per layer
        per_byte = 2 * (T - 1) / T / LINK_BANDWIDTH
        comm = 2 * self.layers * ((shape.rounds + (shape.chunk > 0)) * ALLREDUCE_LATENCY
                                  + rows * self.hidden * self.dtype_bytes * per_byte)
        return (device - self.coefficients["dispatch"]) / T + self.coefficients["dispatch"] + comm

    def host(self, slots: int) -> float:
        return self.host_seconds + slots * self.host_seconds_per_slot

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        try:
            data = json.loads(Path(path).read_text())
            model = cls(**data)
            missing = [name for name in FEATURES if name not in model.coefficients]
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"cannot read the cost profile {path}: {e}") from e
        if missing or model.backend not in RESOLVED_ATTENTION_BACKENDS:
            raise ValueError(f"{path} is not a jaxinfer cost profile (missing {missing or 'a valid backend'})")
        return model


def fit(shapes: list[StepShape], seconds: list[float], backend: str) -> dict[str, float]:
    """Non-negative least squares on relative error (each sample weighted by 1 / its time), by scipy's
    Lawson-Hanson solver (scipy comes with JAX)."""
    from scipy.optimize import nnls
    X = np.array([features(s, backend) for s in shapes])
    y = np.asarray(seconds, np.float64)
    coef, _ = nnls(X / y[:, None], np.ones_like(y))
    return {name: float(c) for name, c in zip(FEATURES, coef)}


def relative_errors(model: CostModel, shapes: list[StepShape], seconds: list[float]) -> np.ndarray:
    predicted = np.array([model.step_seconds(s) for s in shapes])
    return predicted / np.asarray(seconds) - 1
