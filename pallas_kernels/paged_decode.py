"""Paged decode attention: one query token per slot, KV read through block tables (flash-decoding).

Grid (slot B, KV head K, split). Each program streams its split of the slot's
pages, `pages_per_block` pages per iteration, with an online softmax for the
G query heads that share the KV head; the splits' partial results are combined
outside the kernel with a log-sum-exp. Written for the Triton lowering of
`pallas_call` (power-of-two loads, same-dtype dot operands, dot sides >= 16) and
runs on CPU with `interpret=True`. The pool is `[L, K, P, Z, H]`, viewed as rows
of pages `[L*K*P, Z, H]` (a free reshape) so one layer's pages are read in place.

`paged_decode_reference` is the plain-jnp statement of the same function.

Tuning: on a GPU, a call that sets none of its knobs takes them from
`tuned_paged_decode.json` (beside this file) when it holds a shape measured on this
device kind within a factor of 2 of the call's batch and table width, the nearest
one; `scripts/bench_attention.py --sweep --tune FILE` measures and writes them
(as vLLM keeps its tuned kernel configs per device). Otherwise `_layout`'s rule.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.flash import (attend_block, check_power_of_two, initial_carry, padded_head_dim, read_pages,
                                  triton_params, window_operand, with_sinks)
from pallas_kernels.paged_reference import paged_attention_reference

def _kernel(layer_ref, window_ref, length_ref, table_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
            num_kv_heads, num_pages, pages_per_block, head_dim, scale, windowed, softcap):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    del b  # the slot's rows arrive through the block specs
    page_size, width = k_ref.shape[1], k_ref.shape[2]  # width: the padded head dim
    block_k = pages_per_block * page_size
    pages_per_split = table_ref.shape[0]
    length = length_ref[0]
    first_page = split * pages_per_split
    end_page = jnp.minimum(first_page + pages_per_split, pl.cdiv(length, page_size))
    num_blocks = pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_block)
    start_block, sliding_window = 0, window_ref[0]
    if windowed:  # whole blocks before the window hold nothing visible
        window_start = jnp.maximum(length - sliding_window, 0) // page_size
        start_block = jnp.minimum(jnp.maximum(window_start - first_page, 0) // pages_per_block, num_blocks)
    row_base = (layer_ref[0] * num_kv_heads + h) * num_pages
    q = q_ref[...]

    def body(i, carry):
        k, v = read_pages(k_ref, v_ref, row_base + table_ref[pl.ds(i * pages_per_block, pages_per_block)],
                          q.dtype, head_dim)
        key_pos = (first_page + i * pages_per_block) * page_size + jnp.arange(block_k)
        valid = key_pos < length
        if windowed:
            valid &= key_pos > length - 1 - sliding_window
        return attend_block(carry, q, k, v, jnp.broadcast_to(valid[None, :], (q.shape[0], block_k)), valid, scale,
                            softcap)

    o, m, l = jax.lax.fori_loop(start_block, num_blocks, body, initial_carry(q.shape[0], width))
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


TUNED = Path(__file__).with_name("tuned_paged_decode.json")
KNOBS = ("num_splits", "block_keys", "num_warps", "num_stages")
DEFAULT_BLOCK_KEYS = 64
TARGET_PROGRAMS = 1024  # programs (slots x KV heads x splits) that keep a GPU busy: ~8 per SM of an H100/H200


@functools.cache
def read_tuned() -> dict:
    """The committed table: {device kind: [{batch, context, knob: value, ...}]}; {} if there is none."""
    return json.loads(TUNED.read_text()) if TUNED.exists() else {}


def tuned_knobs(device_kind: str, batch: int, context: int, table: dict | None = None) -> dict:
    """The measured fastest knobs for the nearest shape of `device_kind` within a factor of 2 in batch and
    in context (tokens of table width), as {knob: value}; {} when none is that near."""
    def distance(entry):
        return abs(math.log2(entry["batch"] / batch)), abs(math.log2(entry["context"] / context))

    near = [e for e in (table if table is not None else read_tuned()).get(device_kind, [])
            if max(distance(e)) <= 1]
    best = min(near, key=lambda e: sum(distance(e)), default=None)
    return {} if best is None else {knob: best[knob] for knob in KNOBS}


def _layout(num_table_pages: int, page_size: int, num_splits: int | None, block_keys: int, programs: int):
    """(pages per block, pages per split, splits): powers of two, a block at least 16 keys. By default, splits
    until the grid has TARGET_PROGRAMS programs (`programs` without splits: slots x KV heads), at most 8, and
    each split at least 4 blocks: at large batch the slots fill the GPU alone, and more splits only shorten
    each program's loop (in the 2026-11-27 H200 run, the slowest target shape, 64 x 2048 at 33% of the copy
    bandwidth, ran 8 splits of 4 blocks) and add partial results to write and combine."""
    pages_per_block = max(1, block_keys // page_size)
    if num_splits is None:
        wanted = pl.next_power_of_2(pl.cdiv(TARGET_PROGRAMS, programs))
        num_splits = max(1, min(8, wanted, pl.cdiv(num_table_pages, 4 * pages_per_block)))
    pages_per_split = max(pages_per_block, pl.next_power_of_2(pl.cdiv(num_table_pages, num_splits)))
    return pages_per_block, pages_per_split, pl.cdiv(num_table_pages, pages_per_split)


def combine_splits(o, m, l, sinks=None):
    """Partial results [splits, ...] -> normalised output, each row's attention sink [...] (if any) in the
    denominator; rows that saw no key give 0, not NaN."""
    m_all = m.max(axis=0)
    weight = jnp.exp(m - m_all)
    out, total = with_sinks((weight[..., None] * o).sum(axis=0), (weight * l).sum(axis=0), m_all, sinks)
    return out / jnp.where(total == 0, 1.0, total)[..., None]


@functools.partial(jax.jit, static_argnames=("softcap", "num_splits", "block_keys", "num_warps",
                                             "num_stages", "interpret"))
def paged_decode_attention(q, k_pool, v_pool, layer, block_tables, lengths, *,
                           sliding_window: int | jax.Array | None = None, softcap: float | None = None, sinks=None,
                           num_splits: int | None = None, block_keys: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, interpret: bool = False):
    """q [B, N, H]; pools [L, K, P, Z, H]; layer int; block_tables [B, P']; lengths [B] -> [B, N, H]; the last
    `sliding_window` keys only (a traced int too: one call serves layers of two windows), logits capped at
    +-softcap, and each query head's attention sink [N] in the softmax (added as the splits combine), where given.

    `num_splits` (default: by the table's width), `block_keys` (keys per loop iteration, a power of two;
    default 64) and Triton's `num_warps` / `num_stages` (default: its own) are tuning knobs with no effect
    on the result beyond rounding; `scripts/bench_attention.py --sweep` times them on a GPU. With none
    set, a GPU takes them from the tuned table when it has a near shape (see the module's doc)."""
    B, N, H = q.shape
    L, K, P, Z, _ = k_pool.shape
    if not interpret and (num_splits, block_keys, num_warps, num_stages) == (None,) * 4:
        tuned = tuned_knobs(jax.devices()[0].device_kind, B, block_tables.shape[1] * Z)
        num_splits, block_keys, num_warps, num_stages = (tuned.get(knob) for knob in KNOBS)
    block_keys = block_keys or DEFAULT_BLOCK_KEYS
    check_power_of_two(page_size=Z, block_keys=block_keys)
    G, Hp = N // K, padded_head_dim(H)
    Gp = max(16, pl.next_power_of_2(G))  # dot sides of at least 16
    per_block, per_split, splits = _layout(block_tables.shape[1], Z, num_splits, block_keys, B * K)
    tables = jnp.pad(block_tables, ((0, 0), (0, splits * per_split - block_tables.shape[1])))
    qg = jnp.pad(q.reshape(B, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, Hp - H)))
    kernel = functools.partial(_kernel, num_kv_heads=K, num_pages=P, pages_per_block=per_block, head_dim=H,
                               scale=H ** -0.5, windowed=sliding_window is not None, softcap=softcap)
    partial_shape = (splits, B, K, Gp)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, K, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (0,)),  # layer
            pl.BlockSpec((1,), lambda b, h, s: (0,)),  # sliding window (unread without one)
            pl.BlockSpec((1,), lambda b, h, s: (b,)),  # length of this slot
            pl.BlockSpec((None, per_split), lambda b, h, s: (b, s)),  # this split of the block table
            pl.BlockSpec((None, None, Gp, Hp), lambda b, h, s: (b, h, 0, 0)),  # q
            pl.BlockSpec((L * K * P, Z, Hp), lambda b, h, s: (0, 0, 0)),  # k rows (past H: masked)
            pl.BlockSpec((L * K * P, Z, Hp), lambda b, h, s: (0, 0, 0)),  # v rows
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Gp, Hp), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (s, b, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(partial_shape + (Hp,), jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32)],
        interpret=interpret,
        name="paged_decode_attention",
        compiler_params=triton_params(num_warps, num_stages),
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), window_operand(sliding_window), lengths.astype(jnp.int32),
      tables.astype(jnp.int32), qg, k_pool.reshape(L * K * P, Z, H), v_pool.reshape(L * K * P, Z, H))
    sink_rows = None if sinks is None else jnp.pad(sinks.reshape(K, G), ((0, 0), (0, Gp - G)))
    out = combine_splits(o, m, l, sink_rows)[:, :, :G, :H]
    return out.reshape(B, N, H).astype(q.dtype)


def paged_decode_reference(q, k_pool, v_pool, layer, block_tables, lengths, *, sliding_window=None, softcap=None,
                           sinks=None):
    """The same function in plain jnp; empty slots (length 0) give 0."""
    positions = (lengths - 1)[:, None]
    out = paged_attention_reference(q[:, None], k_pool, v_pool, layer, block_tables, positions, sliding_window,
                                    softcap, sinks)
    return jnp.where((lengths > 0)[:, None, None], out[:, 0], 0).astype(q.dtype)
