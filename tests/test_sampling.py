"""Device sampling against a plain-numpy reference: penalties, bans, filters, seeded draws, logprobs, batch independence."""

import jax
import numpy as np
import pytest

from jaxinfer import sampling
from jaxinfer.sampling import (MAX_LOGPROBS, LogitEdits, Passes, _filter_floor, PenaltyState, SamplingTensors,
                               empty_edits, empty_penalty_state, load_edits_row, load_penalty_row, record_recent,
                               record_tokens, sample, token_logprobs)

B, V, E, N = 6, 257, 4, 8  # rows, vocab, banned entries per row, allowed ids / logit biases per row
W, T = 5, 4  # bad words per row, tokens per bad word
EDITS = ("allowed_ids", "bias_ids", "bias", "bad_words", "recent")
DRAWS = 1000  # seeded draws per row when probing a support

_sample = jax.jit(sample, static_argnames="passes")


def _settings(rows, banned_width=E, **values):
    """Per-row settings as numpy arrays [rows]; neutral unless given (a scalar or one value per row)."""
    neutral = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
                   repetition_penalty=1.0, seed=0, wants_logprobs=1, uses_edits=0)
    dtypes = dict(top_k=np.int32, seed=np.uint32, wants_logprobs=np.int32, uses_edits=np.int32)
    s = {name: np.broadcast_to(np.asarray(values.get(name, default), dtypes.get(name, np.float32)), (rows,)).copy()
         for name, default in neutral.items()}
    s["banned"] = np.asarray(values.get("banned", np.full((rows, banned_width), -1)), np.int32)
    shapes = dict(bad_words=(rows, W, T), recent=(rows, T - 1))
    for name in EDITS:
        neutral = np.full(shapes.get(name, (rows, N)), 0.0 if name == "bias" else -1)
        s[name] = np.asarray(values.get(name, neutral), np.float32 if name == "bias" else np.int32)
    return s


def _tensors(s):
    return SamplingTensors(**{k: v for k, v in s.items() if k not in EDITS}, edits=LogitEdits(*(s[k] for k in EDITS)))


def _run(logits, s, counts=None, prompt=None, positions=None, passes=None):
    rows, vocab = logits.shape
    counts = np.zeros((rows, vocab), np.int32) if counts is None else counts
    prompt = np.zeros((rows, vocab), bool) if prompt is None else prompt
    positions = np.full(rows, 7, np.int32) if positions is None else positions
    return _sample(logits, _tensors(s), positions, PenaltyState(counts, prompt), passes=passes)


def _draw_many(logits, s, counts, prompt, n=DRAWS):
    """Tokens [B, n]: each row drawn n times, with seeds 0..n-1."""
    rows = logits.shape[0]
    many = {name: np.repeat(value, n, axis=0) for name, value in s.items()}
    many["seed"] = np.tile(np.arange(n, dtype=np.uint32), rows)
    tokens = _run(np.repeat(logits, n, axis=0), many, np.repeat(counts, n, axis=0), np.repeat(prompt, n, axis=0))
    return np.asarray(tokens.tokens).reshape(rows, n)


def ref_process(logits, s, counts, prompt):
    """As vLLM: allowed ids, bad words, logit bias, then penalties (repetition on prompt and output tokens,
    frequency, presence) and bans."""
    x = logits.copy()
    for row in np.flatnonzero(s["uses_edits"]):
        allowed = s["allowed_ids"][row][s["allowed_ids"][row] >= 0]
        if allowed.size:
            x[row, np.setdiff1d(np.arange(x.shape[1]), allowed)] = -np.inf
        generated = [t for t in s["recent"][row] if t >= 0]
        for word in s["bad_words"][row]:
            word = [t for t in word if t >= 0]
            if word and len(word) - 1 <= len(generated) and generated[len(generated) - len(word) + 1:] == word[:-1]:
                x[row, word[-1]] = -np.inf
        used = s["bias_ids"][row] >= 0
        x[row, s["bias_ids"][row][used]] += s["bias"][row][used]
    r = s["repetition_penalty"][:, None]
    x = np.where(prompt | (counts > 0), np.where(x > 0, x / r, x * r), x)
    x = x - s["frequency_penalty"][:, None] * counts - s["presence_penalty"][:, None] * (counts > 0)
    for row, ids in enumerate(s["banned"]):
        x[row, ids[ids >= 0]] = -np.inf
    return x.astype(np.float32)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_support(logits, s, counts, prompt):
    """Tokens [B, V] a random row may draw: min_p, then top_k, then top_p over what is left."""
    scaled = ref_process(logits, s, counts, prompt).astype(np.float64) / s["temperature"][:, None]
    keep = np.zeros(scaled.shape, bool)
    for row, x in enumerate(scaled):
        probs = _softmax(x)
        x = np.where(probs >= s["min_p"][row] * probs.max(), x, -np.inf)
        k = s["top_k"][row]
        if 0 < k < x.size:
            x = np.where(x >= np.sort(x)[::-1][k - 1], x, -np.inf)
        if s["top_p"][row] < 1:
            order = np.argsort(-x, kind="stable")
            probs = _softmax(x)[order]
            nucleus = order[np.cumsum(probs) - probs < s["top_p"][row]]
            x = np.where(np.isin(np.arange(x.size), nucleus), x, -np.inf)
        keep[row] = x > -np.inf
    return keep


@pytest.fixture(scope="module")
def case():
    """Random logits with output counts, prompt tokens and one penalty of each kind."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(B, V)) * 2).astype(np.float32)
    counts = (rng.random((B, V)) < 0.05) * rng.integers(1, 4, size=(B, V))
    prompt = rng.random((B, V)) < 0.05
    best = np.argmax(logits, axis=-1)  # seen before, so the penalties move the greedy choice
    counts[np.arange(B), best] = 2
    prompt[np.arange(B), best] = True
    penalties = dict(repetition_penalty=[1.0, 1.3, 0.8, 1.0, 1.0, 1.5], frequency_penalty=[0, 0, 0, 0.7, 0, -0.2],
                     presence_penalty=[0, 0, 0, 0, 1.2, 0.3])
    banned = np.full((B, E), -1)
    banned[2, :2] = np.argsort(-logits[2])[:2]  # the two best of row 2
    return logits, counts.astype(np.int32), prompt, dict(penalties, banned=banned)


def test_greedy_applies_penalties_and_bans(case):
    logits, counts, prompt, extra = case
    s = _settings(B, temperature=0.0, **extra)
    tokens = np.asarray(_run(logits, s, counts, prompt).tokens)
    np.testing.assert_array_equal(tokens, np.argmax(ref_process(logits, s, counts, prompt), axis=-1))
    assert (tokens != np.argmax(logits, axis=-1)).sum() >= 4  # the penalties and bans did change something


@pytest.mark.parametrize("narrow", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_narrowest_filters_equal_greedy(case, narrow):
    logits, counts, prompt, extra = case
    greedy = _run(logits, _settings(B, temperature=0.0, **extra), counts, prompt).tokens
    for seed in range(3):
        s = _settings(B, temperature=[0.5, 1.0, 1.5, 2.0, 0.7, 1.0], seed=seed, **extra, **narrow)
        np.testing.assert_array_equal(_run(logits, s, counts, prompt).tokens, greedy)


@pytest.mark.parametrize("filters", [
    dict(min_p=[0.05, 0.1, 0.2, 0.3, 0.5, 0.02]),
    dict(top_k=[2, 5, 10, 20, 40, 3]),
    dict(top_p=[0.3, 0.5, 0.7, 0.9, 0.95, 0.6]),
    dict(min_p=0.02, top_k=[10, 40, 5, 0, 30, 200], top_p=[0.9, 0.8, 1.0, 0.7, 0.95, 0.9]),
])
def test_filters_keep_the_reference_support(case, filters):
    logits, counts, prompt, extra = case
    temperature = [0.7, 1.0, 1.3, 0.5, 2.0, 1.0]
    s = _settings(B, temperature=temperature, **extra, **filters)
    support = ref_support(logits, s, counts, prompt)
    assert (support.sum(axis=-1) < V).all() and (support.sum(axis=-1) > 1).any()
    drawn = _draw_many(logits, s, counts, prompt)
    unfiltered = _draw_many(logits, _settings(B, temperature=temperature, **extra), counts, prompt)
    for row in range(B):
        assert support[row, drawn[row]].all(), f"row {row} drew outside the reference support"
        assert not support[row, unfiltered[row]].all(), f"row {row}: the filter was not needed"
        if support[row].sum() <= 5:  # a small support is drawn in full
            assert set(drawn[row]) == set(np.flatnonzero(support[row]))


def test_seeds_reproduce_and_differ(case):
    logits, counts, prompt, extra = case
    s = _settings(B, temperature=1.0, seed=[1, 2, 3, 4, 5, 6], **extra)
    first = _run(logits, s, counts, prompt)
    jax.tree.map(np.testing.assert_array_equal, first, _run(logits, s, counts, prompt))
    drawn = _draw_many(logits, s, counts, prompt, n=DRAWS)
    assert all(len(set(row)) > 20 for row in drawn)  # seeds differ
    positions = [_run(logits, s, counts, prompt, np.full(B, p, np.int32)).tokens for p in range(8)]
    assert len({tuple(np.asarray(t)) for t in positions}) == 8  # positions differ


def _split(logits, s, counts, prompt, positions):
    """One dict per row holding all of that row's inputs."""
    inputs = dict(s, logits=logits, counts=counts, prompt=prompt, position=positions)
    return [{name: value[row] for name, value in inputs.items()} for row in range(len(logits))]


def _run_rows(rows):
    stacked = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
    inputs = [stacked.pop(name) for name in ("logits", "counts", "prompt", "position")]
    out = _run(inputs[0], stacked, *inputs[1:])
    return [[np.asarray(field)[index] for field in jax.tree.leaves(out)] for index in range(len(rows))]


def _random_edits(rng, rows):
    """Allowed ids (a third of the rows unrestricted), biases and bad words, -1 padded."""
    allowed = rng.integers(0, V, size=(rows, N))
    allowed[:, rng.integers(1, N):] = -1
    allowed[rng.random(rows) < 1 / 3] = -1
    bias_ids = np.stack([rng.permutation(V)[:N] for _ in range(rows)])
    bias_ids[:, rng.integers(1, N):] = -1
    return dict(allowed_ids=allowed, bias_ids=bias_ids, bias=rng.uniform(-5, 5, size=(rows, N)),
                **_random_bad_words(rng, rows))


def _random_bad_words(rng, rows):
    """Recent tokens from a 3-token alphabet (some rows with fewer than T - 1 generated), and W words of 1 to
    T tokens (some unused) whose prefixes are drawn from the same alphabet, so that many of them match."""
    alphabet = rng.choice(V, 3, replace=False)
    recent = alphabet[rng.integers(0, 3, size=(rows, T - 1))]
    for row in range(rows):
        recent[row, :rng.integers(0, T)] = -1
    words = np.full((rows, W, T), -1)
    for row in range(rows):
        for w in range(rng.integers(0, W + 1)):
            length = rng.integers(1, T + 1)
            words[row, w, T - length:-1] = alphabet[rng.integers(0, 3, size=length - 1)]
            words[row, w, -1] = rng.integers(0, V)
    return dict(bad_words=words, recent=recent)


def _neighbours(rng, busy, temperature=1.0):
    """8 random rows: busy ones use every feature (so every cond switches on), quiet ones none."""
    logits = (rng.normal(size=(8, V)) * 2).astype(np.float32)
    seed = rng.integers(0, 2**32, size=8)
    positions = rng.integers(0, 1000, size=8).astype(np.int32)
    if not busy:
        quiet = _settings(8, temperature=temperature, seed=seed)
        return _split(logits, quiet, np.zeros((8, V), np.int32), np.zeros((8, V), bool), positions)
    s = _settings(8, temperature=[1.0, *rng.choice([0.0, 0.8, 1.5], size=7)], top_k=[3, *rng.choice([0, 50], size=7)],
                  top_p=rng.choice([1.0, 0.6], size=8), min_p=rng.choice([0.0, 0.1], size=8),
                  repetition_penalty=[1.4, *rng.choice([1.0, 1.4], size=7)],
                  frequency_penalty=rng.choice([0.0, 0.5], size=8), presence_penalty=rng.choice([0.0, 0.9], size=8),
                  seed=seed, banned=rng.integers(-1, V, size=(8, E)), **_random_edits(rng, 8),
                  uses_edits=[1, *rng.choice([0, 1], size=7)])
    counts = rng.integers(0, 3, size=(8, V)).astype(np.int32)
    return _split(logits, s, counts, rng.random((8, V)) < 0.1, positions)


def test_rows_are_batch_independent(case):
    """A row's outputs are bit-identical whatever its neighbours hold, including when they switch the conds."""
    logits, counts, prompt, extra = case
    s = _settings(B, temperature=[0.0, 1.0, 0.9, 0.0, 1.2, 0.7], top_k=[0, 0, 40, 0, 0, 5],
                  top_p=[1, 1, 0.8, 1, 1, 1], min_p=[0, 0, 0.01, 0, 0, 0], seed=[11, 12, 13, 14, 15, 16], **extra)
    for name, neutral in [("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0)]:
        s[name][:2] = neutral
    s["banned"][:2] = -1
    s.update(_random_edits(np.random.default_rng(2), B), uses_edits=[0, 0, 1, 0, 1, 1])  # rows 0, 1: stale edits
    counts, prompt = counts.copy(), prompt.copy()
    counts[:2], prompt[:2] = 0, False  # rows 0 and 1: plain greedy and plain random, using no feature
    targets = _split(logits, s, counts, prompt, np.arange(100, 100 + B, dtype=np.int32))
    rng = np.random.default_rng(1)
    layouts = [  # (neighbours, {batch index: target}), from no cond taken to every cond taken
        (_neighbours(rng, busy=False, temperature=0.0), {0: 0}),
        (_neighbours(rng, busy=False), {3: 0, 5: 1}),
        (_neighbours(rng, busy=True), {1: 0, 0: 1, 2: 2, 3: 3, 4: 4, 5: 5}),
        (_neighbours(rng, busy=True), {7: 0, 6: 1, 5: 2, 4: 3, 3: 4, 2: 5}),
    ]
    seen = {}
    for rows, placed in layouts:
        for index, target in placed.items():
            rows[index] = targets[target]
        out = _run_rows(rows)
        for index, target in placed.items():
            first = seen.setdefault(target, out[index])
            for a, b in zip(first, out[index]):
                np.testing.assert_array_equal(a, b, err_msg=f"target row {target} at batch index {index}")
    assert all(target in seen for target in range(B))


def test_allowed_ids_and_logit_bias_come_before_the_penalties(case):
    """The processed logits equal the reference's (vLLM's order: allowed ids, bias, then penalties: a bias on a
    repeated token is divided by the repetition penalty with it); rows not using edits ignore the stale ones."""
    logits, counts, prompt, extra = case
    s = _settings(B, temperature=0.0, uses_edits=[1, 1, 1, 0, 1, 1], **_random_edits(np.random.default_rng(3), B),
                  **dict(extra, banned=np.full((B, E), -1)))
    s["bias_ids"][:, 0], s["bias"][:, 0] = np.argmax(logits, axis=-1), 4.0  # the repeated best token
    s["allowed_ids"][1] = -1  # bias alone
    s["bias_ids"][2] = -1  # allowed ids alone
    s["allowed_ids"][2, :3] = [7, 100, 256]
    processed = jax.jit(sampling._edit_and_penalize)(logits, _tensors(s), PenaltyState(counts, prompt))
    expected = ref_process(logits, s, counts, prompt)
    np.testing.assert_allclose(np.asarray(processed), expected, rtol=1e-6)
    assert (np.asarray(processed)[2] > -np.inf).sum() == 3
    tokens = np.asarray(_run(logits, s, counts, prompt).tokens)
    np.testing.assert_array_equal(tokens, np.argmax(expected, axis=-1))
    assert tokens[2] in (7, 100, 256)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_bias_of_100_forces_and_minus_100_bans_a_token(case, temperature):
    """OpenAI's documented extremes: +100 selects the token, -100 keeps it out; draws stay in allowed ids."""
    logits, counts, prompt, _ = case
    worst = np.argmin(logits, axis=-1)
    forced = _settings(B, temperature=temperature, seed=[1, 2, 3, 4, 5, 6], uses_edits=1,
                       bias_ids=np.pad(worst[:, None], ((0, 0), (0, N - 1)), constant_values=-1),
                       bias=np.pad(np.full((B, 1), 100.0), ((0, 0), (0, N - 1))))
    np.testing.assert_array_equal(_draw_many(logits, forced, counts, prompt, n=50), np.repeat(worst[:, None], 50, 1))
    best = np.argsort(-logits, axis=-1)[:, :2]
    banned = dict(forced, bias_ids=np.pad(best, ((0, 0), (0, N - 2)), constant_values=-1),
                  bias=np.pad(np.full((B, 2), -100.0), ((0, 0), (0, N - 2))))
    drawn = _draw_many(logits, banned, counts, prompt, n=200)
    assert not (drawn[:, :, None] == best[:, None, :]).any()
    allowed = dict(forced, allowed_ids=np.pad(best, ((0, 0), (0, N - 2)), constant_values=-1),
                   bias_ids=np.full((B, N), -1))
    drawn = _draw_many(logits, allowed, counts, prompt, n=200)
    assert (drawn[:, :, None] == best[:, None, :]).any(axis=-1).all()


@pytest.mark.parametrize("bias", [-1e36, -float(np.finfo(np.float32).max), 1e36, float(np.finfo(np.float32).max)])
@pytest.mark.parametrize("filters", [{}, dict(top_p=[1, 0.5, 1, 1, 1, 1]), dict(min_p=[0, 0.1, 0, 0, 0, 0], top_k=2)])
def test_any_finite_bias_keeps_the_token_allowed_and_finite(case, bias, filters):
    """SamplingParams takes any finite bias. One that overflows float32 once scaled by a repetition penalty
    or a small temperature must neither drop the row's only allowed token (-inf) nor make the filters'
    thresholds NaN (+inf), whichever filters the row or its neighbours use."""
    logits, counts, prompt, _ = case
    prompt = prompt.copy()
    prompt[:, 5] = True
    allowed = np.full((B, N), -1)
    allowed[:, :2] = [5, 5 if bias < 0 else 9]  # a duplicate id, or a rival
    s = _settings(B, temperature=[0.0, 1e-5, 1e-3, 0.5, 1.0, 0.0], repetition_penalty=[1.5, 1, 0.5, 1.5, 1, 0.5],
                  seed=[1, 2, 3, 4, 5, 6], uses_edits=1, allowed_ids=allowed,
                  bias_ids=np.pad(np.full((B, 1), 5), ((0, 0), (0, N - 1)), constant_values=-1),
                  bias=np.pad(np.full((B, 1), bias), ((0, 0), (0, N - 1))), **filters)
    out = _run(logits, s, counts, prompt)
    np.testing.assert_array_equal(out.tokens, np.full(B, 5))
    assert not any(np.isnan(np.asarray(field)).any() for field in jax.tree.leaves(out))


def test_load_edits_row():
    edits = empty_edits(3, N, W, T)
    ids = np.arange(N, dtype=np.int32)
    words = np.arange(W * T, dtype=np.int32).reshape(1, W, T)
    row = LogitEdits(ids[None], ids[None] + 10, ids[None] * 0.5, words, words[:, 0, 1:])
    edits = jax.jit(load_edits_row)(edits, 1, row)
    for name in EDITS:
        np.testing.assert_array_equal(getattr(edits, name)[1], getattr(row, name)[0])
    assert (np.asarray(edits.allowed_ids)[[0, 2]] == -1).all() and (np.asarray(edits.bias)[[0, 2]] == 0).all()
    assert (np.asarray(edits.bad_words)[[0, 2]] == -1).all() and (np.asarray(edits.recent)[[0, 2]] == -1).all()


def test_record_recent_keeps_the_last_tokens_of_sampled_rows():
    edits = empty_edits(2, N, W, T)
    record = jax.jit(record_recent)
    for token in range(1, T + 2):
        edits = record(edits, np.array([token, 100 + token], np.int32), np.array([True, token % 2 == 0]))
    np.testing.assert_array_equal(edits.recent, [[T - 1, T, T + 1], [-1, 102, 104]])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bad_words_ban_the_last_token_after_their_prefix(case, temperature):
    """vLLM's rule against a plain-Python reference: a one-token word is always banned; a longer one only when
    the generated tokens end in its prefix (a prefix longer than what was generated never matches)."""
    logits = case[0]
    rng = np.random.default_rng(5)
    no_counts, no_prompt = np.zeros((B, V), np.int32), np.zeros((B, V), bool)
    banned_long = kept_long = 0  # words of 2+ tokens whose last token was banned, and not
    for trial in range(6):
        s = _settings(B, temperature=temperature, seed=rng.integers(0, 2**32, size=B), uses_edits=[1, 1, 1, 1, 1, 0],
                      **_random_bad_words(rng, B))
        best = np.argsort(-logits, axis=-1)[:, :W]
        s["bad_words"][:, :, -1] = np.where(s["bad_words"][:, :, -1] >= 0, best, -1)  # bans that move the argmax
        processed = jax.jit(sampling._edit_and_penalize)(logits, _tensors(s), PenaltyState(no_counts, no_prompt))
        expected = ref_process(logits, s, no_counts, no_prompt)
        np.testing.assert_array_equal(np.asarray(processed), expected, err_msg=f"trial {trial}")
        tokens = np.asarray(_run(logits, s).tokens)
        assert np.isfinite(expected[np.arange(B), tokens]).all()
        long_words = (s["bad_words"][:5, :, -2] >= 0)
        hit = expected[np.arange(5)[:, None], best[:5]] == -np.inf
        banned_long, kept_long = banned_long + (long_words & hit).sum(), kept_long + (long_words & ~hit).sum()
    assert banned_long and kept_long


def test_temperature_draws_follow_the_softmax():
    """Over many seeds and positions the draws match softmax(logits / T), renormalized over top_k's support."""
    n, vocab = 20000, 8
    logits = np.array([[1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -0.5, 0.8]] * 2, np.float32)
    s = _settings(2, temperature=[0.7, 1.3], top_k=[0, 3], banned_width=1)
    many = {name: np.repeat(value, n, axis=0) for name, value in s.items()}
    many["seed"] = np.tile(np.arange(n, dtype=np.uint32) % 100, 2)
    positions = np.tile(np.arange(n, dtype=np.int32) // 100, 2)
    drawn = np.asarray(_run(np.repeat(logits, n, axis=0), many, positions=positions).tokens).reshape(2, n)
    expected = np.stack([_softmax(logits[0] / 0.7), _softmax(np.where(logits[1] >= 1.0, logits[1], -np.inf) / 1.3)])
    for row in range(2):
        frequency = np.bincount(drawn[row], minlength=vocab) / n
        assert 0.5 * np.abs(frequency - expected[row]).sum() < 0.02, (frequency, expected[row])


def _ref_logprobs(logits):
    x = logits.astype(np.float64)
    return x - x.max(axis=-1, keepdims=True) - np.log(np.exp(x - x.max(axis=-1, keepdims=True)).sum(-1, keepdims=True))


def test_logprobs_are_of_the_raw_logits(case):
    logits, counts, prompt, extra = case
    s = _settings(B, temperature=[0.0, 1.0, 2.0, 0.5, 1.0, 3.0], seed=[3, 1, 4, 1, 5, 9], **extra)
    out = _run(logits, s, counts, prompt)
    ref = _ref_logprobs(logits)
    tokens = np.asarray(out.tokens)
    chosen = ref[np.arange(B), tokens]
    np.testing.assert_allclose(out.logprob, chosen, rtol=1e-5)
    np.testing.assert_array_equal(out.rank, 1 + (ref > chosen[:, None]).sum(-1))
    assert (np.asarray(out.rank) > 1).any()  # penalties, bans and temperature moved some choices off the top
    order = np.argsort(-ref, axis=-1, kind="stable")[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(out.top_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, order, axis=-1), rtol=1e-5)


def test_logprobs_are_skipped_only_when_no_row_wants_them(case):
    """A row that asks gets the same logprobs whoever else asks; with no row asking none are computed
    (every row reports zeros); the sampled tokens never change."""
    logits, counts, prompt, extra = case
    settings = dict(temperature=[0.0, 1.0, 2.0, 0.5, 1.0, 3.0], seed=[3, 1, 4, 1, 5, 9], **extra)
    every = _run(logits, _settings(B, **settings), counts, prompt)
    one = _run(logits, _settings(B, wants_logprobs=[0, 1, 0, 0, 0, 0], **settings), counts, prompt)
    none = _run(logits, _settings(B, wants_logprobs=0, **settings), counts, prompt)
    np.testing.assert_array_equal(one.tokens, every.tokens)
    np.testing.assert_array_equal(none.tokens, every.tokens)
    for field in ("logprob", "rank", "top_ids", "top_logprobs"):
        np.testing.assert_array_equal(getattr(one, field)[1], getattr(every, field)[1])
        assert not np.asarray(getattr(none, field)).any(), field
    assert (np.asarray(every.rank) > 0).all()


def test_prompt_logprobs_and_a_vocab_below_max_logprobs():
    rng = np.random.default_rng(3)
    for rows, vocab in [(5, V), (3, 8)]:
        logits = rng.normal(size=(rows, vocab)).astype(np.float32)
        tokens = rng.integers(0, vocab, size=rows).astype(np.int32)
        logprob, rank, top_ids, top_logprobs = jax.jit(token_logprobs)(logits, tokens)
        ref = _ref_logprobs(logits)
        np.testing.assert_allclose(logprob, ref[np.arange(rows), tokens], rtol=1e-5)
        np.testing.assert_array_equal(rank, 1 + (ref > ref[np.arange(rows), tokens][:, None]).sum(-1))
        shown = min(vocab, MAX_LOGPROBS)
        np.testing.assert_array_equal(top_ids[:, :shown], np.argsort(-ref, axis=-1)[:, :shown])
        assert top_ids.shape == top_logprobs.shape == (rows, MAX_LOGPROBS)
        assert (np.asarray(top_ids)[:, shown:] == -1).all() and np.isneginf(top_logprobs[:, shown:]).all()


def test_record_tokens_and_load_penalty_row():
    state = empty_penalty_state(3, 10)
    assert state.output_counts.dtype == np.int32 and state.prompt_mask.dtype == bool
    record = jax.jit(record_tokens)
    state = record(state, np.array([4, 4, 9], np.int32), np.array([True, False, True]))
    state = record(state, np.array([4, 1, 9], np.int32), np.array([True, True, True]))
    expected = np.zeros((3, 10), np.int32)
    expected[0, 4], expected[1, 1], expected[2, 9] = 2, 1, 2
    np.testing.assert_array_equal(state.output_counts, expected)
    mask_row, counts_row = np.arange(10) % 3 == 0, np.arange(10, dtype=np.int32)
    state = jax.jit(load_penalty_row)(state, np.int32(1), mask_row, counts_row)
    expected[1] = counts_row
    np.testing.assert_array_equal(state.output_counts, expected)
    np.testing.assert_array_equal(state.prompt_mask, np.stack([np.zeros(10, bool), mask_row, np.zeros(10, bool)]))


def test_banned_ids_are_never_drawn(case):
    logits, counts, prompt, extra = case
    banned = np.argsort(-logits, axis=-1)[:, :E].astype(np.int32)  # each row's best tokens
    banned[0, -1] = -1
    s = _settings(B, temperature=2.0, banned=banned)
    drawn = _draw_many(logits, s, np.zeros_like(counts), np.zeros_like(prompt))
    unbanned = _draw_many(logits, _settings(B, temperature=2.0), np.zeros_like(counts), np.zeros_like(prompt))
    for row in range(B):
        assert not np.isin(drawn[row], banned[row][banned[row] >= 0]).any()
        assert np.isin(unbanned[row], banned[row]).any()


def test_all_but_one_banned_gives_that_one_without_nan(case):
    logits, counts, prompt, extra = case
    allowed = np.array([5, 17, 100, 256, 0, 42])
    banned = np.stack([np.delete(np.arange(V), keep) for keep in allowed]).astype(np.int32)
    for temperature, filters in [(0.0, {}), (1.0, {}), (0.8, dict(top_k=3, top_p=0.5, min_p=0.1))]:
        s = _settings(B, temperature=temperature, seed=[1, 2, 3, 4, 5, 6], **dict(extra, banned=banned), **filters)
        out = _run(logits, s, counts, prompt)
        np.testing.assert_array_equal(out.tokens, allowed)
        assert not any(np.isnan(np.asarray(field)).any() for field in jax.tree.leaves(out))


STATIC_CASES = [  # (settings, the passes the host must compile in)
    (dict(temperature=0.0, wants_logprobs=0), Passes()),
    (dict(temperature=0.0, wants_logprobs=[0, 0, 0, 0, 0, 1]), Passes(logprobs=True)),
    (dict(temperature=[0, 0, 0.7, 0, 0, 0], wants_logprobs=0), Passes(draw=True)),
    (dict(temperature=[0, 0, 0.7, 0, 0, 0], top_k=[0, 0, 0, 0, 0, 9], wants_logprobs=0), Passes(draw=True)),
    (dict(temperature=[0, 0, 0.7, 0, 0, 0], top_k=[0, 0, V, 0, 0, 0], wants_logprobs=0), Passes(draw=True)),
    (dict(temperature=[0, 0, 0.7, 0, 0, 0], top_p=[1, 1, 0.9, 1, 1, 1], wants_logprobs=0),
     Passes(draw=True, filter=True)),
    (dict(temperature=[1, 0, 0, 0, 0, 0], min_p=[0.05, 0, 0, 0, 0, 0], wants_logprobs=0),
     Passes(draw=True, filter=True)),
    (dict(temperature=0.0, repetition_penalty=[1, 1, 1, 1.2, 1, 1], wants_logprobs=0), Passes(penalties=True)),
    (dict(temperature=0.0, presence_penalty=[0, -0.5, 0, 0, 0, 0], wants_logprobs=0), Passes(penalties=True)),
    (dict(temperature=0.0, uses_edits=[0, 0, 0, 0, 1, 0], bias_ids=[[3] + [-1] * (N - 1)] * B,
          bias=[[9.0] + [0.0] * (N - 1)] * B, wants_logprobs=0), Passes(penalties=True)),
    (dict(temperature=[0, 0.5, 0, 1, 0, 2], top_k=[0, 3, 0, 0, 0, 0], frequency_penalty=[0, 0, 0, 0, 0.4, 0]),
     Passes(True, True, True, True)),
]


@pytest.mark.parametrize("settings, passes", STATIC_CASES)
def test_static_passes_match_the_device_choice(case, settings, passes):
    """The host's `Passes.needed` names exactly the passes the on-device conds take; a sampler compiled with
    those passes, or with every pass, gives the same bits as the one that chooses on device (rows not using
    a pass never see it)."""
    logits, counts, prompt, _ = case
    s = _settings(B, seed=[5, 6, 7, 8, 9, 10], **settings)
    assert Passes.needed(s, V) == passes
    assert Passes.from_code(passes.code) == passes
    on_device = _run(logits, s, counts, prompt)
    for static in (passes, Passes(True, True, True, True)):
        out = _run(logits, s, counts, prompt, passes=static)
        for field in ("tokens", "logprob", "rank", "top_ids", "top_logprobs"):
            wants = s["wants_logprobs"] != 0 if field != "tokens" else np.ones(B, bool)
            np.testing.assert_array_equal(np.asarray(getattr(out, field))[wants],
                                          np.asarray(getattr(on_device, field))[wants], err_msg=f"{static} {field}")


def _sorted_floor(x, top_k, top_p, min_p):
    """One row's floor the plain way: sort descending, then min_p, top_k and top_p (renormalized) in turn."""
    desc = np.sort(x)[::-1]
    floor = desc[0] + (np.log(min_p) if min_p > 0 else np.float32(-np.inf))  # float32, as on device
    if 0 < top_k < x.size:
        floor = max(floor, desc[top_k - 1])
    if top_p < 1:
        probs = np.where(desc >= floor, np.exp(desc.astype(np.float64) - desc[0]), 0.0)
        probs /= probs.sum()
        floor = max(floor, desc[np.cumsum(probs) - probs < top_p].min())
    return floor


def test_filter_floor_equals_a_sorted_reference():
    """The halving search finds the very threshold a sort finds, with ties, -inf entries and every filter."""
    rng = np.random.default_rng(5)
    rows, vocab = 64, 1000
    x = (rng.normal(size=(rows, vocab)) * rng.uniform(0.3, 6, size=(rows, 1))).astype(np.float32)
    x[:, :50] = -np.inf
    x[:, 50:150] = x[:, 150:250]  # ties
    x[::7] = np.round(x[::7])  # rows of heavy ties
    top_k = rng.choice([0, 1, 2, 7, 100, 999, vocab], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.95, 0.5, 0.1, 1e-6], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.01, 0.3], rows).astype(np.float32)
    s = _settings(rows, top_k=top_k, top_p=top_p, min_p=min_p)
    floor = np.asarray(jax.jit(_filter_floor)(x, _tensors(s)))
    expected = [_sorted_floor(*args) for args in zip(x, top_k, top_p, min_p)]
    np.testing.assert_array_equal(floor, np.asarray(expected, np.float32))
    assert ((x >= floor[:, None]).sum(axis=-1) >= 1).all()
