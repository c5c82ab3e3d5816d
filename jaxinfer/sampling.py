"""Token sampling on device, one row per sequence.

Each row's randomness comes from its own seed folded with the position of the
token being sampled, so a seeded sample never depends on what else is in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_key(seed: jax.Array, position: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), position)


def sample(logits: jax.Array, temperature: jax.Array, seed: jax.Array, position: jax.Array) -> jax.Array:
    """logits [B, V] float32; temperature [B] (0 = greedy); seed, position [B] -> tokens [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(_row_key)(seed, position)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
