"""Pieces shared by the attention code: float32-accumulating dots and one online-softmax step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

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


def online_softmax_step(carry, logits, valid, v):
    """One block of flash attention: logits [M, S] float32, valid [M, S], v [S, H] -> new (o, m, l)."""
    o, m, l = carry
    logits = jnp.where(valid, logits, NEG_INF)
    m_new = jnp.maximum(m, logits.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(logits - m_new[:, None]), 0.0)
    l_new = correction * l + p.sum(axis=-1)
    o_new = correction[:, None] * o + kernel_dot(p.astype(v.dtype), v)
    return o_new, m_new, l_new
