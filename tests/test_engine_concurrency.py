"""The streaming API under concurrency: many threads and event loops adding, reading, breaking off, dropping,
cancelling and aborting requests against one engine whose loop runs in its background thread, with starts
and shutdowns racing them. Every wait is bounded, so a hang fails the test instead of blocking the run; every
token is compared with `fake_continuation`, so a lost, duplicated or misrouted output fails it too."""

import asyncio
import collections
import random
import threading
import time

import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import Engine, EngineError, _seed32
from jaxinfer.engine.executor import FakeExecutor, fake_continuation
from jaxinfer.engine.request import SamplingParams
from test_scheduler import HeldExecutor

VOCAB, EOS = 50, 7
HANG = 30  # seconds: only a hang takes this long


def make_engine(executor=FakeExecutor, **overrides) -> Engine:
    values = dict(max_slots=4, page_size=4, num_pages=40, max_model_len=64, prefill_chunk=8, decode_steps=2,
                  dtype="float32", attention_backend="reference")
    cfg = EngineConfig(**{**values, **overrides})
    return Engine(cfg, executor(cfg.num_pages, cfg.page_size, cfg.max_slots, vocab=VOCAB), vocab_size=VOCAB,
                  eos_ids=(EOS,))


def expected(engine, prompt, params):
    room = engine.cfg.max_model_len - len(prompt)
    max_new = room if params.max_tokens is None else min(params.max_tokens, room)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
    return fake_continuation(prompt, max_new, _seed32(params.seed, 0), VOCAB, stops, params.min_tokens)


class SlowExecutor(FakeExecutor):
    """1 ms per step, so that callers act while requests run."""

    def dispatch(self, plan):
        time.sleep(0.001)
        return super().dispatch(plan)


def within(seconds, work):
    """work() in a daemon thread: its result, its exception, or a failure if it is still waiting."""
    result, error = [], []

    def body():
        try:
            result.append(work())
        except BaseException as e:  # re-raised in the test's thread
            error.append(e)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds}s"
    if error:
        raise error[0]
    return result[0]


def settle(engine, seconds=HANG):
    """Wait for the loop to have nothing left (a dropped stream's abort is noticed at its next output)."""
    deadline = time.monotonic() + seconds
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not engine.has_work(), "the engine never went idle"


def check_outputs(engine, prompt, params, outs, aborted_ok=False):
    """Cumulative, growing outputs with exactly one final, last; the exact tokens (a prefix if aborted)."""
    assert outs and outs[-1].finished and not any(out.finished for out in outs[:-1])
    tokens = [out.outputs[0].token_ids for out in outs]
    assert all(a == b[:len(a)] for a, b in zip(tokens, tokens[1:])), "outputs are not cumulative"
    want, final = expected(engine, prompt, params), outs[-1].outputs[0]
    if final.finish_reason == "abort":
        assert aborted_ok, "a request nobody aborted ended as aborted"
        assert final.token_ids == want[:len(final.token_ids)]
    else:
        assert final.token_ids == want
    return final.finish_reason


def start_readers(streams, outs) -> list[threading.Thread]:
    """A thread per stream, reading it into its list."""
    readers = [threading.Thread(target=out.extend, args=(stream,), daemon=True) for stream, out in zip(streams, outs)]
    for reader in readers:
        reader.start()
    return readers


def finish_readers(engine, readers, cases, outs):
    """Every reader ends with its request's exact outputs; then the engine stops, and nothing is held."""
    for reader in readers:
        reader.join(HANG)
    assert not any(reader.is_alive() for reader in readers)
    for (prompt, params), out in zip(cases, outs):
        check_outputs(engine, prompt, params, out)
    engine.shutdown()
    check_clean(engine)


def check_clean(engine):
    engine.check_idle()
    assert not engine._requests and not engine._known_ids


async def read_async(stream):
    return [out async for out in stream]


# --- streams read where they were not created ------------------------------------------------------------

def test_a_stream_is_read_from_any_thread_or_event_loop():
    """A stream made in one event loop and read in another (the first closed or still running), or made in
    a plain thread (a tokenizing worker) and read with `async for`, or made in a loop and read with `for`,
    gets every output: it used to wait for ever, its outputs sent to the closed loop, or to refuse."""
    engine = make_engine()
    engine.start()
    prompt, params = [1, 2, 3], SamplingParams(max_tokens=9, seed=4, ignore_eos=True)

    async def make():
        return engine.add_request(prompt, params)

    def check(read):
        check_outputs(engine, prompt, params, within(HANG, read))

    try:
        check(lambda: asyncio.run(read_async(asyncio.run(make()))))  # the loop that made it is closed
        check(lambda: asyncio.run(read_async(engine.add_request(prompt, params))))
        check(lambda: list(asyncio.run(make())))

        other = asyncio.new_event_loop()  # a loop running in another thread makes it; this one reads it
        runner = threading.Thread(target=other.run_forever, daemon=True)
        runner.start()
        try:
            stream = asyncio.run_coroutine_threadsafe(make(), other).result(HANG)
            check(lambda: asyncio.run(read_async(stream)))
        finally:
            other.call_soon_threadsafe(other.stop)
            runner.join(HANG)
            other.close()
    finally:
        engine.shutdown()
    check_clean(engine)


def test_a_readers_loop_closed_while_it_waits_leaves_the_engine_serving():
    """An event loop that ends while its task waits on a stream (asyncio.run cancels the task) aborts that
    request; the outputs still sent to the closed loop must not fail the engine for everyone else."""
    engine = make_engine(executor=SlowExecutor, max_model_len=512, num_pages=140)
    engine.start()
    long = SamplingParams(max_tokens=400, seed=1, ignore_eos=True)
    try:
        async def abandon():
            stream = engine.add_request([1, 2, 3], long)
            asyncio.ensure_future(read_async(stream))
            await asyncio.sleep(0.01)
            return stream  # asyncio.run cancels the reader, then closes the loop

        held = within(HANG, lambda: asyncio.run(abandon()))
        settle(engine)
        assert engine.error is None
        prompt, params = [4, 5], SamplingParams(max_tokens=5, seed=2)
        check_outputs(engine, prompt, params, within(HANG, lambda: list(engine.add_request(prompt, params))))
        del held
    finally:
        engine.shutdown()
    check_clean(engine)
    assert engine.stats().finished_requests["abort"] == 1


# --- aborts ----------------------------------------------------------------------------------------------

def test_aborting_a_finished_stream_leaves_a_new_request_with_its_id_alone():
    """A finished request's id may be reused at once; aborting the old stream afterwards (a `finally:` in its
    reader, or its task cancelled with the last output unread) used to abort the new request instead."""
    engine = make_engine(executor=SlowExecutor)
    engine.start()
    try:
        first = engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, seed=1), request_id="r")
        within(HANG, lambda: list(first))
        prompt, params = [4, 5, 6], SamplingParams(max_tokens=30, seed=2, ignore_eos=True)
        second = engine.add_request(prompt, params, request_id="r")
        first.abort()
        check_outputs(engine, prompt, params, within(HANG, lambda: list(second)))
    finally:
        engine.shutdown()
    check_clean(engine)


def test_an_id_taken_by_a_request_of_fewer_samples_while_the_old_step_runs():
    """A request that ended by EOS (seen a step late) still has a sample in the step in flight when its id is
    taken at once by a request with fewer samples: that sample's surplus token is dropped when the step is read.
    The engine used to look the old sample up among the new request's by its index, an IndexError that failed
    every request (found by the data-parallel hypothesis workloads in a CI run)."""
    engine = make_engine()
    old = SamplingParams(n=2, max_tokens=20, seed=1)  # a sample ends by EOS with a step still in flight
    engine.add_request([1, 2, 3], old, request_id="r", stream=False)
    finals = []
    while not finals:
        finals = [out for out in engine.step() if out.finished]
    assert engine.has_work() and "stop" in {c.finish_reason for c in finals[0].outputs}
    prompt, params = [4, 5, 6], SamplingParams(max_tokens=5, seed=2, ignore_eos=True)
    engine.add_request(prompt, params, request_id="r", stream=False)
    outs = []
    while engine.has_work():
        outs += engine.step()
    check_outputs(engine, prompt, params, outs)
    check_clean(engine)


def test_aborts_racing_final_outputs():
    """Aborts sent at every moment around a request's last step: each stream ends exactly once, with the
    full output or an aborted prefix of it, and nothing is left held."""
    engine = make_engine(executor=SlowExecutor, decode_steps=1)
    engine.start()
    rng = random.Random(0)
    try:
        for round_ in range(40):
            prompt, params = [round_ % VOCAB, 1, 2], SamplingParams(max_tokens=rng.randint(1, 4), seed=round_)
            stream = engine.add_request(prompt, params)
            time.sleep(rng.random() * 0.006)
            engine.abort(stream.request_id)
            check_outputs(engine, prompt, params, within(HANG, lambda: list(stream)), aborted_ok=True)
        settle(engine)
    finally:
        engine.shutdown()
    check_clean(engine)


# --- the background loop ---------------------------------------------------------------------------------

def test_start_after_a_shutdown_that_timed_out_runs_the_loop():
    """shutdown(timeout) may return with the loop still in its step; a start() then used to find the old
    thread, start nothing, and leave every later stream waiting for ever on a loop that had stopped."""
    engine = make_engine(executor=HeldExecutor)
    prompt, params = [4, 5, 6], SamplingParams(max_tokens=5, seed=3, ignore_eos=True)
    stream = engine.add_request(prompt, params)
    engine.start()
    assert engine.executor.entered.wait(HANG)
    engine.shutdown(timeout=0.05)
    engine.start()
    engine.executor.release.set()
    check_outputs(engine, prompt, params, within(HANG, lambda: list(stream)))
    late = engine.add_request(prompt, params)
    check_outputs(engine, prompt, params, within(HANG, lambda: list(late)))
    engine.shutdown()
    assert not engine.running_in_background
    check_clean(engine)


class SoleExecutor(SlowExecutor):
    """Fails the step if another loop thread is inside one too (they would share the engine's state)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.busy = threading.Lock()

    def dispatch(self, plan):
        assert self.busy.acquire(blocking=False), "two engine loops stepped at once"
        try:
            return super().dispatch(plan)
        finally:
            self.busy.release()


def test_starts_and_shutdowns_twice_and_from_many_threads():
    """start() twice runs one loop; shutdown() twice, or from several threads at once, or racing start(),
    raises nothing and never leaves two loops running (a shutdown used to forget a loop started meanwhile);
    after a last start() every stream, read since before the turmoil, completes."""
    engine = make_engine(executor=SoleExecutor, max_model_len=512, num_pages=140)
    engine.start()
    first = engine._thread
    engine.start()
    assert engine._thread is first
    engine.shutdown()
    engine.shutdown()
    assert not first.is_alive() and not engine.running_in_background
    cases = [([i, 1, 2], SamplingParams(max_tokens=150, seed=i, ignore_eos=True)) for i in range(6)]
    outs = [[] for _ in cases]
    engine.start()
    readers = start_readers([engine.add_request(prompt, params) for prompt, params in cases], outs)
    errors = []

    def toggle(seed):
        rng = random.Random(seed)
        try:
            for _ in range(20):
                rng.choice([engine.start, engine.shutdown, engine.start_for_streams])()
        except Exception as error:  # surfaced below
            errors.append(error)

    togglers = [threading.Thread(target=toggle, args=(i,), daemon=True) for i in range(4)]
    for thread in togglers:
        thread.start()
    for thread in togglers:
        thread.join(HANG)
    assert not errors and not any(thread.is_alive() for thread in togglers)
    engine.start()
    finish_readers(engine, readers, cases, outs)


def test_readers_waiting_at_a_shutdown_resume_after_a_start():
    """A shutdown pauses: streams being read, queued or added during it wait (none is lost or ended twice)
    and complete once the loop is started again."""
    engine = make_engine(executor=SlowExecutor, max_slots=2)
    engine.start()
    cases = [([i, 3, 4], SamplingParams(max_tokens=20, seed=i, ignore_eos=True)) for i in range(5)]
    outs = [[] for _ in cases]
    streams = [engine.add_request(prompt, params) for prompt, params in cases[:3]]
    readers = start_readers(streams, outs)
    deadline = time.monotonic() + HANG
    while not any(outs) and time.monotonic() < deadline:
        time.sleep(0.001)
    adding = threading.Thread(target=lambda: streams.extend(engine.add_request(p, q) for p, q in cases[3:]))
    adding.start()
    engine.shutdown()
    adding.join(HANG)
    assert not engine.running_in_background
    engine.start()
    finish_readers(engine, readers + start_readers(streams[3:], outs[3:]), cases, outs)


class FailingExecutor(SlowExecutor):
    def dispatch(self, plan):
        if len(self.dispatched) == 6:
            raise RuntimeError("device lost")
        return super().dispatch(plan)


def test_a_loop_failure_reaches_every_async_reader():
    """The loop's exception ends every `async for`, on one event loop, with EngineError; the thread ends,
    the pages come back, and new requests are refused rather than left waiting."""
    engine = make_engine(executor=FailingExecutor, max_slots=2)
    engine.start()

    async def reader(stream):
        with pytest.raises(EngineError, match="RuntimeError: device lost"):
            async for _ in stream:
                pass

    async def main():
        params = SamplingParams(max_tokens=30, seed=1, ignore_eos=True)
        await asyncio.gather(*(reader(engine.add_request([i, 1, 2], params)) for i in range(5)))

    within(HANG, lambda: asyncio.run(main()))
    deadline = time.monotonic() + HANG
    while engine.running_in_background and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not engine.running_in_background
    with pytest.raises(EngineError, match="stopped after an error"):
        engine.add_request([1, 2])
    engine.shutdown()
    engine.scheduler.check_idle()


def test_an_idle_loop_sleeps():
    """With nothing to do the loop waits on its wake event (a few polls a second, no steps), and it ends
    on shutdown."""
    engine = make_engine()
    engine.start()
    prompt, params = [1, 2, 3], SamplingParams(max_tokens=5, seed=1, ignore_eos=True)
    check_outputs(engine, prompt, params, within(HANG, lambda: list(engine.add_request(prompt, params))))
    settle(engine)
    polls, has_work = [0], engine.has_work

    def counted():
        polls[0] += 1
        return has_work()

    engine.has_work, steps = counted, engine.scheduler.counters.steps
    time.sleep(0.5)
    assert polls[0] <= 30 and engine.scheduler.counters.steps == steps
    thread = engine._thread
    engine.shutdown()
    assert not thread.is_alive()


# --- everything at once ----------------------------------------------------------------------------------

class Client:
    """One thread's or task's random requests, and what each must have ended as."""

    def __init__(self, engine, seed):
        self.engine, self.rng = engine, random.Random(seed)
        self.reasons, self.dropped = collections.Counter(), 0
        self.held = []  # streams whose reader was cancelled: only the cancellation aborts their request
        self.last = None  # (id, stream) of this client's last finished request: its id is reused

    def request(self):
        rng = self.rng
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.3:
            prompt = [9, 9, 9, 9, 9, 9, 9, 9] + prompt  # a shared prefix: the prefix cache is used
        params = SamplingParams(max_tokens=rng.randint(1, 24), seed=rng.randrange(2**32),
                                ignore_eos=rng.random() < 0.5)
        return prompt, params

    def long_request(self):
        """One that cannot end by itself before its reader lets go of it."""
        return [self.rng.randrange(VOCAB)], SamplingParams(max_tokens=None, seed=1, ignore_eos=True)

    def add(self, prompt, params):
        last, self.last = self.last, None
        if last is None or self.rng.random() < 0.5:
            return self.engine.add_request(prompt, params)
        stream = self.engine.add_request(prompt, params, request_id=last[0])
        last[1].abort()  # the old stream, finished: it must not abort the new request with its id
        return stream

    def finish(self, prompt, params, stream, outs, aborted_ok):
        self.reasons[check_outputs(self.engine, prompt, params, outs, aborted_ok)] += 1
        self.last = (stream.request_id, stream)

    def one_sync(self):
        rng, kind = self.rng, self.rng.choice(["read", "reread", "abort", "drop", "elsewhere", "reset"])
        if kind == "reset":
            self.engine.reset_prefix_cache(timeout=HANG)
            return
        if kind == "drop":
            prompt, params = self.long_request()
            stream = self.add(prompt, params)
            assert not any(out.finished for _, out in zip(range(rng.randint(1, 3)), stream))
            self.dropped += 1
            return  # the only reference goes: the request is aborted
        prompt, params = self.request()
        stream, outs = self.add(prompt, params), []
        if kind == "elsewhere":  # read in an event loop of another thread
            outs = within(HANG, lambda: asyncio.run(read_async(stream)))
        else:
            for out in stream:
                outs.append(out)
                if kind == "reread" and rng.random() < 0.3:
                    break
                if kind == "abort" and rng.random() < 0.3:
                    (stream.abort if rng.random() < 0.5 else lambda: self.engine.abort([stream.request_id]))()
            outs += list(stream)
        self.finish(prompt, params, stream, outs, aborted_ok=kind == "abort")

    async def one_async(self):
        if self.rng.random() < 0.3:  # cancelled while it waits: the request is aborted, held or not
            prompt, params = self.long_request()
            stream = self.add(prompt, params)
            task = asyncio.ensure_future(read_async(stream))
            await asyncio.sleep(0)  # the reader waits
            await asyncio.sleep(self.rng.random() * 0.01)
            task.cancel()
            if self.rng.random() < 0.5:
                self.held.append(stream)
            self.dropped += 1
            return
        prompt, params = self.request()
        stream = self.add(prompt, params)
        self.finish(prompt, params, stream, await read_async(stream), aborted_ok=False)


ROUNDS = 25  # requests per client


def test_random_clients_in_threads_and_tasks():
    """Twelve threads and six asyncio tasks on one event loop add, read, break off and re-read, abort (by
    stream and by id, racing the last output), drop streams, cancel readers, reuse ids, reset the prefix
    cache and read on other loops, all at once. Every stream ends once with exactly the right tokens;
    every dropped or cancelled request ends as aborted; afterwards nothing is held and every id is free."""
    engine = make_engine(executor=SlowExecutor, max_model_len=512, num_pages=70, page_size=8, prefill_chunk=16,
                         max_slots=8)
    engine.start()
    clients = [Client(engine, seed) for seed in range(18)]
    errors = []

    def guarded(work):
        try:
            work()
        except BaseException as error:  # surfaced below
            errors.append(error)

    def sync_client(client):
        for _ in range(ROUNDS):
            client.one_sync()

    async def async_clients():
        async def one(client):
            for _ in range(ROUNDS):
                await client.one_async()
        await asyncio.gather(*(one(client) for client in clients[12:]))

    threads = [threading.Thread(target=guarded, args=(lambda c=c: sync_client(c),), daemon=True)
               for c in clients[:12]]
    threads.append(threading.Thread(target=guarded, args=(lambda: asyncio.run(async_clients()),), daemon=True))
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.1, HANG - (time.monotonic() - started)))
        assert not any(thread.is_alive() for thread in threads), "a client is still waiting"
        if errors:
            raise errors[0]
        settle(engine)
        assert engine.error is None
    finally:
        engine.shutdown()
    check_clean(engine)
    reasons = sum((client.reasons for client in clients), collections.Counter())
    reasons["abort"] += sum(client.dropped for client in clients)
    assert engine.stats().finished_requests == dict(reasons)
