"""The engine loop: requests in, incremental outputs out, one step at a time.

`Engine.step()` plans the next step, dispatches it, and only then reads the
previous step's tokens, so the device computes while the host detokenizes,
checks stop strings and plans. Callers in any thread use `add_request` (which
returns a `RequestStream`, iterable and async-iterable), `abort` and
`reset_prefix_cache`; those become commands the loop drains at the start of each
step, so all engine state is touched by one thread only. `start()` runs the loop
in a background thread; `LLM.generate` calls `step()` itself.

Host code only; no JAX (the executor is handed in).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import logging
import queue
import threading
import time
import weakref

import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine.data_parallel import DataParallelScheduler
from jaxinfer.engine.executor import Executor
from jaxinfer.engine.metrics import ITL, TTFT, EngineStats, LatencyHistograms, RequestMetrics, request_metrics
from jaxinfer.engine.request import (MAX_BANNED, CompletionOutput, RequestOutput, RequestOutputKind, SamplingParams,
                                     Sequence, logprob_entry)
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.structured import GrammarCompiler
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running a request (the request is over)."""


class RequestStream:
    """The outputs of one request as they come: iterable (`for out in stream`) and async-iterable
    (`async for out in stream`) in any thread or event loop, whichever made it, as often as wanted (each
    output is read once; once the last is read, an iteration yields nothing). The last item has
    `finished=True`. A stream that has nothing to read starts the engine's background loop if nobody has
    (see `Engine.start`). A request whose stream is dropped unfinished (nothing refers to it any more), or
    whose consumer task is cancelled while it waits, is aborted, as vLLM's `generate` does."""

    def __init__(self, request_id: str, engine: "Engine"):
        self.request_id, self._engine = request_id, engine
        self._done = False
        self._items: collections.deque = collections.deque()
        self._arrived = threading.Condition()
        # Async readers wait on a future of their own loop: a stream made in one loop (or none) may be read
        # in another, and the loop that made it may be closed by then.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def put(self, item) -> None:
        """From the engine thread: a RequestOutput or an exception."""
        with self._arrived:
            self._items.append(item)
            self._arrived.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that loop is closed, its reader gone: no reason to fail the engine
                pass

    def _unpack(self, item) -> RequestOutput:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def _before_wait(self) -> None:
        if not self._items:  # about to wait: the loop must run, or the wait is for ever
            self._engine.start_for_streams()

    def __iter__(self):
        while not self._done:
            self._before_wait()
            with self._arrived:
                self._arrived.wait_for(lambda: self._items)
                item = self._items.popleft()
            yield self._unpack(item)

    async def __aiter__(self):
        while not self._done:
            self._before_wait()
            try:
                item = await self._get()
            except asyncio.CancelledError:
                self.abort()
                raise
            yield self._unpack(item)

    async def _get(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._arrived:  # checked and registered at once: an item put in between would be missed
                if self._items:
                    return self._items.popleft()
                future = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def abort(self) -> None:
        """Abort this stream's request; once it has finished, nothing (its id may name a new request)."""
        self._engine._abort_stream(self)


def _wake(future: asyncio.Future) -> None:
    if not future.done():  # its reader may have been cancelled meanwhile
        future.set_result(None)


@dataclasses.dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    stream: weakref.ref | None  # to the caller's RequestStream (None: outputs only from step())
    detokenizers: list
    texts: list[str]
    arrival: float
    consumed: list[int] = dataclasses.field(default_factory=list)  # output tokens already detokenized
    entries: list[list] = dataclasses.field(default_factory=list)  # per sequence: its logprobs as reported
    prompt_entries: list = dataclasses.field(default_factory=list)  # the prompt logprobs as reported
    gaps_observed: list[int] = dataclasses.field(default_factory=list)  # per sequence: its token gaps observed
    first_token_observed: list[bool] = dataclasses.field(default_factory=list)  # per sequence
    streamed: list[tuple] = dataclasses.field(default_factory=list)  # per sequence: (tokens, characters, finished)
    #                                                                  its stream has had, for DELTA outputs
    prompt_logprobs_streamed: bool = False

    def __post_init__(self):
        self.consumed = [0] * len(self.seqs)
        self.entries = [[] for _ in self.seqs]
        self.gaps_observed = [0] * len(self.seqs)
        self.first_token_observed = [False] * len(self.seqs)
        self.streamed = [(0, 0, False)] * len(self.seqs)


def _find_stop(text: str, stops: tuple[str, ...], old_len: int) -> tuple[int, str] | None:
    """The earliest stop string that ends in the text added after `old_len` characters."""
    hits = []
    for stop in stops:
        at = text.find(stop, max(0, old_len - len(stop) + 1))
        if at >= 0:
            hits.append((at, stop))
    return min(hits) if hits else None


def _cache_salt(prompt) -> str | None:
    """A prompt dict's "cache_salt" (vLLM's): its requests share cached prompt pages only with requests of the same
    salt, so that nobody can learn another tenant's prompts by timing a cache hit."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and not (isinstance(salt, str) and salt):
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r:.80}")
    return salt


def _seed32(seed: int, index: int) -> int:
    """A request seed as the device's uint32; the n > 1 siblings get seeds derived from it."""
    if index == 0:
        return (seed ^ (seed >> 32)) & 0xFFFFFFFF
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class Engine:
    def __init__(self, engine: EngineConfig, executor: Executor, vocab_size: int,
                 tokenizer: Tokenizer | None = None, eos_ids=(), model_config=None):
        self.cfg, self.executor, self.vocab_size, self.tokenizer = engine, executor, vocab_size, tokenizer
        self.model_config = model_config  # for callers that describe the model (the server); unused here
        self.eos_ids = frozenset(eos_ids)
        # As in vLLM, the tokenizer's EOS ends a sequence with stop_reason None and the model's other EOS ids
        # (its generation config's) with stop_reason their id; without a tokenizer, the first id given is it.
        self.eos_id = tokenizer.eos_id if tokenizer and tokenizer.eos_id is not None else next(iter(eos_ids), None)
        self.scheduler = Scheduler(engine) if engine.mesh_shape[0] == 1 else DataParallelScheduler(engine)
        self.grammars = GrammarCompiler(tokenizer, vocab_size, self.eos_ids or tokenizer and tokenizer.eos_ids or ())
        self.latencies = LatencyHistograms(engine.max_model_len)
        self._requests: dict[str, _Request] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._resets: list[concurrent.futures.Future] = []  # reset_prefix_cache calls the loop is to answer
        self._ids = itertools.count()
        self._known_ids: set[str] = set()
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(engine.seed)
        self._inflight = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._shut_down = False  # by shutdown(): streams no longer start the loop
        self.error: BaseException | None = None

    # --- callers (any thread) ------------------------------------------------------------

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0, stream: bool = True) -> RequestStream | str:
        """Validate and queue a request (see `_encode` for its forms). Returns its stream (which yields what
        `params.output_kind` says), or its id when `stream=False` (outputs then come only from `step()`, whole).
        Bad input raises ValueError (MemoryError if it could never fit in the KV pool) in the caller's thread."""
        self._raise_if_failed()
        params = params or SamplingParams()
        text, ids, max_new, bad_words, salt, grammar = self._validated(prompt, params, priority)
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                  if self.tokenizer and params.detokenize else None for _ in range(params.n)]
        eos = frozenset() if params.ignore_eos else self.eos_ids
        matchers = [grammar and self.grammars.matcher(grammar, self.eos_id, ids) for _ in range(params.n)]
        with self._lock:  # a request is queued before a failure drains the queue, or refused after it
            self._raise_if_failed()
            request_id = request_id or f"req-{next(self._ids)}"
            if request_id in self._known_ids:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._known_ids.add(request_id)
            seeds = self._seeds(params)
            handle = RequestStream(request_id, self) if stream else None
            seqs = [Sequence(request_id, i, list(ids), params, seeds[i], max_new, priority, eos, self.eos_id,
                             bad_words, salt, matchers[i]) for i in range(params.n)]
            stream_ref = weakref.ref(handle) if handle else None
            request = _Request(request_id, text, ids, params, seqs, stream_ref, detoks, [""] * params.n,
                               time.monotonic())
            self._commands.put(("add", request))
        self._wake.set()
        return handle if stream else request_id

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise EngineError(f"the engine has stopped after an error: {self.error}")

    def abort(self, request_id) -> None:
        """End requests wherever they are (queued, prefilling, decoding): one id or several (as vLLM);
        unknown ids are ignored."""
        for one in [request_id] if isinstance(request_id, str) else list(request_id):
            if not isinstance(one, str):
                raise TypeError(f"request ids are strings, got {one!r:.80}")
            self._commands.put(("abort", (one, None)))
        self._wake.set()

    def _abort_stream(self, stream: RequestStream) -> None:
        """Abort the request `stream` came from, not a later one given the same id once it has finished."""
        self._commands.put(("abort", (stream.request_id, stream)))
        self._wake.set()

    def validate(self, prompt, params: SamplingParams, priority: int = 0) -> tuple[str | None, list[int], int]:
        """-> (prompt text or None, prompt ids, tokens it may generate); raises on bad input. With
        `truncate_prompt_tokens` the ids are the prompt's last ones, and the text is theirs (special tokens
        kept, as in an uncut prompt's text)."""
        return self._validated(prompt, params, priority)[:3]

    def _validated(self, prompt, params: SamplingParams, priority: int) -> tuple:
        """`validate`'s, then the bad words' token sequences, the cache salt and the structured outputs' grammar
        (or None): every check made once."""
        salt = _cache_salt(prompt)
        text, ids = self.truncate(*self._encode(prompt), params)
        bad_words = self._bad_words(params)
        max_new = self._check(ids, params, priority)
        grammar = params.structured_outputs and self.grammars.compile(params.structured_outputs)
        return text, ids, max_new, bad_words, salt, grammar

    def truncate(self, text: str | None, ids: list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        """The prompt cut to its last `truncate_prompt_tokens` ids, and their text (special tokens kept, as in an
        uncut prompt's text); unchanged when nothing is cut. ValueError for a cut longer than the context."""
        kept = params.truncate(ids, self.cfg.max_model_len)
        if len(kept) == len(ids):
            return text, ids
        has_text = self.tokenizer is not None and text is not None
        return (self.tokenizer.decode(kept, skip_special_tokens=False) if has_text else text), kept

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt as vLLM takes one: text, token ids, {"prompt": text}, or {"prompt_token_ids": ids} with the
        text they came from as an optional "prompt" (kept for the output, not tokenized); a dict may also give a
        "cache_salt" (`_cache_salt`)."""
        if isinstance(prompt, dict):
            return self._encode_dict(prompt)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer files; pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        return None, self._token_ids(prompt)

    def _encode_dict(self, prompt: dict) -> tuple[str | None, list[int]]:
        unknown = [key for key in prompt if key not in ("prompt", "prompt_token_ids", "cache_salt")]
        if unknown:
            raise ValueError("a prompt dict takes only 'prompt' (text), 'prompt_token_ids' and 'cache_salt', got "
                             f"{unknown[0]!r:.80}")
        text = prompt.get("prompt")
        if "prompt_token_ids" not in prompt:
            if not isinstance(text, str):
                raise ValueError(f"a prompt dict needs 'prompt' text or 'prompt_token_ids', got {prompt!r:.80}")
            return self._encode(text)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"a prompt dict's 'prompt' must be text, got {text!r:.80}")
        return text, self._token_ids(prompt["prompt_token_ids"])

    @staticmethod
    def _token_ids(prompt) -> list[int]:
        try:
            ids = list(prompt)
        except TypeError:
            ids = None
        if ids is None or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"a prompt must be a string or a list of integer token ids, got {prompt!r:.80}")
        return [int(t) for t in ids]

    def _check(self, ids: list[int], params: SamplingParams, priority: int) -> int:
        """-> the number of tokens the request may generate."""
        limit = self.cfg.max_model_len
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        bad = params.outside_vocabulary(self.vocab_size)
        if bad:
            raise ValueError(bad)
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; the maximum context length is {limit} "
                             "tokens, and at least one must be left to generate")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none")
        if params.stop and not params.detokenize:
            raise ValueError("stop strings need detokenize=True (they are matched in the text)")
        banned = len(self.eos_ids | set(params.stop_token_ids))
        if params.min_tokens and banned > MAX_BANNED:
            raise ValueError(f"min_tokens supports at most {MAX_BANNED} EOS and stop token ids, got {banned}")
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        max_new = limit - len(ids) if params.max_tokens is None else min(params.max_tokens, limit - len(ids))
        self.scheduler.check_fits(len(ids), max_new)
        return max_new

    def _bad_words(self, params: SamplingParams) -> tuple[tuple[int, ...], ...]:
        if not params.bad_words:
            return ()
        if self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer; this checkpoint has none")
        found = params.bad_word_ids(lambda text: self.tokenizer.encode(text, add_special_tokens=False))
        bad = [t for ids in found for t in ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"bad_words tokenize to id {bad[0]}, outside the model's vocabulary [0, "
                             f"{self.vocab_size})")
        return found

    def _seeds(self, params: SamplingParams) -> list[int]:
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
        return [_seed32(seed % 2**64, i) for i in range(params.n)]

    # --- the loop ------------------------------------------------------------------------

    def has_work(self) -> bool:
        return not self._commands.empty() or self._inflight is not None or self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Plan and dispatch the next step, then read the previous one. Returns the outputs it changed.
        A step that raises fails every request (streams get an EngineError) and the engine, whose state it
        may have left half updated: later calls raise EngineError instead of waiting on it for ever."""
        self._raise_if_failed()
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine's loop runs in its background thread (engine.start(), or a stream read "
                               "before any step): read the request streams rather than calling step()")
        try:
            return self._step()
        except Exception as error:
            log.exception("engine step failed; failing all requests")
            self._fail_all(error)
            raise

    def _step(self) -> list[RequestOutput]:
        outputs = self._drain_commands()
        if self._inflight is not None and self.scheduler.awaits_tokens():
            outputs += self._process(*self._inflight)  # a grammar's next mask needs the tokens in flight
            self._inflight = None
        plan = self.scheduler.schedule()
        handle = None
        if plan is not None:
            self.scheduler.counters.steps += 1
            handle = self.executor.dispatch(plan)
        if self._inflight is not None:
            outputs += self._process(*self._inflight)
        self._inflight = (plan, handle) if plan is not None else None
        self._answer_resets()  # after the step, so that the last request's final step has been read
        return outputs

    def _drain_commands(self) -> list[RequestOutput]:
        outputs = []
        while not self._commands.empty():
            kind, arg = self._commands.get()
            if kind == "reset":
                self._resets.append(arg)
            elif kind == "add":
                self._requests[arg.request_id] = arg
                for seq in arg.seqs:
                    self.scheduler.add(seq)
            elif self._abortable(*arg):
                request = self._requests[arg[0]]
                for seq in request.seqs:
                    self.scheduler.finish(seq, "abort")
                outputs.append(self._emit(request))
        return outputs

    def _abortable(self, request_id: str, stream: RequestStream | None) -> bool:
        request = self._requests.get(request_id)
        return request is not None and (stream is None or stream is (request.stream and request.stream()))

    def _process(self, plan, handle) -> list[RequestOutput]:
        result = self.executor.collect(handle)
        touched = {}
        for seq in self.scheduler.update(plan, result):
            request = self._requests.get(seq.request_id)
            if request is None or not any(own is seq for own in request.seqs):
                continue  # ended while its step ran (its id may already name a new request, of fewer samples)
            self._detokenize(request, seq)
            self._observe_tokens(request, seq)
            touched[request.request_id] = request
        # Requests without a stream (offline batches) only need their final output.
        return [self._emit(request) for request in touched.values()
                if request.stream is not None or all(seq.finished for seq in request.seqs)]

    def _detokenize(self, request: _Request, seq: Sequence) -> None:
        """Extend the text with the new tokens; end the sequence at the first stop string."""
        detok = request.detokenizers[seq.index]
        if detok is None:
            return
        params, last = request.params, len(seq.output_ids) - 1
        for i in range(request.consumed[seq.index], len(seq.output_ids)):
            before = request.texts[seq.index]
            # As in vLLM, the EOS or stop token that ended the sequence adds no text (its id stays); a grammar's
            # last token, which ends a sequence that ignores EOS, does.
            stop_token = seq.finish_reason == "stop" and i == last and not params.include_stop_str_in_output and \
                (seq.output_ids[i] in seq.stop_ids or seq.output_ids[i] in params.stop_token_ids)
            text = before + ("" if stop_token else detok.add(seq.output_ids[i]))
            if seq.finished and i == last:
                text += detok.flush()
            request.texts[seq.index] = text
            if i < params.min_tokens:
                continue  # as in vLLM, stop strings count only after min_tokens tokens
            stop = _find_stop(text, request.params.stop, len(before))
            if stop is not None:
                at, string = stop
                keep = at + len(string) if request.params.include_stop_str_in_output else at
                request.texts[seq.index] = text[:keep]
                self.scheduler.counters.generation_tokens -= len(seq.output_ids) - (i + 1)  # counted, now cut
                del seq.output_ids[i + 1:], seq.logprobs[i + 1:]  # token i came in this step: its gap stays
                if seq.finished:  # a later token of the same dispatch hit EOS or the length: the string came first
                    seq.finish_reason, seq.stop_reason = "stop", string
                else:
                    self.scheduler.finish(seq, "stop", string)
                break
        request.consumed[seq.index] = len(seq.output_ids)

    def _observe_tokens(self, request: _Request, seq: Sequence) -> None:
        """Time to first token and inter-token gaps go into the histograms as they happen (as in vLLM), so a
        long request shows in them before it ends; each of n > 1 samples apart, as vLLM runs them."""
        if not request.first_token_observed[seq.index] and seq.first_token is not None:
            request.first_token_observed[seq.index] = True
            self.latencies.observe(TTFT, seq.first_token - seq.arrival)
        for gap in seq.token_gaps[request.gaps_observed[seq.index]:]:
            self.latencies.observe(ITL, gap)
        request.gaps_observed[seq.index] = len(seq.token_gaps)

    def _emit(self, request: _Request) -> RequestOutput:
        finished = all(seq.finished for seq in request.seqs)
        holdback = 0 if finished or request.params.include_stop_str_in_output else \
            max((len(s) for s in request.params.stop), default=1) - 1
        completions = []
        for seq, text, entries in zip(request.seqs, request.texts, request.entries):
            shown = text if seq.finished else text[:max(0, len(text) - holdback)]
            logprobs, total = None, None
            if request.params.logprobs is not None:
                logprobs = self._reported(entries, seq.output_ids, seq.logprobs, request.params.detokenize)
                total = sum(f[0] for f in seq.logprobs)
            completions.append(CompletionOutput(seq.index, shown, list(seq.output_ids), seq.finish_reason,
                                                seq.stop_reason, logprobs, total))
        first = request.seqs[0]
        prompt_logprobs = None if request.params.prompt_logprobs is None else \
            self._reported(request.prompt_entries, request.prompt_ids, first.prompt_logprobs, request.params.detokenize)
        out = RequestOutput(request.request_id, request.prompt, request.prompt_ids, completions, finished,
                            prompt_logprobs, first.num_cached_tokens)
        if finished:
            out.metrics = self._finish_request(request)
        if request.stream is not None:
            stream = request.stream()
            if stream is None:
                if not finished:  # nobody can read it any more
                    self.abort(request.request_id)
            elif (streamed := self._streamed(request, out)) is not None:
                stream.put(streamed)
        return out

    @staticmethod
    def _streamed(request: _Request, out: RequestOutput) -> RequestOutput | None:
        """What the request's stream gets of `out`, as its `output_kind` says: all of it; what it adds to the
        outputs streamed before (the samples that changed, the prompt logprobs once); or nothing until the end."""
        kind = request.params.output_kind
        if kind is RequestOutputKind.CUMULATIVE or (kind is RequestOutputKind.FINAL_ONLY and out.finished):
            return out
        if kind is RequestOutputKind.FINAL_ONLY:
            return None
        changed = []
        for c in out.outputs:
            tokens, characters, finished = request.streamed[c.index]
            if len(c.token_ids) > tokens or len(c.text) > characters or c.finished != finished:
                changed.append(dataclasses.replace(c, text=c.text[characters:], token_ids=c.token_ids[tokens:],
                                                   logprobs=None if c.logprobs is None else c.logprobs[tokens:]))
                request.streamed[c.index] = (len(c.token_ids), len(c.text), c.finished)
        if not changed and not out.finished:
            return None
        prompt_logprobs = None if request.prompt_logprobs_streamed else out.prompt_logprobs
        request.prompt_logprobs_streamed = True
        return dataclasses.replace(out, outputs=changed, prompt_logprobs=prompt_logprobs)

    def _reported(self, done: list, ids: list[int], found: list, decoded: bool) -> list:
        """Logprobs as reported ({token id: Logprob} per token, None for a prompt's first): `done`, the entries
        earlier outputs made, extended to the scheduler's `found` (logprob, rank, top ids, top logprobs); each
        token's text if `decoded`."""
        del done[len(found):]  # a stop string cut tokens off
        text = self.tokenizer.token_text if self.tokenizer and decoded else None
        done += [f and logprob_entry(t, f, text) for t, f in zip(ids[len(done):], found[len(done):])]
        return list(done)

    def _finish_request(self, request: _Request) -> RequestMetrics:
        del self._requests[request.request_id]
        with self._lock:
            self._known_ids.discard(request.request_id)
        for seq in request.seqs:  # as in vLLM, each of n > 1 samples is a request of its own in the histograms
            self.latencies.record(request_metrics([seq]), seq.finish_reason)
        return request_metrics(request.seqs)

    # --- background thread ---------------------------------------------------------------

    @property
    def running_in_background(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Run the loop in a daemon thread until `shutdown()`. From then on `step()` is the loop's alone."""
        with self._lock:
            self._shut_down = self._stopping = False  # a loop still stopping carries on, or starts the next
            self._launch()

    def start_for_streams(self) -> None:
        """`start()` for a stream about to wait for output, unless the engine was shut down or has failed:
        reading a stream without the loop running (and without calling `step()` first) used to wait for ever."""
        with self._lock:
            if not self._shut_down and self.error is None:
                self._launch()

    def _launch(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._lock:  # no reset is queued after this (see reset_prefix_cache)
            self._shut_down, thread = True, self._thread
            self._stopping = thread is not None  # the loop clears it as it ends
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():  # still inside a step: it stops after it (call shutdown again to wait)
                log.warning("the engine loop is still in a step after %ss; it stops when that step ends", timeout)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            with self._lock:  # only now may another loop start: two would share the engine's state
                self._thread, self._stopping = None, False
                if not self._shut_down and self.error is None:  # start() came after this loop had stopped
                    self._launch()

    def _serve(self) -> None:
        while not self._stopping:
            if not self.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                if hasattr(self.executor, "idle"):  # optional: a multi-process runner keeps its group alive
                    self.executor.idle()
                continue
            try:
                self.step()
            except Exception:
                return  # step() has failed every request and said why
        if self._inflight is not None:  # read the step already dispatched: a shutdown leaves none half done
            self._process(*self._inflight)
            self._inflight = None
        self._drain_commands()  # requests added meanwhile wait for a restart
        self._answer_resets()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:  # no reset is queued after this
            self.error = error
        self._inflight = None
        failed, self._requests = list(self._requests.values()), {}
        while not self._commands.empty():  # nothing is queued after this (see add_request)
            kind, arg = self._commands.get()
            if kind == "add":
                failed.append(arg)  # never reached the scheduler
            elif kind == "reset":
                self._resets.append(arg)
        self._answer_resets(failed=True)
        for request in failed:
            stream = request.stream and request.stream()
            if stream is not None:
                stream.put(EngineError(f"request {request.request_id} failed: {type(error).__name__}: {error}"))
        try:  # the failed step may have left the scheduler half updated: the streams are told first
            for seq in self.scheduler.running + self.scheduler.waiting:
                self.scheduler.finish(seq, "abort")
        except Exception:
            log.exception("could not return every page after the failed step")

    # --- observability -------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s, c = self.scheduler, self.scheduler.counters
        used, usable = s.kv_pages()
        finished, histograms = self.latencies.snapshot()
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting),  # sequences: vLLM runs the n of a request apart
            kv_usage=used / usable,
            prompt_tokens=c.prompt_tokens, generation_tokens=c.generation_tokens,
            prefill_tokens_computed=c.prefill_tokens_computed, preemptions=c.preemptions,
            prefix_cache_queries=c.prefix_queries, prefix_cache_hits=c.prefix_hits, steps=c.steps,
            finished_requests=finished, histograms=histograms)

    def reset_prefix_cache(self, timeout: float | None = 30.0) -> bool:
        """Forget every cached prefix (vLLM's `reset_prefix_cache`): False, and nothing done, while requests
        are in the engine or it shuts down. Any thread may call it; with the loop in a background thread the
        loop does it after its current step (waiting up to `timeout` seconds). Needed after anything
        dispatched on the runner besides this engine's own steps (the benchmark's bare steps), since those
        write KV into pages the cache may still name; also how a benchmark starts from a cold cache."""
        with self._lock:  # the loop answers every reset queued before it stops
            self._raise_if_failed()
            if self._stopping:
                return False
            background = self.running_in_background
            if background:
                done = concurrent.futures.Future()
                self._commands.put(("reset", done))
        if not background:
            return self._commands.empty() and self._reset_if_idle()
        self._wake.set()
        return done.result(timeout)

    def _answer_resets(self, failed: bool = False) -> None:
        for done in self._resets:
            done.set_result(not failed and self._reset_if_idle())
        self._resets.clear()

    def _reset_if_idle(self) -> bool:
        if self._requests or self._inflight is not None or self.scheduler.has_work():
            return False
        self.scheduler.reset_prefix_cache()
        return True

    def check_idle(self) -> None:
        """With nothing running: every page is free or cached-idle and every slot is free (tests)."""
        assert not self._requests and not self.has_work(), "requests are still in the engine"
        self.scheduler.check_idle()


__all__ = ["Engine", "EngineError", "RequestStream"]
