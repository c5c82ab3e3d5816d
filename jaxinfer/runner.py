"""Device side of the engine: the parameters, the paged KV pool and the jitted steps.

Two entry points run one jitted step function at two families of shapes:
`prefill` (one sequence's chunk, `[1, T]`, T bucketed to a power of two) and
`decode` (every slot, `[max_slots, 1]`, empty slots masked onto the null page).
Host code hands in flat numpy arrays and gets sampled token ids back. Each
shape is compiled once, ahead of time; the compile count and time are logged.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.model.transformer import Batch, KVPool, forward, logits
from jaxinfer.sampling import sample
from jaxinfer.sharding import logical_sharding
from pallas_kernels.attention import step_attention

log = logging.getLogger(__name__)

KV_AXES = ("layers", "kv_heads", "page", "page_slot", "head_dim")


def init_kv_pool(cfg: ModelConfig, engine: EngineConfig, mesh) -> KVPool:
    """Zeroed pools [L, K, P, Z, H], sharded over KV heads."""
    shape = (cfg.num_layers, cfg.num_kv_heads, engine.num_pages, engine.page_size, cfg.head_dim)
    sharding = logical_sharding(mesh, KV_AXES)
    zeros = jax.jit(lambda: jnp.zeros(shape, engine.dtype), out_shardings=sharding)
    return KVPool(zeros(), zeros())


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("kv",))
def _step(params, kv: KVPool, batch: Batch, last_index, temperature, seed, *, cfg: ModelConfig, backend: str):
    """Run the model on `batch`, sample one token per row from its `last_index` position."""
    h, kv = forward(params, cfg, batch, kv, step_attention(backend))
    rows = jnp.arange(h.shape[0])
    next_position = batch.positions[rows, last_index] + 1
    tokens = sample(logits(params, cfg, h[rows, last_index]), temperature, seed, next_position)
    return tokens, kv


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("kv",))
def _score(params, kv: KVPool, batch: Batch, *, cfg: ModelConfig, backend: str):
    """Like `_step` but returns the logits of every position [B, T, V] (prompt scoring)."""
    h, kv = forward(params, cfg, batch, kv, step_attention(backend))
    return logits(params, cfg, h), kv


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if n <= size:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def _powers_of_two_upto(limit: int) -> tuple[int, ...]:
    sizes = tuple(1 << i for i in range(limit.bit_length()) if 1 << i < limit)
    return sizes + (limit,)


class ModelRunner:
    """Owns the device state; every method takes and returns host numpy arrays."""

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, params: dict, mesh):
        self.cfg, self.engine, self.params, self.mesh = cfg, engine, params, mesh
        self.kv = init_kv_pool(cfg, engine, mesh)
        self._compiled: dict[tuple, object] = {}
        self._page_buckets = _powers_of_two_upto(engine.pages_per_seq)
        self.compile_seconds = 0.0

    @property
    def num_compiles(self) -> int:
        return len(self._compiled)

    def _executable(self, fn, name: str, *args):
        key = (name,) + tuple(a.shape for a in jax.tree_util.tree_leaves(args[2:]))
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = fn.lower(*args, cfg=self.cfg, backend=self.engine.attention_backend).compile()
            took = time.perf_counter() - start
            self.compile_seconds += took
            log.info("compiled %s for shapes %s in %.2fs (%d executables, %.1fs compiling in all)",
                     name, key[1:], took, self.num_compiles, self.compile_seconds)
        return self._compiled[key]

    def _batch(self, tokens, positions, block_tables) -> Batch:
        """Device batch with the block tables cut to the pages this step can touch (bucketed):
        attention reads what the batch holds, not what the longest possible sequence would."""
        width = _bucket(int(positions.max()) // self.engine.page_size + 1, self._page_buckets)
        return Batch(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                     jnp.asarray(block_tables[:, :width], jnp.int32))

    def _run_step(self, tokens, positions, block_tables, last_index, temperature, seed) -> np.ndarray:
        batch = self._batch(tokens, positions, block_tables)
        args = (self.params, self.kv, batch, jnp.asarray(last_index, jnp.int32),
                jnp.asarray(temperature, jnp.float32), jnp.asarray(seed, jnp.uint32))
        out, self.kv = self._executable(_step, "step", *args)(*args)
        return np.asarray(out)

    def _pad_chunk(self, tokens: np.ndarray, start: int):
        T = _bucket(len(tokens), self.engine.prefill_buckets())
        padded = np.zeros((1, T), np.int32)
        padded[0, :len(tokens)] = tokens
        positions = np.full((1, T), -1, np.int32)
        positions[0, :len(tokens)] = np.arange(start, start + len(tokens))
        return padded, positions

    def prefill(self, tokens: np.ndarray, start: int, block_table: np.ndarray,
                temperature: float, seed: int) -> int:
        """Write one chunk (positions start..start+len) into pages; sample after its last token."""
        padded, positions = self._pad_chunk(tokens, start)
        out = self._run_step(padded, positions, block_table[None], [len(tokens) - 1], [temperature], [seed])
        return int(out[0])

    def decode(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
               temperature: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """One token for every slot [B]; slots with position -1 are empty."""
        B = tokens.shape[0]
        return self._run_step(tokens[:, None], positions[:, None], block_tables,
                              np.zeros(B, np.int32), temperature, seed)

    def score(self, tokens: np.ndarray, start: int, block_table: np.ndarray) -> np.ndarray:
        """Like `prefill`, returning float32 logits [len(tokens), V] of every chunk position."""
        padded, positions = self._pad_chunk(tokens, start)
        batch = self._batch(padded, positions, block_table[None])
        args = (self.params, self.kv, batch)
        out, self.kv = self._executable(_score, "score", *args)(*args)
        return np.asarray(out[0, :len(tokens)])

    def warmup(self) -> None:
        """Compile every shape generation can meet: each prefill bucket at each page width one of its
        chunks can end in, and the decode step at each page width."""
        B, Z, P = self.engine.max_slots, self.engine.page_size, self.engine.pages_per_seq
        last_positions = [min(width * Z, self.engine.max_model_len) - 1 for width in self._page_buckets]
        buckets = self.engine.prefill_buckets()
        for smaller, size in zip((0,) + buckets, buckets):
            n = smaller + 1  # the fewest tokens that pad to `size`
            for last in last_positions:
                if last + 1 >= n:
                    self.prefill(np.zeros(n, np.int32), last + 1 - n, np.zeros(P, np.int32), 0.0, 0)
        for last in last_positions:
            self.decode(np.zeros(B, np.int32), np.full(B, last, np.int32), np.zeros((B, P), np.int32),
                        np.zeros(B, np.float32), np.zeros(B, np.uint32))
