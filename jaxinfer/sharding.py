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
# KV heads, the MLP width and the vocabulary over 'model'; slots go over 'data'.
RULES: dict[str, str | None] = {
    "layers": None,
    "embed": None,
    "head_dim": None,
    "page": None,
    "page_slot": None,
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "slots": "data",
}


def make_mesh(shape: tuple[int, int] = (1, 1), devices=None) -> jax.sharding.Mesh:
    """A `('data', 'model')` mesh over the first data*model devices, with Auto axes."""
    devices = list(devices if devices is not None else jax.devices())
    need = int(np.prod(shape))
    if need > len(devices):
        raise ValueError(f"mesh shape {shape} needs {need} devices, only {len(devices)} available")
    grid = np.asarray(devices[:need]).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes: tuple[str, ...]) -> PartitionSpec:
    mesh_axes = [RULES[a] for a in axes]
    used = [m for m in mesh_axes if m is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {axes} put two dimensions on one mesh axis")
    return PartitionSpec(*mesh_axes)


def logical_sharding(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes))
