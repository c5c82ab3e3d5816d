"""How the KV pool holds its values: as floats of its format, or as their bits.

XLA upcasts a scatter into a bfloat16 pool on the CPU, and into an fp8 pool, to float32: it converts and
copies the whole pool at every layer's write (about 1 s a step for a SmolLM2-135M pool on the 2-core CPU,
docs/benchmarks.md; for fp8 on a GPU its float-support rules suggest the same, not measured). Integer scatters
are native everywhere, so such pools hold integers of the format's width, one integer type per format, and
every reader reinterprets what it gathered (a free bitcast) before widening it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

BITS = {jnp.dtype(jnp.uint16): jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint8): jnp.dtype(jnp.float8_e4m3fn),
        jnp.dtype(jnp.int8): jnp.dtype(jnp.float8_e5m2)}  # storage -> the format it holds


def storage_dtype(fmt, platform: str):
    """The pool's element type for values of `fmt` on `platform`: bits for fp8, and for bfloat16 on CPU."""
    fmt = jnp.dtype(fmt)
    if fmt.itemsize == 1 or (fmt == jnp.bfloat16 and platform == "cpu"):
        return next(bits for bits, held in BITS.items() if held == fmt)
    return fmt


def value_format(storage):
    """The float format a pool of `storage` holds."""
    return BITS.get(jnp.dtype(storage), jnp.dtype(storage))


def stored(x, storage):
    """Values `x` as a pool of `storage` holds them. fp8 saturates, as vLLM's cast does: float8_e4m3fn has no
    infinity, and a key beyond its 448 would become NaN."""
    fmt = value_format(storage)
    if fmt.itemsize == 1:
        top = float(jnp.finfo(fmt).max)
        x = jnp.clip(x, -top, top)
    x = x.astype(fmt)
    return x if fmt == storage else lax.bitcast_convert_type(x, storage)


def widened(x, dtype):
    """What a pool holds (gathered), as values of `dtype`."""
    if x.dtype in BITS:
        x = lax.bitcast_convert_type(x, BITS[x.dtype])
    return x if x.dtype == dtype else x.astype(dtype)
