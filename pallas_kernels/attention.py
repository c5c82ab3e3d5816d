"""The attention entry point of the model: the `[B, T]` step layout onto a backend.

`reference` is plain jnp (XLA gathers the pages); `xla` walks the pages in
plain jnp (`page_loop.py`), decode steps and prefill chunks alike: the fast path off
GPU; `pallas` runs our kernels: the decode kernel for `T == 1` steps, the ragged
prefill kernel otherwise (rows packed by their valid tokens). A packed prefill
chunk (`rows` given: one row of several prompts' tokens) goes to the ragged
kernel as it is; the jnp paths lay each prompt into a row of its own first. Which backend
`auto` means is decided with the rest of the engine config (Pallas on GPU, `xla`
elsewhere); Pallas off GPU runs in interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer.sharding import logical_spec, model_axes
from pallas_kernels.kv_storage import storage_dtype, stored
from pallas_kernels.page_loop import page_loop_decode_attention, page_loop_prefill_attention
from pallas_kernels.paged_decode import paged_decode_attention, paged_decode_reference
from pallas_kernels.paged_reference import paged_attention_reference
from pallas_kernels.ragged_prefill import ragged_prefill_attention, ragged_prefill_reference


def _pallas_step_attention(q, k_pool, v_pool, layer, block_tables, positions, sliding_window, rows=None, *,
                           softcap=None, sinks=None, interpret):
    """q [B, T, N, H], positions [B, T] (-1 = padding) -> [B, T, N, H] through the kernels."""
    mask = dict(sliding_window=sliding_window, softcap=softcap, sinks=sinks, interpret=interpret)
    B, T, N, H = q.shape
    if rows is not None:
        valid = positions[0] >= 0
        E = block_tables.shape[0]
        q_lens = jnp.zeros(E, jnp.int32).at[rows[0]].add(valid.astype(jnp.int32))
        kv_lens = jnp.zeros(E, jnp.int32).at[rows[0]].max(jnp.where(valid, positions[0] + 1, 0))
        cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
        return ragged_prefill_attention(q[0], k_pool, v_pool, layer, block_tables, cu_q_lens, kv_lens, **mask)[None]
    if T == 1:
        lengths = positions[:, 0] + 1  # an empty slot (-1) has length 0
        out = paged_decode_attention(q[:, 0], k_pool, v_pool, layer, block_tables, lengths, **mask)
        return out[:, None]
    valid = positions >= 0
    order = jnp.argsort(~valid.reshape(-1), stable=True)  # valid tokens first, each row's in order: packed
    q_lens = valid.sum(axis=1)
    cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    kv_lens = positions.max(axis=1) + 1
    packed = ragged_prefill_attention(q.reshape(B * T, N, H)[order], k_pool, v_pool, layer, block_tables,
                                      cu_q_lens, kv_lens, **mask)
    return jnp.zeros_like(packed).at[order].set(packed).reshape(B, T, N, H)


def _row_per_prompt(attention):
    """`attention` over [B, T] rows, made to take a packed chunk too: each prompt's tokens are laid from
    column 0 of a row of their own (as if its chunk ran alone), attended, and packed back."""

    def attend(q, k_pool, v_pool, layer, block_tables, positions, sliding_window=None, rows=None, softcap=None,
               sinks=None):
        if rows is None:
            return attention(q, k_pool, v_pool, layer, block_tables, positions, sliding_window, softcap, sinks)
        rows = rows[0]
        column = jnp.arange(rows.shape[0]) - jnp.searchsorted(rows, rows, side="left")
        E, T = block_tables.shape[0], q.shape[1]
        q_rows = jnp.zeros((E,) + q.shape[1:], q.dtype).at[rows, column].set(q[0])
        row_positions = jnp.full((E, T), -1, positions.dtype).at[rows, column].set(positions[0])
        out = attention(q_rows, k_pool, v_pool, layer, block_tables, row_positions, sliding_window, softcap, sinks)
        return out[rows, column][None]

    return attend


def _page_loop_step_attention(q, k_pool, v_pool, layer, block_tables, positions, sliding_window=None,
                              softcap=None, sinks=None):
    """Decode steps and prefill chunks, each through its page loop."""
    if q.shape[1] != 1:
        return page_loop_prefill_attention(q, k_pool, v_pool, layer, block_tables, positions,
                                           sliding_window=sliding_window, softcap=softcap, sinks=sinks)
    out = page_loop_decode_attention(q[:, 0], k_pool, v_pool, layer, block_tables, positions[:, 0] + 1,
                                     sliding_window=sliding_window, softcap=softcap, sinks=sinks)
    return out[:, None]


def step_attention(backend: str, mesh=None):
    """The attention function `forward` calls, for a resolved backend. Under tensor parallelism (a mesh
    whose 'model' axis has several devices) the kernels run per device inside `shard_map`, on that
    device's query heads and KV heads (the same G per KV head); the plain-jnp backends are left to XLA."""
    if backend == "reference":
        return _row_per_prompt(paged_attention_reference)
    if backend == "xla":
        return _row_per_prompt(_page_loop_step_attention)
    kernel = functools.partial(_pallas_step_attention, interpret=jax.default_backend() != "gpu")
    if mesh is None or mesh.shape["model"] == 1:
        return kernel
    heads, pool, whole = logical_spec(("batch", "tokens", "heads")), logical_spec(("layers", "kv_heads")), P()
    extra_specs = {"sliding_window": whole, "rows": whole, "sinks": logical_spec(("heads",))}

    def per_device(q, k_pool, v_pool, layer, block_tables, positions, sliding_window=None, rows=None, softcap=None,
                   sinks=None):
        given = {name: value for name, value in (("sliding_window", sliding_window), ("rows", rows),
                                                 ("sinks", sinks))
                 if value is not None}  # (a traced window, packed rows, sinks: operands of the shard_map)

        def local(*args):
            extra = dict(zip(given, args[6:]))
            return kernel(*args[:6], extra.get("sliding_window"), rows=extra.get("rows"), softcap=softcap,
                          sinks=extra.get("sinks"))

        args = (q, k_pool, v_pool, layer, block_tables, positions) + tuple(map(jnp.asarray, given.values()))
        specs = (heads, pool, pool, whole, whole, whole) + tuple(extra_specs[name] for name in given)
        context = jax.sharding.get_abstract_mesh()  # inside the step's shard_map over 'data': its mesh
        return jax.shard_map(local, mesh=mesh if context.empty else context, in_specs=specs, out_specs=heads,
                             axis_names=set(model_axes()), check_vma=False)(*args)

    return per_device


def kernel_self_check(dtype, page_size: int, head_dim: int, q_per_kv: int, sliding_window: int | None,
                      kv_dtype=None, softcap: float | None = None, sinks: bool = False) -> str | None:
    """Run both kernels once at the model's attention shapes (queries of `dtype`, a pool of `kv_dtype`,
    default the same; attention sinks where the model has them) on a tiny pool against the references.
    Returns None when they agree, else what went wrong (compile error or mismatch)."""
    K, P, L = 2, 9, 1
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    storage = storage_dtype(kv_dtype or dtype, jax.default_backend())  # as the engine's pool holds them
    pools = [stored(jax.random.normal(k, (L, K, P, page_size, head_dim)), storage) for k in keys[:2]]
    q = jax.random.normal(keys[2], (3, K * q_per_kv, head_dim)).astype(dtype)
    tables = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8], [8, 7, 0, 0]], jnp.int32)
    lengths = jnp.asarray([4 * page_size, page_size + 1, 0], jnp.int32)
    cu_q_lens, kv_lens = jnp.asarray([0, 2, 3, 3], jnp.int32), jnp.asarray([page_size + 2, 1, 0], jnp.int32)
    tolerance = 1e-4 if jnp.dtype(dtype) == jnp.float32 else 2e-2
    extra = dict(sliding_window=sliding_window, softcap=softcap,
                 sinks=jax.random.normal(keys[4], (K * q_per_kv,)) if sinks else None)
    checks = (
        (paged_decode_attention, paged_decode_reference, (q, *pools, 0, tables, lengths)),
        (ragged_prefill_attention, ragged_prefill_reference, (q, *pools, 0, tables, cu_q_lens, kv_lens)),
    )
    for kernel, reference, args in checks:
        try:
            got = kernel(*args, **extra)
        except Exception as e:  # a kernel that does not lower on this device
            return f"{kernel.__name__} failed: {type(e).__name__}: {str(e)[:300]}"
        expected = reference(*args, **extra)
        error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - expected)))
        if not error <= tolerance:
            return f"{kernel.__name__} differs from its reference by {error:.3g} (tolerance {tolerance})"
    return None
