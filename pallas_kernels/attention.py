"""The attention entry point of the model: the `[B, T]` step layout onto a backend.

`reference` is plain jnp (XLA gathers the pages); `pallas` runs our kernels: the
decode kernel for `T == 1` steps, the ragged prefill kernel otherwise (rows
packed by their valid tokens). Which backend `auto` means is decided with the
rest of the engine config (Pallas on GPU, the reference elsewhere); Pallas off
GPU runs in interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.paged_reference import paged_attention_reference
from pallas_kernels.ragged_prefill import ragged_prefill_attention

def _pallas_step_attention(q, k_pool, v_pool, layer, block_tables, positions, sliding_window, *, interpret):
    """q [B, T, N, H], positions [B, T] (-1 = padding) -> [B, T, N, H] through the kernels."""
    B, T, N, H = q.shape
    if T == 1:
        lengths = positions[:, 0] + 1  # an empty slot (-1) has length 0
        out = paged_decode_attention(q[:, 0], k_pool, v_pool, layer, block_tables, lengths,
                                     sliding_window=sliding_window, interpret=interpret)
        return out[:, None]
    valid = (positions >= 0).reshape(-1)
    order = jnp.argsort(~valid, stable=True)  # valid tokens first, each row's in order: the packed layout
    q_lens = (positions >= 0).sum(axis=1)
    cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    kv_lens = positions.max(axis=1) + 1
    packed = ragged_prefill_attention(q.reshape(B * T, N, H)[order], k_pool, v_pool, layer, block_tables,
                                      cu_q_lens, kv_lens, sliding_window=sliding_window, interpret=interpret)
    return jnp.zeros_like(packed).at[order].set(packed).reshape(B, T, N, H)


def step_attention(backend: str):
    """The attention function `forward` calls, for a resolved backend."""
    if backend == "reference":
        return paged_attention_reference
    interpret = jax.default_backend() != "gpu"
    return functools.partial(_pallas_step_attention, interpret=interpret)
