"""Plain-jnp paged attention: the reference every attention kernel is tested against.

Queries of any shape `[B, T]` (decode: T=1; a prefill chunk: B=1) attend to the
keys their sequence has in the page pool, read through the block tables; the
chunk's own keys must already be written. Padding queries have position -1 and
give 0. Keys no query can see add nothing, whatever their page holds (a recycled
page's tail may hold inf, and 0 x inf is NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash import capped, f32_operands
from pallas_kernels.kv_storage import widened

_MASKED = -1e30  # finite, so a fully masked (padding) row's softmax is not NaN


def gather_pages(pool: jax.Array, layer: jax.Array, block_tables: jax.Array) -> jax.Array:
    """pool [L, K, P, Z, H], block_tables [B, P'] -> [B, K, S=P'*Z, H] for one layer."""
    pages = pool[layer, :, block_tables]  # advanced indices split by a slice: [B, P', K, Z, H]
    B, P, K, Z, H = pages.shape
    return pages.transpose(0, 2, 1, 3, 4).reshape(B, K, P * Z, H)


def attention_mask(positions: jax.Array, num_keys: int, sliding_window: int | None) -> jax.Array:
    """positions [B, T] -> [B, T, S]: causal (key position <= query position), optional window."""
    key_pos = jnp.arange(num_keys)[None, None, :]
    query_pos = positions[:, :, None]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= query_pos - key_pos < sliding_window
    return mask


def paged_attention_reference(q, k_pool, v_pool, layer, block_tables, positions,
                              sliding_window: int | None = None, softcap: float | None = None, sinks=None):
    """q [B, T, N, H]; pools [L, K, P, Z, H]; block_tables [B, P']; positions [B, T] -> [B, T, N, H]; logits
    capped at +-softcap when given. `sinks` [N] (gpt-oss's attention sinks): each head's logit of a key that
    every query sees, which takes its share of the softmax and adds nothing to the output."""
    B, T, N, H = q.shape
    k = widened(gather_pages(k_pool, layer, block_tables), q.dtype)  # [B, K, S, H]
    v = widened(gather_pages(v_pool, layer, block_tables), q.dtype)
    K = k.shape[1]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", *f32_operands(qg, k), preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)  # no TF32 on GPU: the kernels are checked against it
    scores = capped(scores * H ** -0.5, softcap)
    mask = attention_mask(positions, k.shape[2], sliding_window)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    else:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, K, N // K, 1, 1), scores.shape[:-1] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1].astype(v.dtype)
    v = jnp.where(mask.any(axis=1)[:, None, :, None], v, 0)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", *f32_operands(probs, v), preferred_element_type=jnp.float32,
                     precision=jax.lax.Precision.HIGHEST)
    out = jnp.where(mask.any(axis=2)[:, :, None, None, None], out, 0)  # a query that sees no key
    return out.reshape(B, T, N, H).astype(q.dtype)
