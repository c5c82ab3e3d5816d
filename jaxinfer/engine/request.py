"""What a caller asks for (`SamplingParams`) and the host state of one sequence while it runs.

Host code only; no JAX.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import itertools
import math
import time

from jaxinfer.engine.structured import StructuredOutputsParams

MAX_LOGPROBS = 20  # the most top alternatives a request may ask for (computed on device for every row)
MAX_BANNED = 16  # EOS + stop token ids masked on device while min_tokens is not reached
MAX_LOGIT_EDITS = 1024  # allowed token ids, and logit_bias entries, per request (vLLM's limits)
MAX_BAD_WORDS = 128  # bad_words' token sequences per request, after tokenization (vLLM's limit)
MAX_BAD_WORD_TOKENS = 32  # tokens of one such sequence (ours: each row keeps this many recent tokens on device)
INT32_MAX = 2**31 - 1  # counts and ids travel to the device as int32
FLOAT32_TINY = 1.1754944e-38  # smaller positive values would reach the device as 0
FLOAT32_MAX = 3.4028235e38  # larger values would reach the device as inf


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def token_id_key(key):
    """A logit_bias key as a token id: JSON has only string keys, read as vLLM reads them, with int() (" 5",
    "+5", "05"); a key that is no integer is returned as it is, for the caller to refuse."""
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            return key
    return key


def _as_tuple(value, message: str) -> tuple:
    """A list-like field as a tuple; a scalar (stop_token_ids=5) is a ValueError, not a TypeError."""
    try:
        return tuple(value or ())
    except TypeError:
        raise ValueError(f"{message}, got {value!r}") from None


class RequestOutputKind(enum.Enum):
    """What a request's stream yields (vLLM's names and values): the whole output so far at every step, only
    what each step added (text, token ids and logprobs; the prompt logprobs once; each of n samples when it
    changed), or the final output alone."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, named and bounded as in vLLM / the OpenAI API."""

    n: int = 1
    max_tokens: int | None = 16  # None: until the end of the context
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens exist
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: drawn from the engine's own seeded generator
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per generated token (0: only the chosen one)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, no text (vLLM's; stop strings need the text)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, before the penalties (OpenAI's)
    allowed_token_ids: tuple[int, ...] | None = None  # only these can be sampled (vLLM's allowed_token_ids)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens; -1: the context length (vLLM's)
    bad_words: tuple[str, ...] = ()  # words never generated (vLLM's; see `bad_word_ids`)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what a stream yields (outputs without one: final)
    structured_outputs: StructuredOutputsParams | None = None  # a schema, regex, grammar or choice to hold to (vLLM's)

    def __post_init__(self):
        for name in ("stop", "bad_words"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str)
                               else _as_tuple(value, f"{name} must be a string or a list"))
        object.__setattr__(self, "stop_token_ids",
                           _as_tuple(self.stop_token_ids, "stop_token_ids must be a list of token ids"))
        object.__setattr__(self, "top_k", 0 if self.top_k == -1 else self.top_k)
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids",
                               _as_tuple(self.allowed_token_ids, "allowed_token_ids must be a list of token ids"))
        _check(self.logit_bias is None or isinstance(self.logit_bias, dict),
               f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r:.80}")
        # JSON (a server body, an eval line) has only string keys: "50256" is token 50256, as in OpenAI's API.
        object.__setattr__(self, "logit_bias", {token_id_key(k): v for k, v in (self.logit_bias or {}).items()})
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(self, "structured_outputs", StructuredOutputsParams(**self.structured_outputs))
        self._validate()

    def _validate(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= INT32_MAX),
               f"max_tokens must be an integer in [1, {INT32_MAX}] or None, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= INT32_MAX,
               f"min_tokens must be an integer in [0, {INT32_MAX}], got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        _check(_is_number(self.temperature) and 0 <= self.temperature <= FLOAT32_MAX,
               f"temperature must be a finite number >= 0 (a float32), got {self.temperature!r}")
        _check(_is_number(self.top_p) and FLOAT32_TINY <= self.top_p <= 1,
               f"top_p must be in (0, 1] (at least {FLOAT32_TINY:.3g}), got {self.top_p!r}")
        _check(_is_int(self.top_k) and 0 <= self.top_k <= INT32_MAX,
               f"top_k must be -1, 0 (no limit) or positive (at most {INT32_MAX}), got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _check(_is_number(self.repetition_penalty) and FLOAT32_TINY <= self.repetition_penalty <= FLOAT32_MAX,
               f"repetition_penalty must be > 0 (a float32: at least {FLOAT32_TINY:.3g}), "
               f"got {self.repetition_penalty!r}")
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64),
               f"seed must be a 64-bit integer, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or a list of them")
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words),
               f"bad_words must be a list of words (strings that are not blank), got {list(self.bad_words)!r:.80}")
        _check(len(self.bad_words) <= MAX_BAD_WORDS,
               f"bad_words may hold at most {MAX_BAD_WORDS} words, got {len(self.bad_words)}")
        _check(all(_is_int(t) and 0 <= t <= INT32_MAX for t in self.stop_token_ids),
               f"stop_token_ids must be token ids (integers in [0, {INT32_MAX}]), "
               f"got {list(self.stop_token_ids)!r:.80}")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r:.80}")
        _check(isinstance(self.output_kind, RequestOutputKind),
               f"output_kind must be a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY), "
               f"got {self.output_kind!r:.80}")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "detokenize"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                   f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        k = self.truncate_prompt_tokens
        _check(k is None or (_is_int(k) and (k >= 1 or k == -1)),
               f"truncate_prompt_tokens must be an integer >= 1 or -1 (the context length), got {k!r}")
        allowed = self.allowed_token_ids
        _check(allowed is None or 0 < len(allowed) <= MAX_LOGIT_EDITS,
               f"allowed_token_ids must hold 1 to {MAX_LOGIT_EDITS} token ids, got {len(allowed or ())}")
        _check(len(self.logit_bias) <= MAX_LOGIT_EDITS,
               f"logit_bias may hold at most {MAX_LOGIT_EDITS} tokens, got {len(self.logit_bias)}")
        for name, ids in (("allowed_token_ids", allowed or ()), ("logit_bias", self.logit_bias)):
            _check(all(_is_int(t) and 0 <= t <= INT32_MAX for t in ids),
                   f"{name} must have token ids (integers in [0, {INT32_MAX}]), got {list(ids)!r:.80}")
        _check(all(_is_number(b) and abs(b) <= FLOAT32_MAX for b in self.logit_bias.values()),
               f"logit_bias values must be finite numbers, got {list(self.logit_bias.values())!r:.80}")

    def clone(self) -> "SamplingParams":
        """A deep copy (vLLM's `clone`)."""
        return copy.deepcopy(self)

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def uses_edits(self) -> bool:
        return bool(self.logit_bias) or self.allowed_token_ids is not None or bool(self.bad_words)

    def truncate(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's last `truncate_prompt_tokens` ids (all of them if unset), as vLLM cuts from the left."""
        k = max_model_len if self.truncate_prompt_tokens == -1 else self.truncate_prompt_tokens
        if k is not None and k > max_model_len:
            raise ValueError(f"truncate_prompt_tokens ({k}) is greater than the maximum context length "
                             f"({max_model_len}): choose a smaller truncation size")
        return ids if k is None else ids[-k:]

    def bad_word_ids(self, encode) -> tuple[tuple[int, ...], ...]:
        """`bad_words` as the token sequences they ban, tokenized as vLLM does: each word (leading blanks
        stripped) as it would start the text, and with a space before it when that gives other tokens of
        the same count (a word in the middle of the text). `encode(text)`: ids, no special tokens. A
        sequence's last token is masked whenever the output's last tokens are the rest of it."""
        found: list[tuple[int, ...]] = []
        for word in self.bad_words:
            alone = tuple(encode(word.lstrip()))
            spaced = tuple(encode(" " + word.lstrip()))
            _check(bool(alone), f"bad_words entries must tokenize to at least one token, got {word!r:.80}")
            found.append(alone)
            if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
                found.append(spaced)
        _check(len(found) <= MAX_BAD_WORDS,
               f"bad_words make {len(found)} token sequences after tokenization; the most is {MAX_BAD_WORDS}")
        longest = max(found, key=len, default=())
        _check(len(longest) <= MAX_BAD_WORD_TOKENS,
               f"bad_words may be at most {MAX_BAD_WORD_TOKENS} tokens long each, got one of {len(longest)} tokens")
        return tuple(found)

    def outside_vocabulary(self, vocab_size: int) -> str | None:
        """What names a token id >= `vocab_size`, or None."""
        for name, ids in (("stop token id", self.stop_token_ids), ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("logit_bias", self.logit_bias)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                return f"{name} {bad[0]} is outside the vocabulary [0, {vocab_size})"
        return None


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_order = itertools.count()


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated continuation (a request with n > 1 has n of them), as the scheduler sees it.

    KV positions [0, num_computed) are written to `pages` or will be by steps already dispatched.
    `pending` tokens have been sampled on the device but not yet read by the host.
    """

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # uint32, used on device
    max_new: int  # max_tokens capped by the context left after the prompt
    priority: int = 0
    stop_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) and stop_token_ids
    eos_id: int | None = None  # the EOS that ends it with stop_reason None; other stop ids report themselves
    bad_words: tuple[tuple[int, ...], ...] = ()  # params.bad_words tokenized (`SamplingParams.bad_word_ids`)
    cache_salt: str | None = None  # cached prompt pages are shared only among requests of the same salt (vLLM's)
    grammar: object = None  # a `structured.Grammar` when the output is held to structured outputs
    order: int = dataclasses.field(default_factory=lambda: next(_order))
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple] = dataclasses.field(default_factory=list)  # per output token: (logprob, rank, top)
    prompt_logprobs: list = dataclasses.field(default_factory=list)  # [None] + one entry per later prompt token
    status: Status = Status.WAITING
    slot: int | None = None
    shard: int = 0  # the data shard whose slots and pages it uses (data parallelism)
    pages: list[list[int]] = dataclasses.field(default_factory=list)  # per KV cache group; a sliding group's pages
    #                                                                    behind its window are the null page
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # chained hashes of the full known pages
    num_computed: int = 0
    pending: int = 0
    dropping: bool = False  # the tokens in flight are dropped as they are read (`Scheduler._rewind`)
    decoding: bool = False  # prefill done: the device holds the last token and feeds it to the next step
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the first admission
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished_at: float | None = None
    token_gaps: list[float] = dataclasses.field(default_factory=list)  # between steps that gave it tokens

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_total(self) -> int:
        """Tokens including those sampled on device but not yet read."""
        return self.num_known + self.pending

    @property
    def remaining(self) -> int:
        """Tokens still to be sampled (counting those in flight)."""
        return self.max_new - len(self.output_ids) - self.pending

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def sort_key(self) -> tuple[int, int]:
        """Lower runs first; the highest is the first to be preempted."""
        return (self.priority, self.order)


@dataclasses.dataclass
class Logprob:
    """vLLM's: a token's log-probability (of the raw logits), its rank (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None  # None without a tokenizer


def logprob_entry(token_id: int, found: tuple, token_text=None) -> dict[int, Logprob]:
    """One position's logprobs as vLLM reports them, {token id: Logprob}: the top alternatives in rank order,
    then the token if it is not one of them; from the scheduler's (logprob, rank, top ids, top logprobs)."""
    logprob, rank, top_ids, top_logprobs = found
    text = token_text or (lambda _: None)
    entry = {t: Logprob(lp, r, text(t)) for r, (t, lp) in enumerate(zip(top_ids, top_logprobs), 1)}
    entry.setdefault(token_id, Logprob(logprob, rank, text(token_id)))
    return entry


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" (EOS, stop token or string), "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or string, None for EOS or other reasons
    logprobs: list[dict[int, Logprob]] | None = None  # per token (see logprob_entry), if asked for
    cumulative_logprob: float | None = None  # the sum of the tokens' logprobs, if logprobs were asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """A request's state so far (cumulative): the streaming API yields one per step that changed it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # [None, then one entry per prompt token]
    num_cached_tokens: int = 0
    metrics: object = None  # a RequestMetrics once finished
