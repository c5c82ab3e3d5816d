"""Pieces shared by the attention code: float32-accumulating dots and one online-softmax step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kv_storage import widened

NEG_INF = float(jnp.finfo(jnp.float32).min)  # finite: masked rows never produce NaN


def f32_operands(*arrays):
    """Operands for a dot that accumulates in float32. XLA:CPU has no half x half -> float32 dot;
    products of half values are exact in float32, so upcasting there computes what a GPU does."""
    if jax.default_backend() == "cpu":
        return tuple(x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x for x in arrays)
    return arrays


def kernel_dot(a, b, trans_b=False):
    """a @ b (or a @ b.T) with float32 accumulation."""
    a, b = f32_operands(a, b)
    # float32 inputs must not fall to TF32 on GPU; half inputs take the default.
    exact = a.dtype == jnp.float32
    return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False if exact else None)


def triton_params(num_warps: int | None = None, num_stages: int | None = None):
    """The kernels' compiler parameters: Triton's, always. Without them `pallas_call` lowers by JAX's
    `jax_pallas_use_mosaic_gpu` default, which is Mosaic GPU in jax 0.10.2, where our kernels' whole-pool
    blocks would be staged in shared memory and fail to compile; Triton reads them through pointers."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def window_operand(sliding_window) -> jax.Array:
    """The kernels' sliding window as an operand [1] (0 without one: unread then), so that a traced window
    (layers of two kinds in one scan) needs no branch around the kernel."""
    return jnp.reshape(jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32), (1,))


def check_power_of_two(**sizes: int) -> None:
    """Triton's blocks have power-of-two element counts, and the kernels' page arithmetic assumes them."""
    for name, size in sizes.items():
        if size < 1 or size & (size - 1):
            raise ValueError(f"the Pallas attention kernels need a power-of-two {name}, got {size}")


def capped(scores, softcap: float | None):
    """Attention logits held within +-softcap by softcap * tanh(x / softcap) (Gemma 2's), as transformers
    computes it; unchanged without one."""
    return scores if softcap is None else jnp.tanh(scores / softcap) * softcap


def initial_carry(rows: int, head_dim: int, sinks=None):
    """(output sum [M, H], running max [M], running denominator [M]) before any key; with attention sinks [M]
    (gpt-oss's), each row's sink as a first key whose value is 0: its logit the running max, weighing 1."""
    if sinks is not None:
        return jnp.zeros((rows, head_dim), jnp.float32), sinks.astype(jnp.float32), jnp.ones((rows,), jnp.float32)
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def with_sinks(acc, l, m, sinks):
    """A finished online softmax's weighted sum `acc` [..., H] and denominator `l` [...] relative to its max `m`
    [...] (-inf or NEG_INF where no key was seen), with each row's attention sink (a logit [...] in the
    denominator and nothing in the sum: gpt-oss's) added; unchanged without sinks."""
    if sinks is None:
        return acc, l
    sinks = sinks.astype(jnp.float32)
    top = jnp.maximum(m, sinks)
    rescale = jnp.exp(m - top)
    return acc * rescale[..., None], l * rescale + jnp.exp(sinks - top)


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels compute in: a power of two (Triton's blocks), at least 16 (its dots). A pool
    of another head dim (Phi-3's 96) is read into it with the rest of each row 0, which changes no dot."""
    return max(16, pl.next_power_of_2(head_dim))


def read_pages(k_ref, v_ref, page_rows, dtype, head_dim: int):
    """Keys and values of the pages at `page_rows` of a [rows, Z, Hp] pool view, as [pages * Z, Hp] of `dtype`
    (the queries': a dot's operands share one dtype; a narrower pool, or its bits, widens exactly). Where the
    pool's own `head_dim` is narrower than the view's Hp, the columns past it are masked and read as 0."""
    pages, Z, Hp = page_rows.shape[0], k_ref.shape[1], k_ref.shape[2]
    if head_dim == Hp:
        k, v = k_ref[page_rows], v_ref[page_rows]
    else:  # every index an array: the form both the Triton lowering and interpret mode take with a mask
        index = (page_rows[:, None, None], jnp.arange(Z)[None, :, None], jnp.arange(Hp)[None, None, :])
        mask = jnp.broadcast_to(index[2] < head_dim, (pages, Z, Hp))
        k, v = (plgpu.load(ref.at[index], mask=mask, other=0) for ref in (k_ref, v_ref))
    return widened(k.reshape(pages * Z, Hp), dtype), widened(v.reshape(pages * Z, Hp), dtype)


def attend_block(carry, q, k, v, valid, live_keys, scale: float, softcap: float | None = None):
    """One block of flash attention: q [M, H], k and v [S, H], valid [M, S] -> new (o, m, l). The values of
    keys outside `live_keys` [S] (past the sequence) count as 0, whatever a recycled page's tail holds: a
    masked key weighs 0, and 0 x inf is NaN (vLLM's paged kernels zero them for the same reason)."""
    o, m, l = carry
    v = jnp.where(jnp.broadcast_to(live_keys[:, None], v.shape), v, jnp.zeros_like(v))
    logits = jnp.where(valid, capped(kernel_dot(q, k, trans_b=True) * scale, softcap), NEG_INF)
    m_new = jnp.maximum(m, logits.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(logits - m_new[:, None]), 0.0)
    l_new = correction * l + p.sum(axis=-1)
    o_new = correction[:, None] * o + kernel_dot(p.astype(v.dtype), v)
    return o_new, m_new, l_new
