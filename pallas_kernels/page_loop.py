"""Decode attention in plain jnp, one page column at a time: XLA's fast path off GPU.

The reference gathers every slot's pages into one contiguous `[B, K, S, H]` copy and
then reads it twice; on a CPU those passes run at memory speed over tens of MB per
layer. This loop instead walks the block tables page by page (flash-decoding order):
each iteration gathers one page per slot, which stays in cache, and folds it into a
running softmax (max `m`, denominator `l`, weighted sum `acc`). It stops at the last
page any slot uses. Same inputs and results as `paged_decode_reference`, to float32
rounding; on the 2-core CPU it is about 3.5x faster at 32 slots x 768 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def page_loop_decode_attention(q, k_pool, v_pool, layer, block_tables, lengths, *, sliding_window=None):
    """q [B, N, H]; pools [L, K, P, Z, H]; block_tables [B, P']; lengths [B] (0 = empty slot) -> [B, N, H].

    Slot b's query sits at position lengths[b] - 1 and attends to keys 0 .. lengths[b] - 1
    (the last `sliding_window` of them when set). An empty slot returns zeros.
    """
    B, N, H = q.shape
    K, Z = k_pool.shape[1], k_pool.shape[3]
    G = N // K
    qg = q.reshape(B, K, G, H).astype(jnp.float32) * H ** -0.5
    first = 0 if sliding_window is None else lengths - sliding_window  # [B] oldest visible key

    def page(j, carry):
        m, l, acc = carry  # [B, K, G], [B, K, G], [B, K, G, H]
        ids = block_tables[:, j]
        k = k_pool[layer, :, ids].astype(jnp.float32)  # [B, K, Z, H]
        v = v_pool[layer, :, ids].astype(jnp.float32)
        s = jnp.einsum("BKGH,BKZH->BKGZ", qg, k, precision=lax.Precision.HIGHEST)
        key_pos = j * Z + jnp.arange(Z)
        visible = (key_pos[None] < lengths[:, None]) & (key_pos[None] >= jnp.asarray(first)[..., None])  # [B, Z]
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: keep exp() at 0, not NaN
        p = jnp.exp(s - shift[..., None])
        scale = jnp.exp(m - shift)
        pv = jnp.einsum("BKGZ,BKZH->BKGH", p, v, precision=lax.Precision.HIGHEST)
        return m_new, l * scale + p.sum(axis=-1), acc * scale[..., None] + pv

    init = (jnp.full((B, K, G), -jnp.inf), jnp.zeros((B, K, G)), jnp.zeros((B, K, G, H)))
    pages = jnp.minimum((jnp.max(lengths) + Z - 1) // Z, block_tables.shape[1])
    _, l, acc = lax.fori_loop(0, pages, page, init)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return out.reshape(B, N, H).astype(q.dtype)
