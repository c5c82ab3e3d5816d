"""Token sampling on device: logit processing, the seeded draw and logprobs, one row per sequence.

Owns the device half of sampling as pure functions: allowed token ids, bad words and logit
biases (from each slot's `LogitEdits`), penalties from per-row token statistics
(`PenaltyState`), banned ids, temperature, min-p/top-k/top-p filtering,
the Gumbel-max draw and the logprobs reported back. Host code builds
`SamplingTensors` and keeps the `PenaltyState` and `LogitEdits` rows in step with its slots; nothing
here holds Python state. Semantics follow vLLM, including logprobs of the raw logits.

Rows never influence each other. A row's randomness is its own seed folded with the
position of the token being sampled. The optional [B, V] passes (penalties, the draw,
the filter thresholds, logprobs) run for the whole batch or not at all, chosen either on
device by a batch-wide `lax.cond` or at trace time by a static `Passes` (on GPU a
`cond` makes the host wait for the device, see `EngineConfig.control_flow`). Either
way a pass only selects per row, so every row not using a feature gets bit-identical
results whether the pass ran or not.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax import lax

MAX_LOGPROBS = 20  # top alternatives always computed per row
_MIN_TEMPERATURE = 1e-5  # below this a row is greedy, as in vLLM; also keeps logits / T finite
_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling settings; B = rows of the logits."""

    temperature: jax.Array  # [B] f32; 0 = greedy
    top_k: jax.Array  # [B] i32; 0 = no limit
    top_p: jax.Array  # [B] f32 in (0, 1]; 1 = off
    min_p: jax.Array  # [B] f32 in [0, 1]; 0 = off
    presence_penalty: jax.Array  # [B] f32; 0 = off
    frequency_penalty: jax.Array  # [B] f32; 0 = off
    repetition_penalty: jax.Array  # [B] f32 > 0; 1 = off
    seed: jax.Array  # [B] uint32
    wants_logprobs: jax.Array  # [B] i32; 1 = report this row's logprobs (skipped when no row wants them)
    uses_edits: jax.Array  # [B] i32; 1 = apply this row's `edits` (other rows' are stale or empty)
    banned: jax.Array  # [B, E] i32 ids forced to -inf this step (min_tokens: EOS/stop ids); -1 = unused
    edits: "LogitEdits"  # [B, N] per row, kept on device with the slot


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LogitEdits:
    """A row's allowed token ids, bad words and logit biases (vLLM's `allowed_token_ids` and `bad_words`,
    OpenAI's `logit_bias`), sparse; and its last generated tokens, which the bad words are matched against."""

    allowed_ids: jax.Array  # [B, N] i32; only these ids can be sampled; all -1: every id
    bias_ids: jax.Array  # [B, N] i32; -1 = unused
    bias: jax.Array  # [B, N] f32, added to the logit of `bias_ids`
    bad_words: jax.Array  # [B, W, T] i32 token sequences, right-aligned, -1 padded: each last one is banned
    #                       after the others (its prefix); an all -1 sequence is unused
    recent: jax.Array  # [B, T - 1] i32: the row's last generated tokens, the newest last; -1 before the first


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PenaltyState:
    """Device-side token statistics per row, for the penalties."""

    output_counts: jax.Array  # [B, V] i32: occurrences of each token in the row's generated output
    prompt_mask: jax.Array  # [B, V] bool: token occurs in the row's prompt


@dataclasses.dataclass(frozen=True)
class Passes:
    """The optional passes a statically compiled sampler runs (a hashable jit key)."""

    penalties: bool = False  # any row with penalties, allowed token ids, bad words or a logit bias
    draw: bool = False  # any random row
    filter: bool = False  # any random row with min_p, top_k or top_p (a 64-pass threshold search)
    logprobs: bool = False

    @classmethod
    def needed(cls, rows: dict, vocab: int) -> "Passes":
        """What a batch's host-side sampling rows [B] need: the tests `sample` makes on device."""
        return cls(**{name: bool(rows.any()) for name, rows in _rows_needing(types.SimpleNamespace(**rows),
                                                                             vocab).items()})

    @classmethod
    def every(cls) -> list["Passes"]:
        """Every combination a batch can need (a filter implies a draw), fewest passes first."""
        flags = [(penalties, draw, filter, logprobs) for penalties in (False, True) for draw in (False, True)
                 for filter in (False, True) for logprobs in (False, True) if draw or not filter]
        return sorted((cls(*f) for f in flags), key=lambda p: sum(dataclasses.astuple(p)))

    @property
    def code(self) -> int:
        """As one int, for announcing a step to other processes."""
        return sum(int(flag) << bit for bit, flag in enumerate(dataclasses.astuple(self)))

    @classmethod
    def from_code(cls, code: int) -> "Passes":
        return cls(*(bool(code >> bit & 1) for bit in range(len(dataclasses.fields(cls)))))


def _rows_needing(st, vocab: int) -> dict:
    """Per pass, which rows [B] need it; `st` holds the rows as numpy arrays (host) or jax arrays (device)."""
    random_rows = st.temperature >= _MIN_TEMPERATURE
    penalized = (st.repetition_penalty != 1) | (st.frequency_penalty != 0) | (st.presence_penalty != 0)
    return {"penalties": penalized | (st.uses_edits != 0),
            "draw": random_rows,
            "filter": random_rows & ((st.min_p > 0) | ((st.top_k > 0) & (st.top_k < vocab)) | (st.top_p < 1)),
            "logprobs": st.wants_logprobs != 0}


def _branch(static: bool | None, needed: jax.Array, run, skip, *args):
    """`run(*args)` or `skip(*args)`: chosen at trace time by `static`, or on device by `needed` if None."""
    if static is None:
        return lax.cond(needed, run, skip, *args)
    return (run if static else skip)(*args)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    tokens: jax.Array  # [B] i32
    logprob: jax.Array  # [B] f32 raw logprob of the chosen token
    rank: jax.Array  # [B] i32, 1 = the most likely token
    top_ids: jax.Array  # [B, MAX_LOGPROBS] i32, most likely first
    top_logprobs: jax.Array  # [B, MAX_LOGPROBS] f32


def sample(logits: jax.Array, st: SamplingTensors, positions: jax.Array, penalties: PenaltyState,
           passes: Passes | None = None) -> Sampled:
    """One token per row of `logits` [B, V]; `positions` [B] i32 = position of the token being sampled.

    Allowed ids, logit biases, penalties and bans (in vLLM's order) apply to greedy and
    random rows alike; temperature and the filters only to random rows. Logprobs are of
    the raw logits; when no row wants them the [B, V] passes behind them (log-softmax,
    rank, top-k) are skipped and every row reports zeros. `passes`: which optional passes
    to compile in (the rows must need no other), or None to decide on device.
    """
    rows = _rows_needing(st, logits.shape[-1])

    def branch(name: str, run, skip, *args):  # the pass `name`: compiled in or out, or chosen on device
        return _branch(None if passes is None else getattr(passes, name), jnp.any(rows[name]), run, skip, *args)

    logits = logits.astype(jnp.float32)
    processed = _ban(branch("penalties", _edit_and_penalize, lambda x, *_: x, logits, st, penalties), st.banned)
    greedy = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    floor = functools.partial(branch, "filter", _filter_floor, _no_floor)
    drawn = branch("draw", functools.partial(_draw, floor=floor), lambda *_: greedy, processed, st, positions,
                   rows["draw"])
    tokens = jnp.where(rows["draw"], drawn, greedy)
    return Sampled(tokens, *branch("logprobs", token_logprobs, _no_logprobs, logits, tokens))


def token_logprobs(logits: jax.Array, tokens: jax.Array):
    """Logprobs of `tokens` [B] under the raw `logits` [B, V] (B may be a prompt chunk's T).

    Returns (logprob [B], rank [B], top_ids [B, MAX_LOGPROBS], top_logprobs [B, MAX_LOGPROBS]);
    rank = 1 + the number of tokens with a strictly higher logprob. With fewer than
    MAX_LOGPROBS tokens in the vocab the missing alternatives are id -1 at -inf.
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(logprobs > chosen[:, None], axis=-1, dtype=jnp.int32)
    top_logprobs, top_ids = lax.top_k(logprobs, min(MAX_LOGPROBS, logprobs.shape[-1]))
    missing = ((0, 0), (0, MAX_LOGPROBS - top_ids.shape[-1]))
    top_ids = jnp.pad(top_ids.astype(jnp.int32), missing, constant_values=-1)
    top_logprobs = jnp.pad(top_logprobs, missing, constant_values=-jnp.inf)
    return chosen, rank, top_ids, top_logprobs


def _no_logprobs(logits: jax.Array, tokens: jax.Array):
    B = tokens.shape[0]
    return (jnp.zeros(B, jnp.float32), jnp.zeros(B, jnp.int32), jnp.zeros((B, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((B, MAX_LOGPROBS), jnp.float32))


def empty_penalty_state(rows: int, vocab: int) -> PenaltyState:
    return PenaltyState(jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), jnp.bool_))


def record_tokens(penalties: PenaltyState, tokens: jax.Array, active: jax.Array) -> PenaltyState:
    """Count each active row's new token [B] in its output statistics."""
    rows = jnp.arange(tokens.shape[0])
    counts = penalties.output_counts.at[rows, tokens].add(active.astype(jnp.int32))
    return dataclasses.replace(penalties, output_counts=counts)


def load_penalty_row(penalties: PenaltyState, row: jax.Array, prompt_mask_row: jax.Array,
                     counts_row: jax.Array) -> PenaltyState:
    """Overwrite one row's statistics [V] (a slot taken by a new or resumed sequence)."""
    return PenaltyState(penalties.output_counts.at[row].set(counts_row.astype(jnp.int32)),
                        penalties.prompt_mask.at[row].set(prompt_mask_row.astype(jnp.bool_)))


def empty_edits(rows: int, n: int, words: int, word_tokens: int) -> LogitEdits:
    unused = functools.partial(jnp.full, fill_value=-1, dtype=jnp.int32)
    return LogitEdits(unused((rows, n)), unused((rows, n)), jnp.zeros((rows, n), jnp.float32),
                      unused((rows, words, word_tokens)), unused((rows, word_tokens - 1)))


def load_edits_row(edits: LogitEdits, row: jax.Array, new: LogitEdits) -> LogitEdits:
    """Overwrite one row with `new`'s (rows of one: a slot taken by a sequence that uses them)."""
    return jax.tree.map(lambda whole, one: whole.at[row].set(one[0]), edits, new)


def record_recent(edits: LogitEdits, tokens: jax.Array, sampled: jax.Array) -> LogitEdits:
    """Append each sampled row's new token [B] to its recent tokens."""
    shifted = jnp.concatenate([edits.recent[:, 1:], tokens[:, None]], axis=1)
    return dataclasses.replace(edits, recent=jnp.where(sampled[:, None], shifted, edits.recent))


def _edit_and_penalize(logits: jax.Array, st: SamplingTensors, penalties: PenaltyState) -> jax.Array:
    edited = _apply_edits(logits, st)
    return _saturate(_apply_penalties(edited, st, penalties), edited)


def _saturate(x: jax.Array, before: jax.Array) -> jax.Array:
    """`x`, computed from `before`, with what overflowed float32 (a huge logit bias times a repetition penalty
    or over a small temperature) held at the largest finite value: only ids already at -inf (not allowed,
    banned) stay there, so the row still has a token to pick and its filter thresholds are not NaN."""
    return jnp.where(before == -jnp.inf, before, jnp.clip(x, -_FLOAT32_MAX, _FLOAT32_MAX))


def _apply_edits(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """vLLM's order: every id but the allowed ones to -inf, then the bad words', then the biases added. Rows
    not using edits, and unused entries (-1, sent past the vocab and dropped), leave their logits
    bit-identical."""
    rows, vocab = logits.shape
    row = jnp.arange(rows)[:, None]
    on = st.uses_edits[:, None] != 0
    allowed = jnp.where(on & (st.edits.allowed_ids >= 0), st.edits.allowed_ids, vocab)
    kept = jnp.zeros(logits.shape, jnp.bool_).at[row, allowed].set(True, mode="drop")
    restricted = on & (st.edits.allowed_ids[:, :1] >= 0)
    logits = jnp.where(restricted & ~kept, -jnp.inf, logits)
    last = st.edits.bad_words[:, :, -1]
    banned = jnp.where(on & (last >= 0) & _bad_word_ends(st.edits), last, vocab)
    logits = logits.at[row, banned].set(-jnp.inf, mode="drop")
    biased = jnp.where(on & (st.edits.bias_ids >= 0), st.edits.bias_ids, vocab)
    return logits.at[row, biased].add(st.edits.bias, mode="drop")


def _bad_word_ends(edits: LogitEdits) -> jax.Array:
    """[B, W]: the row's last generated tokens are the bad word's prefix (so its last token is banned), as in
    vLLM: matched against generated tokens only; a one-token word always. Padding (-1) matches anything, a
    token never generated (-1 in `recent`) no word token."""
    prefix = edits.bad_words[:, :, :-1]
    return jnp.all((prefix < 0) | (prefix == edits.recent[:, None, :]), axis=-1)


def _apply_penalties(logits: jax.Array, st: SamplingTensors, penalties: PenaltyState) -> jax.Array:
    # vLLM's order: repetition over prompt and output tokens, then frequency, then presence.
    # Selecting, rather than applying neutral values, keeps untouched entries bit-identical
    # to the branch that skips this function, whatever the arithmetic does.
    counts = penalties.output_counts
    generated = counts > 0
    r = st.repetition_penalty[:, None]
    repeated = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where((penalties.prompt_mask | generated) & (r != 1), repeated, logits)
    f = st.frequency_penalty[:, None]
    p = st.presence_penalty[:, None]
    return jnp.where(generated & ((f != 0) | (p != 0)), logits - f * counts - p, logits)


def _ban(logits: jax.Array, banned: jax.Array) -> jax.Array:
    """Each row's banned ids [B, E] to -inf; -1 entries point past the vocab and are dropped."""
    rows, vocab = logits.shape
    ids = jnp.where(banned < 0, vocab, banned)  # a negative id would wrap around to the vocab's end
    return logits.at[jnp.arange(rows)[:, None], ids].set(-jnp.inf, mode="drop")


def _draw(processed: jax.Array, st: SamplingTensors, positions: jax.Array, random_rows: jax.Array, *,
          floor) -> jax.Array:
    """Gumbel-max draw [B] from the temperature-scaled logits [B, V], each row kept to what its filters leave
    (`floor(scaled, st)`: the lowest kept value per row)."""
    vocab = processed.shape[-1]
    scaled = _saturate(processed / jnp.where(random_rows, st.temperature, 1.0)[:, None], processed)
    kept = jnp.where(scaled >= floor(scaled, st)[:, None], scaled, -jnp.inf)
    noise = jax.vmap(_gumbel, in_axes=(0, 0, None))(st.seed, positions, vocab)
    return jnp.argmax(kept + noise, axis=-1).astype(jnp.int32)


def _gumbel(seed: jax.Array, position: jax.Array, vocab: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), position)
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def _no_floor(scaled: jax.Array, st: SamplingTensors) -> jax.Array:
    return jnp.full(scaled.shape[:1], -jnp.inf, scaled.dtype)


def _filter_floor(scaled: jax.Array, st: SamplingTensors) -> jax.Array:
    """The lowest scaled logit [B] each row keeps after min_p, top_k and top_p; -inf keeps all.

    Each filter keeps a most-likely prefix of the row, so each result is a threshold: one of the row's own
    values, found by halving over the float order (`_smallest_key`) with [B, V] compare-and-sum passes
    rather than a [B, V] sort (on the 2-core CPU, 52 ms against 496 ms for 32 x 49,152; the same floors).
    Ties at a threshold are kept.
    """
    vocab = scaled.shape[-1]
    keys = _order_key(scaled)
    lowest, highest = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)
    floor = _from_order_key(highest) + jnp.log(st.min_p)  # prob >= min_p * max prob, in log space; log(0) = -inf
    limited = (st.top_k > 0) & (st.top_k < vocab)
    k = jnp.where(limited, st.top_k, 1)
    past_kth = _smallest_key(lambda f: jnp.sum(keys >= f[:, None], axis=-1) < k, lowest, highest + 1)
    floor = jnp.maximum(floor, jnp.where(limited, _from_order_key(past_kth - 1), -jnp.inf))
    # top_p sees the probabilities renormalized over what min_p and top_k left, as in vLLM: the nucleus
    # ends at the lowest value whose more likely tokens hold less than top_p of the mass.
    probs = jax.nn.softmax(jnp.where(scaled >= floor[:, None], scaled, -jnp.inf), axis=-1)
    mass_above = lambda f: jnp.sum(jnp.where(keys > f[:, None], probs, 0.0), axis=-1)  # noqa: E731
    nucleus = _from_order_key(_smallest_key(lambda f: mass_above(f) < st.top_p, lowest, highest))
    # top_p = 1 is off outright: rounding could otherwise drop the tail's last tokens.
    return jnp.maximum(floor, jnp.where(st.top_p < 1, nucleus, -jnp.inf))


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same order (-inf lowest), so a value can be found by halving integers."""
    bits = lax.bitcast_convert_type(x, jnp.int32)
    return lax.bitcast_convert_type(jnp.where(bits < 0, ~bits, bits | jnp.int32(-2**31)), jnp.uint32)


def _from_order_key(key: jax.Array) -> jax.Array:
    bits = lax.bitcast_convert_type(key, jnp.int32)
    return lax.bitcast_convert_type(jnp.where(bits < 0, bits & jnp.int32(2**31 - 1), ~bits), jnp.float32)


def _smallest_key(holds, low: jax.Array, high: jax.Array) -> jax.Array:
    """Per row, the smallest key in [low, high] [B] where `holds` (keys [B] -> bool [B], false then true as
    the key grows, true at `high`) holds: 32 halvings cover any uint32 range, a trip count XLA knows."""
    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low) // 2
        yes = holds(mid)
        return jnp.where(yes, low, mid + 1), jnp.where(yes, mid, high)
    return lax.fori_loop(0, 32, halve, (low, high))[1]
