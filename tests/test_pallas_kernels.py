"""Our Pallas attention kernels (interpret mode on CPU) against their plain-jnp references.

Each case covers ragged lengths (0, 1, exactly a page, one past a page, the
maximum), page ids scattered over the pool and shared between sequences, and
(prefill) chunks that start mid-page. Together the cases sweep every dtype,
page size, head dim and query-heads-per-KV-head value; interpret mode is slow,
so the values are spread over cases rather than multiplied out.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import build
from jaxinfer.config import EngineConfig
from jaxinfer.llm import LLM, SamplingParams
from pallas_kernels.kv_storage import stored, widened
from pallas_kernels.page_loop import page_loop_decode_attention, page_loop_prefill_attention
from pallas_kernels.paged_reference import paged_attention_reference
from pallas_kernels.paged_decode import _layout, paged_decode_attention, paged_decode_reference, tuned_knobs
from pallas_kernels.ragged_prefill import ragged_prefill_attention, ragged_prefill_reference

INTERPRET = jax.default_backend() != "gpu"  # scripts/gpu_check.sh runs these compiled on a GPU
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative (and absolute near zero), by dtype
# (dtype, page size Z, head dim H, query heads per KV head G, sliding window)
CASES = [
    (jnp.float32, 8, 64, 1, None),
    (jnp.bfloat16, 16, 128, 2, None),
    (jnp.float32, 32, 64, 4, None),
    (jnp.bfloat16, 8, 128, 8, None),
    (jnp.float32, 16, 128, 8, 21),
    (jnp.bfloat16, 16, 96, 4, None),  # Phi-3-mini's head dim: not a power of two, computed padded to 128
    (jnp.float32, 8, 24, 2, 13),
]
KV_HEADS, LAYERS, POOL_PAGES, MAX_PAGES = 2, 2, 24, 4


def _pools(rng, dtype, Z, H):
    shape = (LAYERS, KV_HEADS, POOL_PAGES, Z, H)
    return jnp.asarray(rng.randn(*shape), dtype), jnp.asarray(rng.randn(*shape), dtype)


def _tables(rng, rows):
    # Drawn with replacement from pages 1..: scattered, and some pages shared between sequences.
    return jnp.asarray(rng.randint(1, POOL_PAGES, (rows, MAX_PAGES)), jnp.int32)


def _assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype, Z, H, G, window", CASES)
def test_paged_decode_matches_reference(dtype, Z, H, G, window):
    rng = np.random.RandomState(Z + H + G)
    k_pool, v_pool = _pools(rng, dtype, Z, H)
    lengths = jnp.asarray([0, 1, Z, Z + 1, MAX_PAGES * Z, 3], jnp.int32)
    q = jnp.asarray(rng.randn(len(lengths), KV_HEADS * G, H), dtype)
    tables = _tables(rng, len(lengths))
    args = (q, k_pool, v_pool, 1, tables, lengths)
    out = paged_decode_attention(*args, sliding_window=window, num_splits=2, interpret=INTERPRET)
    _assert_close(out, paged_decode_reference(*args, sliding_window=window), dtype)
    assert not np.asarray(out[0], np.float32).any(), "an empty slot attends to nothing"


@pytest.mark.parametrize("dtype, window", [(jnp.float32, None), (jnp.bfloat16, 19), (jnp.float32, 40),
                                           (jnp.bfloat16, None)])
def test_paged_decode_long_context_splits_blocks_and_window(dtype, window):
    """16-page tables: four splits of two loop iterations each, lengths on both sides of the splits' edges
    (combined by log-sum-exp), and windows that skip whole blocks of a split or whole splits."""
    rng = np.random.RandomState(3)
    Z, H, G, width = 8, 64, 2, 16
    shape = (1, KV_HEADS, 40, Z, H)
    k_pool, v_pool = (jnp.asarray(rng.randn(*shape), dtype) for _ in range(2))
    lengths = jnp.asarray([0, 1, 32, 33, 64, 65, 127, width * Z], jnp.int32)
    q = jnp.asarray(rng.randn(len(lengths), KV_HEADS * G, H), dtype)
    args = (q, k_pool, v_pool, 0, jnp.asarray(rng.randint(1, 40, (len(lengths), width)), jnp.int32), lengths)
    out = paged_decode_attention(*args, sliding_window=window, num_splits=4, block_keys=2 * Z,
                                 interpret=INTERPRET)
    _assert_close(out, paged_decode_reference(*args, sliding_window=window), dtype)


def _poison_unseen(pool, tables, lengths, Z):
    """The pool with inf and NaN at every (page, offset) that no sequence's first `lengths` keys reach."""
    seen = np.zeros(pool.shape[2:4], bool)
    for row, length in zip(np.asarray(tables), np.asarray(lengths)):
        keys = np.arange(length)
        seen[row[keys // Z], keys % Z] = True
    poison = np.where(np.arange(seen.size).reshape(seen.shape) % 2, np.inf, np.nan)
    return jnp.where(jnp.asarray(seen)[:, :, None], pool, jnp.asarray(poison, pool.dtype)[:, :, None])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_stale_non_finite_values_past_a_sequence_change_nothing(dtype):
    """A recycled page's tail can hold anything (say a float16 request that overflowed): keys past a
    sequence weigh 0 and must add exactly 0, not 0 x inf = NaN, in the kernels and the reference; in the
    page loops for float16 pools, the one dtype that overflows in practice."""
    rng = np.random.RandomState(5)
    Z, H, G = 8, 64, 2
    k_pool, v_pool = _pools(rng, dtype, Z, H)
    tables, lengths = _tables(rng, 3), jnp.asarray([Z + 3, 2 * Z + 1, 5], jnp.int32)
    dirty = [_poison_unseen(pool, tables, lengths, Z) for pool in (k_pool, v_pool)]
    q = jnp.asarray(rng.randn(3, KV_HEADS * G, H), dtype)
    chunk = jnp.asarray(rng.randn(3, 3, KV_HEADS * G, H), dtype)  # each sequence's last 3 tokens
    positions = lengths[:, None] - 3 + jnp.arange(3)
    cu_q_lens, packed = jnp.asarray([0, 3, 6, 9], jnp.int32), chunk.reshape(9, KV_HEADS * G, H)
    paths = {
        "decode kernel": lambda k, v: paged_decode_attention(q, k, v, 1, tables, lengths, num_splits=2,
                                                             interpret=INTERPRET),
        "decode reference": lambda k, v: paged_decode_reference(q, k, v, 1, tables, lengths),
        "decode page loop": lambda k, v: page_loop_decode_attention(q, k, v, 1, tables, lengths),
        "prefill kernel": lambda k, v: ragged_prefill_attention(packed, k, v, 1, tables, cu_q_lens, lengths,
                                                                interpret=INTERPRET),
        "prefill reference": lambda k, v: ragged_prefill_reference(packed, k, v, 1, tables, cu_q_lens, lengths),
        "prefill page loop": lambda k, v: page_loop_prefill_attention(chunk, k, v, 1, tables, positions),
    }
    for name, path in paths.items():
        if "page loop" in name and dtype != jnp.float16:
            continue
        clean, poisoned = np.asarray(path(k_pool, v_pool), np.float32), np.asarray(path(*dirty), np.float32)
        assert np.isfinite(poisoned).all(), name
        np.testing.assert_allclose(poisoned, clean, rtol=1e-6, atol=1e-6, err_msg=name)


def test_kernels_refuse_sizes_that_are_not_powers_of_two():
    rng = np.random.RandomState(0)
    k_pool, v_pool = _pools(rng, jnp.float32, 12, 64)
    q, tables, lengths = jnp.zeros((2, KV_HEADS, 64)), _tables(rng, 2), jnp.asarray([3, 20], jnp.int32)
    with pytest.raises(ValueError, match="power-of-two page_size, got 12"):
        paged_decode_attention(q, k_pool, v_pool, 0, tables, lengths, interpret=True)
    with pytest.raises(ValueError, match="power-of-two page_size, got 12"):
        ragged_prefill_attention(q, k_pool, v_pool, 0, tables, jnp.asarray([0, 1, 2]), lengths, interpret=True)
    k_pool, v_pool = _pools(rng, jnp.float32, 8, 64)
    with pytest.raises(ValueError, match="power-of-two block_keys, got 48"):
        paged_decode_attention(q, k_pool, v_pool, 0, tables, lengths, block_keys=48, interpret=True)
    with pytest.raises(ValueError, match="power-of-two page_size, got 12"):
        LLM(engine=EngineConfig(max_slots=1, page_size=12, max_model_len=32, attention_backend="pallas"))


@pytest.mark.parametrize("block_keys, num_splits", [(16, 1), (128, 4)])
def test_paged_decode_tuning_knobs_keep_the_result(block_keys, num_splits):
    """Keys per loop iteration, splits and Triton's warps and stages (what `bench_attention.py --sweep`
    tunes on a GPU) change the work's layout, never the result."""
    rng = np.random.RandomState(block_keys)
    Z, H, G = 8, 64, 4
    k_pool, v_pool = _pools(rng, jnp.float32, Z, H)
    lengths = jnp.asarray([0, 1, Z + 1, MAX_PAGES * Z, 2 * Z], jnp.int32)
    q = jnp.asarray(rng.randn(len(lengths), KV_HEADS * G, H), jnp.float32)
    args = (q, k_pool, v_pool, 0, _tables(rng, len(lengths)), lengths)
    out = paged_decode_attention(*args, num_splits=num_splits, block_keys=block_keys, num_warps=4, num_stages=2,
                                 interpret=INTERPRET)
    _assert_close(out, paged_decode_reference(*args), jnp.float32)


def test_default_splits_stop_once_the_slots_fill_the_gpu():
    """(pages per block, pages per split, splits) by default: up to 8 splits for few slots, fewer as slots x KV
    heads approach TARGET_PROGRAMS (vLLM's CUDA kernel likewise stops splitting past 512 slots x query heads),
    and never a split shorter than 4 blocks."""
    assert _layout(512, 16, None, 64, 1 * 8) == (4, 64, 8)
    assert _layout(128, 16, None, 64, 64 * 8) == (4, 64, 2)
    assert _layout(512, 16, None, 64, 256 * 8) == (4, 512, 1)
    assert _layout(24, 16, None, 64, 8) == (4, 16, 2)  # 6 blocks: not 8 splits of less than one
    assert _layout(128, 16, 4, 64, 256 * 8) == (4, 32, 4)  # asked for: as asked


def test_tuned_knobs_come_from_the_nearest_shape_within_a_factor_of_two():
    knobs = dict(num_splits=None, num_warps=None, num_stages=None)
    table = {"NVIDIA H200": [{"batch": 64, "context": 2048, **knobs, "block_keys": 128},
                             {"batch": 256, "context": 8192, **knobs, "block_keys": 256}],
             "NVIDIA H100": [{"batch": 64, "context": 2048, **knobs, "block_keys": 32}]}
    keys = lambda kind, batch, context: tuned_knobs(kind, batch, context, table).get("block_keys")  # noqa: E731
    assert keys("NVIDIA H200", 64, 2048) == 128 and keys("NVIDIA H100", 64, 2048) == 32
    assert keys("NVIDIA H200", 128, 8192) == 256  # one doubling from 256 x 8192, two from 64 x 2048
    assert keys("NVIDIA H200", 100, 3000) == 128
    assert keys("NVIDIA H200", 256, 4096) == 256 and keys("NVIDIA H200", 32, 1024) == 128
    assert tuned_knobs("NVIDIA H200", 16, 2048, table) == {} and tuned_knobs("NVIDIA H200", 64, 512, table) == {}
    assert tuned_knobs("cpu", 64, 2048, table) == {}


@pytest.mark.parametrize("dtype, Z, H, G, window", CASES + [(jnp.float32, 8, 64, 2, 3)])
def test_page_loop_decode_matches_reference(dtype, Z, H, G, window):
    """The `xla` backend's decode path (plain jnp, page by page), over the decode kernel's cases."""
    rng = np.random.RandomState(Z + H + G + 1)
    k_pool, v_pool = _pools(rng, dtype, Z, H)
    lengths = jnp.asarray([0, 1, Z, Z + 1, MAX_PAGES * Z, 3, 2 * Z - 1], jnp.int32)
    q = jnp.asarray(rng.randn(len(lengths), KV_HEADS * G, H), dtype)
    args = (q, k_pool, v_pool, 1, _tables(rng, len(lengths)), lengths)
    out = jax.jit(page_loop_decode_attention, static_argnames="sliding_window")(*args, sliding_window=window)
    _assert_close(out, paged_decode_reference(*args, sliding_window=window), dtype)
    assert not np.asarray(out[0], np.float32).any(), "an empty slot attends to nothing"


@pytest.mark.parametrize("window", [None, 21])
def test_page_loop_slot_is_bitwise_independent_of_the_other_slots(window):
    """Greedy tokens must not depend on the batch: one slot's output is the same bits whatever the other
    slots hold, and wherever the slot sits in the work list (the last case splits its pages over two loop iterations)."""
    rng = np.random.RandomState(7)
    Z, H, G = 8, 64, 2
    k_pool, v_pool = _pools(rng, jnp.float32, Z, H)
    q = jnp.asarray(rng.randn(1, KV_HEADS * G, H), jnp.float32)
    tables = _tables(rng, 6)
    mine = 3 * Z + 2
    run = jax.jit(page_loop_decode_attention, static_argnames="sliding_window")
    outs = []
    for others, at in (([0] * 5, 0), ([MAX_PAGES * Z] * 5, 5), ([MAX_PAGES * Z, MAX_PAGES * Z, Z + 1, 0, 3], 3)):
        lengths = jnp.asarray(others[:at] + [mine] + others[at:], jnp.int32)
        qs = jnp.zeros((6, KV_HEADS * G, H), jnp.float32).at[at].set(q[0])
        order = list(range(6))
        order[0], order[at] = order[at], order[0]  # the slot keeps its own block-table row
        outs.append(np.asarray(run(qs, k_pool, v_pool, 1, tables[jnp.asarray(order)], lengths,
                                   sliding_window=window)[at]))
    assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()


def _prefill_rows(Z):
    """Query positions [4, T] (-1: padding): a fresh prompt one past a page, a chunk starting mid-page, one
    token ending exactly at the table's last key, and a row of padding only."""
    T = 2 * Z + 3
    positions = np.full((4, T), -1, np.int32)
    positions[0, :Z + 1] = np.arange(Z + 1)
    positions[1] = np.arange(Z + 5, Z + 5 + T)
    positions[2, 0] = MAX_PAGES * Z - 1
    return jnp.asarray(positions)


@pytest.mark.parametrize("dtype, Z, H, G, window", CASES + [(jnp.float32, 8, 64, 2, 3)])
def test_page_loop_prefill_matches_reference(dtype, Z, H, G, window):
    """The `xla` backend's prefill path (plain jnp, a block of pages at a time), with blocks of one page
    and of several, against the reference; padding queries give zeros."""
    rng = np.random.RandomState(Z * H + G + 1)
    k_pool, v_pool = _pools(rng, dtype, Z, H)
    positions = _prefill_rows(Z)
    q = jnp.asarray(rng.randn(*positions.shape, KV_HEADS * G, H), dtype)
    args = (q, k_pool, v_pool, 1, _tables(rng, len(positions)), positions)
    ref = np.asarray(paged_attention_reference(*args, sliding_window=window), np.float32)
    valid = np.asarray(positions) >= 0
    for block_keys in (Z, 2 * Z):
        run = jax.jit(page_loop_prefill_attention, static_argnames=("sliding_window", "block_keys"))
        out = np.asarray(run(*args, sliding_window=window, block_keys=block_keys), np.float32)
        _assert_close(out[valid], ref[valid], dtype)
        assert not out[~valid].any(), "a padding query attends to nothing"


@pytest.mark.parametrize("window", [None, 21])
def test_page_loop_prefill_row_is_bitwise_independent_of_the_others_and_the_width(window):
    """A chunk's output is the same bits alone in a table cut to its own pages as beside rows that reach
    further (more loop iterations, blocks it cannot see) in a table twice as wide."""
    rng = np.random.RandomState(11)
    Z, H, G = 8, 64, 2
    k_pool, v_pool = _pools(rng, jnp.float32, Z, H)
    mine = jnp.arange(5, 5 + Z + 2, dtype=jnp.int32)  # a chunk from mid-page 0 into page 1
    q = jnp.asarray(rng.randn(1, len(mine), KV_HEADS * G, H), jnp.float32)
    tables = jnp.asarray(rng.randint(1, POOL_PAGES, (3, 2 * MAX_PAGES)), jnp.int32)
    run = jax.jit(page_loop_prefill_attention, static_argnames=("sliding_window", "block_keys"))
    alone = run(q, k_pool, v_pool, 0, tables[:1, :2], mine[None], sliding_window=window, block_keys=Z)
    longer = jnp.stack([mine, mine + 5 * Z, jnp.full_like(mine, -1)])
    beside = run(jnp.concatenate([q, q[::-1] * 0.5, q]), k_pool, v_pool, 0, tables, longer,
                 sliding_window=window, block_keys=Z)
    assert np.asarray(alone[0]).tobytes() == np.asarray(beside[0]).tobytes()


@pytest.mark.parametrize("dtype, Z, H, G, window", CASES)
def test_ragged_prefill_matches_reference(dtype, Z, H, G, window):
    rng = np.random.RandomState(Z * H + G)
    k_pool, v_pool = _pools(rng, dtype, Z, H)
    # (new query tokens, keys including them): a fresh prompt one past a page, a chunk starting
    # mid-page, one token, no tokens, a prompt of exactly a page, a chunk ending at the maximum.
    q_lens = [Z + 1, 3, 1, 0, Z, Z + 2]
    kv_lens = [Z + 1, Z + 5, 2 * Z, 5, Z, MAX_PAGES * Z]
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    T = sum(q_lens) + 3  # trailing padding tokens
    q = jnp.asarray(rng.randn(T, KV_HEADS * G, H), dtype)
    args = (q, k_pool, v_pool, 0, _tables(rng, len(q_lens)), cu_q_lens, jnp.asarray(kv_lens, jnp.int32))
    out = ragged_prefill_attention(*args, sliding_window=window, interpret=INTERPRET)
    _assert_close(out, ragged_prefill_reference(*args, sliding_window=window), dtype)


@pytest.mark.parametrize("dtype, storage", [(jnp.float32, jnp.uint16), (jnp.bfloat16, jnp.uint8),
                                            (jnp.float32, jnp.int8), (jnp.float32, jnp.bfloat16)])
def test_narrow_pools_read_as_the_queries_dtype(dtype, storage):
    """A KV cache narrower than the model (kv_cache_dtype), held as its bits (bfloat16, fp8 e4m3, fp8 e5m2:
    pallas_kernels/kv_storage.py) or as floats (bfloat16 on a GPU): every path widens the pool's values to the
    queries' dtype (exactly) and computes what it computes over a pool of the widened values. Few cases: on a
    GPU this file runs compiled within scripts/gpu_check.sh's time limit."""
    rng = np.random.RandomState(13)
    Z, H, G = 16, 64, 4
    narrow = [stored(pool, storage) for pool in _pools(rng, jnp.float32, Z, H)]
    wide = [widened(pool, dtype) for pool in narrow]
    assert narrow[0].dtype == storage and wide[0].dtype == dtype
    tables, lengths = _tables(rng, 4), jnp.asarray([0, 1, Z + 1, MAX_PAGES * Z], jnp.int32)
    q = jnp.asarray(rng.randn(4, KV_HEADS * G, H), dtype)
    cu_q_lens = jnp.asarray([0, 0, 1, 4, 7], jnp.int32)
    packed = jnp.asarray(rng.randn(8, KV_HEADS * G, H), dtype)
    decode = lambda f, pools, **kw: f(q, *pools, 1, tables, lengths, **kw)  # noqa: E731
    prefill = lambda f, pools, **kw: f(packed, *pools, 1, tables, cu_q_lens, lengths, **kw)  # noqa: E731
    expected = decode(paged_decode_reference, wide)
    _assert_close(decode(paged_decode_reference, narrow), expected, dtype)
    _assert_close(decode(paged_decode_attention, narrow, num_splits=2, interpret=INTERPRET), expected, dtype)
    _assert_close(jax.jit(page_loop_decode_attention)(q, *narrow, 1, tables, lengths), expected, dtype)
    expected = prefill(ragged_prefill_reference, wide)
    _assert_close(prefill(ragged_prefill_reference, narrow), expected, dtype)
    _assert_close(prefill(ragged_prefill_attention, narrow, interpret=INTERPRET), expected, dtype)


@pytest.mark.parametrize("window", [None, 3, 19])
def test_ragged_prefill_long_chunks_across_blocks_and_window(window):
    """A chunk of 40 queries from mid-page (positions 60..99) in tiles of 8 queries, beside a fresh prompt:
    several key blocks per tile, tiles that straddle a block edge, and windows whose first visible block
    differs between a tile's first and last query."""
    rng = np.random.RandomState(9)
    Z, H, G, width = 8, 64, 2, 16
    shape = (1, KV_HEADS, 40, Z, H)
    k_pool, v_pool = (jnp.asarray(rng.randn(*shape), jnp.float32) for _ in range(2))
    q_lens, kv_lens = [40, 20, 46], [100, 20, width * Z]
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    q = jnp.asarray(rng.randn(sum(q_lens) + 2, KV_HEADS * G, H), jnp.float32)
    args = (q, k_pool, v_pool, 0, jnp.asarray(rng.randint(1, 40, (3, width)), jnp.int32), cu_q_lens,
            jnp.asarray(kv_lens, jnp.int32))
    out = ragged_prefill_attention(*args, sliding_window=window, block_q=8, interpret=INTERPRET)
    _assert_close(out, ragged_prefill_reference(*args, sliding_window=window), jnp.float32)


@pytest.mark.parametrize("window", [None, 11])
def test_capped_logits_match_reference_in_every_path(window):
    """Gemma 2's attention softcap (logits held within +-cap by cap * tanh(x / cap)) in both kernels and both
    page loops, against the reference; the cap is tight enough to change the result."""
    rng = np.random.RandomState(5)
    Z, H, G, cap = 8, 64, 2, 0.5
    k_pool, v_pool = _pools(rng, jnp.float32, Z, H)
    lengths = jnp.asarray([0, 1, Z + 1, MAX_PAGES * Z, 2 * Z - 1], jnp.int32)
    q = jnp.asarray(rng.randn(len(lengths), KV_HEADS * G, H) * 4, jnp.float32)
    decode = (q, k_pool, v_pool, 1, _tables(rng, len(lengths)), lengths)
    mask = dict(sliding_window=window, softcap=cap)
    expected = paged_decode_reference(*decode, **mask)
    assert not np.allclose(expected, paged_decode_reference(*decode, sliding_window=window), atol=1e-2)
    _assert_close(paged_decode_attention(*decode, num_splits=2, interpret=INTERPRET, **mask), expected, jnp.float32)
    run = jax.jit(page_loop_decode_attention, static_argnames=("sliding_window", "softcap"))
    _assert_close(run(*decode, **mask), expected, jnp.float32)

    q_lens, kv_lens = [Z + 1, 3, 0, Z + 2], [Z + 1, Z + 5, 5, MAX_PAGES * Z]
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    packed = jnp.asarray(rng.randn(sum(q_lens) + 2, KV_HEADS * G, H) * 4, jnp.float32)
    prefill = (packed, k_pool, v_pool, 0, _tables(rng, len(q_lens)), cu_q_lens, jnp.asarray(kv_lens, jnp.int32))
    _assert_close(ragged_prefill_attention(*prefill, interpret=INTERPRET, **mask),
                  ragged_prefill_reference(*prefill, **mask), jnp.float32)
    positions = _prefill_rows(Z)
    rows = (jnp.asarray(rng.randn(*positions.shape, KV_HEADS * G, H) * 4, jnp.float32), k_pool, v_pool, 1,
            _tables(rng, len(positions)), positions)
    valid = np.asarray(positions) >= 0
    run = jax.jit(page_loop_prefill_attention, static_argnames=("sliding_window", "softcap"))
    _assert_close(np.asarray(run(*rows, **mask))[valid], np.asarray(paged_attention_reference(*rows, **mask))[valid],
                  jnp.float32)


@pytest.mark.parametrize("window", [None, 11])
def test_attention_sinks_match_reference_in_every_path(window):
    """gpt-oss's attention sinks (a logit per query head in every softmax's denominator) in both kernels, both
    page loops and the reference: against a softmax over the keys and the sink written out in numpy, and far
    enough from attention without them to matter. Empty slots and padding queries stay 0, not NaN."""
    rng = np.random.RandomState(6)
    Z, H, G = 8, 64, 4
    k_pool, v_pool = _pools(rng, jnp.float32, Z, H)
    sinks = jnp.asarray(rng.randn(KV_HEADS * G) * 2, jnp.float32)
    lengths = jnp.asarray([0, 1, Z + 1, MAX_PAGES * Z, 2 * Z - 1], jnp.int32)
    q = jnp.asarray(rng.randn(len(lengths), KV_HEADS * G, H), jnp.float32)
    decode = (q, k_pool, v_pool, 1, _tables(rng, len(lengths)), lengths)
    expected = paged_decode_reference(*decode, sliding_window=window, sinks=sinks)
    np.testing.assert_allclose(expected, _sink_attention_numpy(*decode, window, sinks), rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, paged_decode_reference(*decode, sliding_window=window), atol=1e-2)
    mask = dict(sliding_window=window, sinks=sinks)
    _assert_close(paged_decode_attention(*decode, num_splits=2, interpret=INTERPRET, **mask), expected, jnp.float32)
    run = jax.jit(page_loop_decode_attention, static_argnames=("sliding_window",))
    _assert_close(run(*decode, **mask), expected, jnp.float32)

    q_lens, kv_lens = [Z + 1, 3, 0, Z + 2], [Z + 1, Z + 5, 5, MAX_PAGES * Z]
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    packed = jnp.asarray(rng.randn(sum(q_lens) + 2, KV_HEADS * G, H), jnp.float32)
    prefill = (packed, k_pool, v_pool, 0, _tables(rng, len(q_lens)), cu_q_lens, jnp.asarray(kv_lens, jnp.int32))
    _assert_close(ragged_prefill_attention(*prefill, interpret=INTERPRET, **mask),
                  ragged_prefill_reference(*prefill, **mask), jnp.float32)
    positions = _prefill_rows(Z)
    rows = (jnp.asarray(rng.randn(*positions.shape, KV_HEADS * G, H), jnp.float32), k_pool, v_pool, 1,
            _tables(rng, len(positions)), positions)
    valid = np.asarray(positions) >= 0
    run = jax.jit(page_loop_prefill_attention, static_argnames=("sliding_window",))
    got = np.asarray(run(*rows, **mask))
    _assert_close(got[valid], np.asarray(paged_attention_reference(*rows, **mask))[valid], jnp.float32)
    assert not got[~valid].any()


def _sink_attention_numpy(q, k_pool, v_pool, layer, tables, lengths, window, sinks):
    """Decode attention with sinks, one slot and head at a time, as transformers' gpt-oss computes it."""
    q, k_pool, v_pool, tables, sinks = map(np.asarray, (q, k_pool, v_pool, tables, sinks))
    B, N, H = q.shape
    K, Z = k_pool.shape[1], k_pool.shape[3]
    out = np.zeros(q.shape, np.float64)
    for b, length in enumerate(np.asarray(lengths)):
        first = 0 if window is None else max(length - window, 0)
        for n in range(N):
            kv = n // (N // K)
            keys = np.concatenate([k_pool[layer, kv, p] for p in tables[b]])[first:length]
            values = np.concatenate([v_pool[layer, kv, p] for p in tables[b]])[first:length]
            logits = np.append(keys @ q[b, n] * H ** -0.5, sinks[n])
            weights = np.exp(logits - logits.max())
            out[b, n] = (weights[:-1] / weights.sum()) @ values
    return out


@pytest.mark.parametrize("family, config", [("qwen3", None), ("gpt_oss", None), ("gemma2", None),
                                            ("qwen3", {"head_dim": 24})])
def test_model_greedy_tokens_equal_with_pallas_backend(family, config, tmp_path):
    """The whole model with our kernels (interpret mode) decodes what the reference backend decodes (the
    `xla` default is held to transformers itself in tests/test_model_parity.py). gpt-oss adds attention sinks
    and sliding layers beside global ones; Gemma 2 capped logits and layers of two kinds (one attention with a
    traced window); a head dim of 24 is padded to 32 inside the kernels."""
    build(family, tmp_path, config=config)
    prompts = [list(range(3, 12)), list(range(40, 57)), list(range(100, 140))]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("reference", "pallas"):
        engine = EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, max_model_len=64,
                              dtype="float32", attention_backend=backend)
        llm = LLM(tmp_path, engine)
        assert llm.engine_config.attention_backend == backend
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert tokens["pallas"] == tokens["reference"]


def test_auto_backend_falls_back_when_kernels_fail(monkeypatch, caplog):
    """On a device where the kernels do not compile, `auto` serves with the reference instead of failing.
    Simulated by letting the engine believe it is on a GPU while the kernels, not in interpret mode,
    refuse to run on the CPU."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    llm = LLM(engine=EngineConfig(max_slots=1, page_size=8, max_model_len=32, dtype="float32"))
    monkeypatch.undo()
    assert llm.engine_config.attention_backend == "reference" and llm.engine_config.max_prefill_seqs == 1
    assert "failed its start-up check" in caplog.text
    assert llm.generate("Hi", SamplingParams(max_tokens=3))[0].outputs[0].token_ids


def test_kernel_self_check_passes_where_kernels_run(monkeypatch):
    from pallas_kernels import attention, paged_decode, ragged_prefill
    interpreted = {name: functools.partial(getattr(module, name), interpret=True)
                   for module, name in ((paged_decode, "paged_decode_attention"),
                                        (ragged_prefill, "ragged_prefill_attention"))}
    for name, fn in interpreted.items():
        fn.__name__ = name
        monkeypatch.setattr(attention, name, fn)
    assert attention.kernel_self_check(jnp.bfloat16, 16, 128, 2, 5) is None  # float32: the kernel sweeps above
    assert attention.kernel_self_check(jnp.bfloat16, 16, 128, 2, None, jnp.float8_e4m3fn) is None  # an fp8 cache
    assert attention.kernel_self_check(jnp.bfloat16, 16, 64, 8, 128, sinks=True) is None  # gpt-oss's
