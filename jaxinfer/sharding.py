"""The one place that names mesh axes: the mesh and the logical-axis rules table.

Weights and the KV pool carry logical axes (see the weight table); this module
maps them onto the `('data', 'model')` mesh. Nothing else mentions a mesh axis.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None: replicated). Tensor parallelism splits heads,
# KV heads, the MLP width and the vocabulary over 'model'; slots and KV pages go over 'data'.
RULES: dict[str, str | None] = {
    "layers": None,
    "embed": None,
    "head_dim": None,
    "page": "data",  # each data shard owns an equal slice of the page pool
    "page_slot": None,
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "in_blocks": None,  # an fp8 weight's scales, one per block of in rows: whole on every device (small)
    "mlp_blocks": "model",  # an MXFP4 down projection's blocks of 32 along its in dimension, the MLP width
    "block_bytes": None,  # the 16 bytes of an MXFP4 block
    "scalar": None,  # a learned scalar's one element (Apertus's xIELU)
    "q_lora": None,  # MLA's low-rank q and KV latents (DeepSeek-V3): whole on every device
    "kv_lora": None,
    "experts": None,  # every 'model' device holds its slice of every expert's width (no expert parallelism)
    "vocab": "model",
    "slots": "data",
    "batch": None,  # rows of activations inside a data shard
    "tokens": None,  # query tokens of activations
}


def kv_replicas(num_kv_heads: int, model: int) -> int:
    """Copies of each KV head so the pool splits over `model` devices: 1 when the heads divide among the
    devices; model / K when there are fewer heads than devices (each head then lives on model / K of them,
    as vLLM does)."""
    return model // num_kv_heads if model > num_kv_heads and model % num_kv_heads == 0 else 1


def mesh_problems(shape: tuple[int, int], *, heads: int, kv_heads: int, mlp: int, vocab: int, slots: int,
                  pages: int | None, devices: int | None = None, mlp_name: str = "intermediate_size",
                  shared_mlp: int = 0, mlp_blocks: int = 0, dense_mlp: int = 0) -> list[str]:
    """Every reason the mesh `(data, model)` cannot run this model and engine, said plainly; empty when it can.
    `devices`: how many there are (None: `jax.device_count()`); `mlp_name`: the config field of the MLP's (or
    each expert's) width `mlp`; `shared_mlp`: a shared expert's width (0: none); `mlp_blocks`: MXFP4 blocks of
    32 along the experts' width (0: none), which split over 'model' whole; `dense_mlp`: the width of the dense
    layers that lead a mixture of experts (0: none)."""
    data, model = shape
    devices = jax.device_count() if devices is None else devices
    problems = [f"mesh_shape {shape} needs {data * model} devices, only {devices} available"] \
        if data * model > devices else []
    problems += [f"{name}={size} is not a multiple of the 'model' axis ({model})"
                 for name, size in (("num_attention_heads", heads), (mlp_name, mlp),
                                    ("shared_expert_intermediate_size", shared_mlp), ("intermediate_size", dense_mlp),
                                    ("vocab_size", vocab))
                 if size % model]
    if mlp_blocks % model:
        problems.append(f"{mlp_name}={mlp} makes {mlp_blocks} MXFP4 blocks of 32, not a multiple of the 'model' axis "
                        f"({model})")
    if kv_heads % model and model % kv_heads:
        problems.append(f"num_key_value_heads={kv_heads} neither divides among nor replicates evenly over the "
                        f"'model' axis ({model})")
    if slots % data:
        problems.append(f"max_slots={slots} is not a multiple of the 'data' axis ({data})")
    if pages is not None and pages % data:
        problems.append(f"num_pages={pages} is not a multiple of the 'data' axis ({data})")
    elif pages is not None and pages // data < 2:
        problems.append(f"num_pages={pages} leaves {pages // data} page to each of the {data} data shards, which "
                        f"need at least 2 (a shard's page 0 is its null page): at least {2 * data}")
    return problems


def model_axes() -> tuple[str, ...]:
    """The mesh axes tensor parallelism splits over (where kernels run per device in `shard_map`)."""
    return tuple({RULES["heads"], RULES["kv_heads"]})


def make_mesh(shape: tuple[int, int] = (1, 1), devices=None) -> jax.sharding.Mesh:
    """A `('data', 'model')` mesh over the first data*model devices, with Auto axes."""
    devices = list(devices if devices is not None else jax.devices())
    need = int(np.prod(shape))
    if need > len(devices):
        raise ValueError(f"mesh shape {shape} needs {need} devices, only {len(devices)} available")
    grid = np.asarray(devices[:need]).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes: tuple[str, ...], replicated: tuple[str, ...] = ()) -> PartitionSpec:
    """The mesh placement of logical `axes`; those in `replicated` stay whole on every device."""
    mesh_axes = [None if a in replicated else RULES[a] for a in axes]
    used = [m for m in mesh_axes if m is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {axes} put two dimensions on one mesh axis")
    return PartitionSpec(*mesh_axes)


def logical_sharding(mesh: jax.sharding.Mesh, axes: tuple[str, ...], replicated: tuple[str, ...] = ()) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, replicated))
