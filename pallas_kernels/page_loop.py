"""Paged attention in plain jnp, walked page by page: XLA's fast path off GPU.

Decode: a flat list of (slot, page) work items.

The reference gathers every slot's pages into one contiguous `[B, K, S, H]` copy and
then reads it twice; on a CPU those passes run at memory speed over tens of MB per
layer. Here each slot's visible pages become work items, slot after slot, and a loop
takes them `2B` at a time in page-id order: it gathers those pages (one `[K, Z, H]`
block each, read once while it sits in cache) and computes each item's partial
softmax (its max `m`, denominator `l` and weighted sum `acc`), stored at the item's
place in the list. One combine at the end rescales a slot's partials to their common
max and adds them in item order. Page-id order matters on a CPU: the slots' pages
interleave in the pool (slots grow a page at a time side by side), and reading them
slot by slot jumps about the pool; in page-id order the reads mostly move forward.

The work is the sum of the slots' pages, not slots x the longest slot's pages, so a
step with short or empty slots beside a long one pays for what it reads. A slot's
result does not depend on the other slots, bit for bit: its items are computed alone
and summed in the same order wherever they sit in the list.

Prefill: the chunk's queries walk their rows' pages a block at a time (a
running softmax), up to the furthest query's last key. The reference instead
attends to the whole block table, whose width is set by the step's furthest
slot: a 256-token chunk at the start of its prompt, beside one long decoding
slot, paid for 768 keys. Blocks sit at fixed key positions and a block with
nothing visible leaves a row's running sums exactly as they were, so a row's
result does not depend on the other rows or on the table's width, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash import capped, with_sinks
from pallas_kernels.kv_storage import widened


def page_loop_decode_attention(q, k_pool, v_pool, layer, block_tables, lengths, *, sliding_window=None,
                               softcap=None, sinks=None):
    """q [B, N, H]; pools [L, K, P, Z, H]; block_tables [B, W]; lengths [B] (0 = empty slot) -> [B, N, H].

    Slot b's query sits at position lengths[b] - 1 and attends to keys 0 .. lengths[b] - 1
    (the last `sliding_window` of them when set; logits capped at +-softcap when set; each head's attention
    sink [N] in the softmax when set). An empty slot returns zeros.
    """
    B, N, H = q.shape
    K, Z = k_pool.shape[1], k_pool.shape[3]
    W, G, I = block_tables.shape[1], N // K, 2 * B  # I: work items per loop iteration
    qg = q.reshape(B, K, G, H).astype(jnp.float32) * H ** -0.5
    first = jnp.zeros_like(lengths) if sliding_window is None else jnp.maximum(lengths - sliding_window, 0)
    row, col, item_live, total = _work_items(lengths, first, Z, W, extra=I)
    page_ids = jnp.where(item_live, block_tables[row, jnp.clip(col, 0, W - 1)], 0)
    by_page = jnp.argsort(jnp.where(item_live, page_ids, k_pool.shape[2]), stable=True)  # live items first

    def items(i, partials):
        index = lax.dynamic_slice_in_dim(by_page, i * I, I)  # the work items this iteration reads
        r, c, live, ids = row[index], col[index], item_live[index], page_ids[index]
        k = _take(k_pool, layer, ids)  # [I, K, Z, H]
        s = capped(jnp.einsum("IKGH,IKZH->IKGZ", qg[r], k, precision=lax.Precision.HIGHEST), softcap)
        key_pos = c[:, None] * Z + jnp.arange(Z)
        visible = live[:, None] & (key_pos < lengths[r][:, None]) & (key_pos >= first[r][:, None])  # [I, Z]
        v = _zero_unseen(_take(v_pool, layer, ids), visible[:, None, :, None], v_pool.dtype)
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        m = s.max(axis=-1)
        p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)[..., None])  # nothing visible: exp() of -inf, not NaN
        pv = jnp.einsum("IKGZ,IKZH->IKGH", p, v, precision=lax.Precision.HIGHEST)
        return tuple(a.at[index].set(x, unique_indices=True) for a, x in zip(partials, (m, p.sum(-1), pv)))

    T = row.shape[0]
    init = (jnp.full((T, K, G), -jnp.inf), jnp.zeros((T, K, G)), jnp.zeros((T, K, G, H)))
    m, l, acc = lax.fori_loop(0, (total + I - 1) // I, items, init)
    slot = jnp.where(item_live, row, B)  # dead items go to a dropped segment B
    combine = lambda f, x: f(x, slot, num_segments=B + 1, indices_are_sorted=True)[:B]  # noqa: E731
    top = combine(jax.ops.segment_max, m)  # [B, K, G]
    weight = jnp.where(item_live[:, None, None], jnp.exp(m - jnp.where(top == -jnp.inf, 0.0, top)[row]), 0.0)
    l = combine(jax.ops.segment_sum, l * weight)
    acc = combine(jax.ops.segment_sum, acc * weight[..., None])
    acc, l = with_sinks(acc, l, top, None if sinks is None else sinks.reshape(K, G))
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return out.reshape(B, N, H).astype(q.dtype)


def _take(pool, layer, ids):
    """pool[layer, :, ids] as float32. Bits (pallas_kernels/kv_storage.py) widen by integer arithmetic:
    XLA:CPU's own conversion, fused with the gather in this loop, made a bfloat16 pool's decode loop 4-5x
    slower than a float32 one's and an fp8 pool's about 2x (docs/benchmarks.md); a bfloat16 value is the
    high half of a float32, and fp8's 256 values are a table."""
    taken = pool[layer, :, ids]
    if taken.dtype in (jnp.uint16, jnp.bfloat16):
        bits = lax.bitcast_convert_type(taken, jnp.uint16).astype(jnp.uint32)
        return lax.bitcast_convert_type(bits << 16, jnp.float32)
    if taken.dtype.itemsize == 1:
        table = widened(lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), taken.dtype), jnp.float32)
        return table[lax.bitcast_convert_type(taken, jnp.uint8).astype(jnp.int32)]
    return widened(taken, jnp.float32)


def _zero_unseen(v, seen, pool_dtype):
    """`v` with the values of keys no query sees set to 0, for float16 pools. A recycled page's tail can hold
    an earlier request's overflow, inf, and a masked key's weight 0 times inf is NaN. Only float16 overflows
    in practice (bfloat16 and float32 reach 3e38), and the select costs the CPU decode loop about 17%
    (docs/benchmarks.md), so other dtypes skip it. The Pallas kernels always zero them, as vLLM's kernels
    do: one select per loaded block, whose cost on a GPU is not measured yet."""
    return jnp.where(seen, v, 0.0) if pool_dtype == jnp.float16 else v


def _work_items(lengths, first, Z: int, W: int, extra: int):
    """Each slot's visible pages, slot after slot: (row [T], page column [T], live [T], live count), with
    T = B * W + extra entries so the loop's last slice stays in bounds."""
    end = jnp.minimum((lengths + Z - 1) // Z, W)
    start = jnp.minimum(first // Z, end)
    ends = jnp.cumsum(end - start)
    index = jnp.arange(lengths.shape[0] * W + extra)
    row = jnp.minimum(jnp.searchsorted(ends, index, side="right"), lengths.shape[0] - 1)
    col = index - ends[row] + end[row]
    return row, col, index < ends[-1], ends[-1]


def page_loop_prefill_attention(q, k_pool, v_pool, layer, block_tables, positions, *, sliding_window=None,
                                softcap=None, sinks=None, block_keys: int = 128):
    """q [B, T, N, H]; pools [L, K, P, Z, H]; block_tables [B, W]; positions [B, T] (-1 = padding)
    -> [B, T, N, H]: each query attends causally to its row's keys (the last `sliding_window` of them when
    set; each head's attention sink [N] in the softmax when set), `block_keys` keys (whole pages) per loop
    iteration. A padding query returns zeros."""
    B, T, N, H = q.shape
    K, Z = k_pool.shape[1], k_pool.shape[3]
    G, per_block = N // K, max(1, block_keys // Z)
    S = per_block * Z  # keys per iteration
    blocks = -(-block_tables.shape[1] // per_block)
    tables = jnp.pad(block_tables, ((0, 0), (0, blocks * per_block - block_tables.shape[1])))
    qg = (q.reshape(B, T, K, G, H).astype(jnp.float32) * H ** -0.5).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    valid = positions >= 0
    first = 0 if sliding_window is None else jnp.maximum(positions - sliding_window + 1, 0)
    start = jnp.min(jnp.where(valid, first, jnp.iinfo(jnp.int32).max)) // S
    last = jnp.max(jnp.where(valid, positions, -1), axis=1)  # [B]: each row's furthest query
    end = jnp.minimum((jnp.max(last) + S) // S, blocks)

    def block(i, carry):
        m, l, acc = carry
        ids = lax.dynamic_slice_in_dim(tables, i * per_block, per_block, axis=1)  # [B, per_block]
        k, v = (_take(pool, layer, ids).transpose(0, 2, 1, 3, 4).reshape(B, K, S, H)
                for pool in (k_pool, v_pool))
        s = capped(jnp.einsum("BKGTH,BKSH->BKGTS", qg, k, precision=lax.Precision.HIGHEST), softcap)
        key_pos = i * S + jnp.arange(S)
        v = _zero_unseen(v, (key_pos <= last[:, None])[:, None, :, None], v_pool.dtype)
        visible = valid[:, :, None] & (key_pos <= positions[:, :, None])  # [B, T, S]
        if sliding_window is not None:
            visible &= positions[:, :, None] - key_pos < sliding_window
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: exp() of -inf, not NaN
        alpha = jnp.exp(m - shift)  # exactly 1 where this block shows nothing
        p = jnp.exp(s - shift[..., None])
        pv = jnp.einsum("BKGTS,BKSH->BKGTH", p, v, precision=lax.Precision.HIGHEST)
        return m_new, l * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv

    init = (jnp.full((B, K, G, T), -jnp.inf), jnp.zeros((B, K, G, T)), jnp.zeros((B, K, G, T, H)))
    m, l, acc = lax.fori_loop(start, jnp.maximum(start, end), block, init)
    acc, l = with_sinks(acc, l, m, None if sinks is None else sinks.reshape(K, G, 1))
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)
