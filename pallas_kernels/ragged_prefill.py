"""Ragged paged prefill attention: packed query chunks of several sequences, causal over their pages.

Sequence s owns queries `cu_q_lens[s]:cu_q_lens[s+1]` of the packed `[T, N, H]`
and `kv_lens[s]` keys in its pages (the chunk's own keys already written), so
its i-th query sits at position `kv_lens[s] - q_len + i`. Chunked prefill and
prefix-cache hits therefore read cached pages in place, with no gather into a
contiguous copy. Grid (sequence, query block, KV head): a program takes
`block_q` queries times the G query heads of one KV head as one `[block_q*G, H]`
tile and streams the pages up to its last query's position with an online
softmax. Triton-lowerable like `paged_decode`; `interpret=True` on CPU.

`ragged_prefill_reference` is the plain-jnp statement of the same function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.flash import (attend_block, check_power_of_two, initial_carry, padded_head_dim, read_pages,
                                  triton_params, window_operand)
from pallas_kernels.paged_reference import paged_attention_reference


def _kernel(layer_ref, window_ref, q_len_ref, kv_len_ref, table_ref, sink_ref, q_ref, k_ref, v_ref, o_ref, *,
            num_kv_heads, num_pages, pages_per_block, heads_per_row, head_dim, scale, windowed, softcap, sinks):
    qb, h = pl.program_id(1), pl.program_id(2)
    page_size, width = k_ref.shape[1], k_ref.shape[2]  # width: the padded head dim
    block_k = pages_per_block * page_size
    rows = q_ref.shape[0]
    block_q = rows // heads_per_row
    q_len, kv_len = q_len_ref[0], kv_len_ref[0]
    first_query = qb * block_q
    first_pos = kv_len - q_len + first_query
    last_pos = jnp.minimum(kv_len - 1, first_pos + block_q - 1)
    num_blocks = jnp.where(first_query < q_len, pl.cdiv(last_pos + 1, block_k), 0)
    start_block, sliding_window = 0, window_ref[0]
    if windowed:
        start_block = jnp.minimum(jnp.maximum(first_pos - sliding_window + 1, 0) // block_k, num_blocks)
    row_pos = first_pos + jnp.arange(rows) // heads_per_row  # position of each (query, head) row
    row_base = (layer_ref[0] * num_kv_heads + h) * num_pages
    q = q_ref[...]

    def body(i, carry):
        k, v = read_pages(k_ref, v_ref, row_base + table_ref[pl.ds(i * pages_per_block, pages_per_block)],
                          q.dtype, head_dim)
        key_pos = i * block_k + jnp.arange(block_k)
        valid = key_pos[None, :] <= row_pos[:, None]
        if windowed:
            valid &= key_pos[None, :] > row_pos[:, None] - sliding_window
        return attend_block(carry, q, k, v, valid, key_pos <= last_pos, scale, softcap)

    initial = initial_carry(rows, width, sink_ref[...] if sinks else None)
    o, _, l = jax.lax.fori_loop(start_block, num_blocks, body, initial)
    o_ref[...] = (o / jnp.where(l == 0, 1.0, l)[:, None]).astype(o_ref.dtype)


def _token_blocks(cu_q_lens, num_tokens: int, block_q: int):
    """For every (sequence, query block, row) the packed token index it holds, and whether it is real."""
    S = cu_q_lens.shape[0] - 1
    blocks = pl.cdiv(num_tokens, block_q)
    offsets = jnp.arange(blocks * block_q).reshape(1, blocks, block_q)
    index = cu_q_lens[:-1, None, None] + offsets
    real = index < cu_q_lens[1:, None, None]
    return jnp.clip(index, 0, num_tokens - 1), real, (S, blocks)


def _unblock(out, cu_q_lens, num_tokens: int, block_q: int):
    """[S, blocks, K, block_q, Gp, H] back to packed [T, K, Gp, H]."""
    t = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, out.shape[0] - 1)
    offset = t - cu_q_lens[seq]
    return out[seq, offset // block_q, :, offset % block_q]


@functools.partial(jax.jit, static_argnames=("softcap", "block_q", "interpret"))
def ragged_prefill_attention(q, k_pool, v_pool, layer, block_tables, cu_q_lens, kv_lens, *,
                             sliding_window: int | jax.Array | None = None, softcap: float | None = None,
                             sinks=None, block_q: int | None = None, interpret: bool = False):
    """q [T, N, H] packed; pools [L, K, P, Z, H]; block_tables [S, P']; cu_q_lens [S+1]; kv_lens [S] -> [T, N, H];
    the last `sliding_window` keys only (a traced int too), logits capped at +-softcap, and each query head's
    attention sink [N] in the softmax (a first key of value 0 in each row's online softmax), where given.

    Tokens past cu_q_lens[-1] are padding and come back as 0."""
    T, N, H = q.shape
    L, K, P, Z, _ = k_pool.shape
    check_power_of_two(page_size=Z)
    G, Hp = N // K, padded_head_dim(H)
    Gp = pl.next_power_of_2(G)
    block_q = block_q or max(1, 64 // Gp)
    pages_per_block = max(1, 64 // Z)
    padded_pages = pl.cdiv(block_tables.shape[1], pages_per_block) * pages_per_block
    tables = jnp.pad(block_tables, ((0, 0), (0, padded_pages - block_tables.shape[1]))).astype(jnp.int32)
    index, real, (S, blocks) = _token_blocks(cu_q_lens, T, block_q)
    qg = jnp.pad(q.reshape(T, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, Hp - H)))
    q_tiles = qg[index].transpose(0, 1, 3, 2, 4, 5).reshape(S, blocks, K, block_q * Gp, Hp)
    kernel = functools.partial(_kernel, num_kv_heads=K, num_pages=P, pages_per_block=pages_per_block,
                               heads_per_row=Gp, head_dim=H, scale=H ** -0.5, windowed=sliding_window is not None,
                               softcap=softcap, sinks=sinks is not None)
    tile = (None, None, None, block_q * Gp, Hp)
    sink_rows = jnp.zeros((K, G)) if sinks is None else sinks.reshape(K, G)  # unread without sinks
    sink_rows = jnp.tile(jnp.pad(sink_rows.astype(jnp.float32), ((0, 0), (0, Gp - G))), (1, block_q))
    out = pl.pallas_call(
        kernel,
        grid=(S, blocks, K),
        in_specs=[
            pl.BlockSpec((1,), lambda s, b, h: (0,)),  # layer
            pl.BlockSpec((1,), lambda s, b, h: (0,)),  # sliding window (unread without one)
            pl.BlockSpec((1,), lambda s, b, h: (s,)),  # q_len
            pl.BlockSpec((1,), lambda s, b, h: (s,)),  # kv_len
            pl.BlockSpec((None, padded_pages), lambda s, b, h: (s, 0)),  # block table
            pl.BlockSpec((None, block_q * Gp), lambda s, b, h: (h, 0)),  # each tile row's sink (its head's)
            pl.BlockSpec(tile, lambda s, b, h: (s, b, h, 0, 0)),  # q tile
            pl.BlockSpec((L * K * P, Z, Hp), lambda s, b, h: (0, 0, 0)),  # k rows (past H: masked)
            pl.BlockSpec((L * K * P, Z, Hp), lambda s, b, h: (0, 0, 0)),  # v rows
        ],
        out_specs=pl.BlockSpec(tile, lambda s, b, h: (s, b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((S, blocks, K, block_q * Gp, Hp), q.dtype),
        interpret=interpret,
        name="ragged_prefill_attention",
        compiler_params=triton_params(),
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), window_operand(sliding_window),
      (cu_q_lens[1:] - cu_q_lens[:-1]).astype(jnp.int32),
      kv_lens.astype(jnp.int32), tables, sink_rows, q_tiles, k_pool.reshape(L * K * P, Z, H),
      v_pool.reshape(L * K * P, Z, H))
    out = _unblock(out.reshape(S, blocks, K, block_q, Gp, Hp), cu_q_lens, T, block_q)[:, :, :G, :H]
    is_query = jnp.arange(T) < cu_q_lens[-1]
    return jnp.where(is_query[:, None, None], out.reshape(T, N, H), 0).astype(q.dtype)


def ragged_prefill_reference(q, k_pool, v_pool, layer, block_tables, cu_q_lens, kv_lens, *, sliding_window=None,
                             softcap=None, sinks=None):
    """The same function in plain jnp: each sequence's queries padded to T, attended, then packed again."""
    T = q.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    offsets = jnp.arange(T)[None, :]
    index = jnp.clip(cu_q_lens[:-1, None] + offsets, 0, T - 1)
    positions = jnp.where(offsets < q_lens[:, None], kv_lens[:, None] - q_lens[:, None] + offsets, -1)
    padded = paged_attention_reference(q[index], k_pool, v_pool, layer, block_tables, positions, sliding_window,
                                       softcap, sinks)
    t = jnp.arange(T)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, block_tables.shape[0] - 1)
    out = padded[seq, t - cu_q_lens[seq]]
    return jnp.where((t < cu_q_lens[-1])[:, None, None], out, 0).astype(q.dtype)
