"""Sampler benchmark: what each sampling setting costs per decode round, on device conds against static passes.

Times `jaxinfer.sampling.sample` alone (jitted) on random logits [rows, vocab] for each kind of batch
(greedy; plain random; top-p; penalties; logprobs; logit biases; bad words), two ways side by side: the optional passes chosen
on device by `lax.cond` (`control_flow="dynamic"`, the CPU default) and compiled in by the host
(`"static"`, the GPU default). Also the filter threshold alone: the halving search the sampler uses
against the descending sort it replaced. Every figure is the median of several timed runs after a
compile-and-warm run. Examples:

    python scripts/bench_sampling.py                               # 32 x 49,152 (SmolLM2 vocab)
    python scripts/bench_sampling.py --rows 256 --vocab 128256     # Llama-3's vocab at 256 slots
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import sampling
from jaxinfer.engine.request import MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS, MAX_LOGIT_EDITS
from jaxinfer.engine.scheduler import neutral_sampling
from jaxinfer.sampling import Passes, PenaltyState, SamplingTensors

KINDS = {  # name: every row's settings where they differ from neutral
    "greedy": dict(temperature=0.0),
    "random": dict(temperature=1.0),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "top_k_min_p": dict(temperature=1.0, top_k=50, min_p=0.05),
    "penalty": dict(temperature=0.0, repetition_penalty=1.2),
    "logprobs": dict(temperature=0.0, wants_logprobs=1),
    "logit_bias": dict(temperature=0.0, uses_edits=1),  # 1,024 biased ids a row, the most a request may give
    "bad_words": dict(temperature=0.0, uses_edits=1),  # 128 words of 32 tokens a row, the most a request may give
}


def settings(rows: int, **values) -> dict:
    """The scheduler's neutral rows with `values` set on every row, each row its own seed."""
    out = neutral_sampling(rows)
    for name, value in values.items():
        out[name][:] = value
    out["seed"] = np.arange(rows, dtype=np.uint32)
    return out


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sorted_floor(scaled, st: SamplingTensors):
    """The threshold by a descending sort of every row (what the sampler did before the halving search)."""
    vocab = scaled.shape[-1]
    desc = jnp.sort(scaled, axis=-1, descending=True)
    floor = desc[:, 0] + jnp.log(st.min_p)
    kth = jnp.take_along_axis(desc, jnp.clip(st.top_k - 1, 0, vocab - 1)[:, None], axis=-1)[:, 0]
    floor = jnp.maximum(floor, jnp.where((st.top_k > 0) & (st.top_k < vocab), kth, -jnp.inf))
    probs = jax.nn.softmax(jnp.where(desc >= floor[:, None], desc, -jnp.inf), axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    nucleus = jnp.min(jnp.where(mass_above < st.top_p[:, None], desc, jnp.inf), axis=-1)
    return jnp.maximum(floor, jnp.where(st.top_p < 1, nucleus, -jnp.inf))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="batches to time")
    args = parser.parse_args()
    B, V = args.rows, args.vocab
    logits = jax.random.normal(jax.random.PRNGKey(0), (B, V), jnp.float32) * 3
    rng = np.random.default_rng(0)
    penalties = PenaltyState(jnp.asarray(rng.random((B, V)) < 0.01, jnp.int32), jnp.asarray(rng.random((B, V)) < 0.01))
    positions = jnp.arange(B, dtype=jnp.int32)
    banned = jnp.full((B, 4), -1, jnp.int32)
    empty = sampling.empty_edits(B, MAX_LOGIT_EDITS, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS)
    bias_ids = jnp.asarray(np.stack([rng.permutation(V)[:MAX_LOGIT_EDITS] for _ in range(B)]), jnp.int32)
    # Every word's prefix is the row's recent tokens but for its first token: every comparison runs, none bans.
    recent = jnp.asarray(rng.integers(0, V, (B, MAX_BAD_WORD_TOKENS - 1)), jnp.int32)
    words = jnp.broadcast_to(jnp.concatenate([recent, recent[:, :1]], axis=1)[:, None], (B, MAX_BAD_WORDS,
                                                                                         MAX_BAD_WORD_TOKENS))
    edits = {"logit_bias": dataclasses.replace(empty, bias_ids=bias_ids, bias=jnp.ones(bias_ids.shape, jnp.float32)),
             "bad_words": dataclasses.replace(empty, bad_words=words.at[:, :, 0].add(1), recent=recent)}
    print(f"# sample() on [{B}, {V}] float32 logits, {jax.devices()[0].device_kind} ({platform.machine()}); "
          f"medians of {args.repeats}")
    print("| batch | on-device conds (ms) | static passes (ms) | passes |")
    print("| --- | ---: | ---: | --- |")
    for name in args.kinds:
        rows = settings(B, **KINDS[name])
        st = SamplingTensors(**{n: jnp.asarray(v) for n, v in rows.items()}, banned=banned,
                             edits=edits.get(name, empty))
        passes = Passes.needed(rows, V)
        times = [median_seconds(jax.jit(lambda x, st, p=p: sampling.sample(x, st, positions, penalties, p)),
                                (logits, st), args.repeats) for p in (None, passes)]
        used = ", ".join(n for n, on in vars(passes).items() if on) or "none"
        print(f"| {name} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} | {used} |", flush=True)
    every_filter = settings(B, **KINDS["top_k_min_p"], top_p=0.9)
    st = SamplingTensors(**{n: jnp.asarray(v) for n, v in every_filter.items()}, banned=banned, edits=empty)
    search, sort = (median_seconds(jax.jit(fn), (logits, st), args.repeats)
                    for fn in (sampling._filter_floor, sorted_floor))
    print(f"filter threshold alone (top_k 50, min_p 0.05, top_p 0.9): halving search {search * 1e3:.2f} ms, "
          f"descending sort {sort * 1e3:.2f} ms ({sort / search:.1f}x)")


if __name__ == "__main__":
    main()
