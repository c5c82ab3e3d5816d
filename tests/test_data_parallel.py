"""Data parallelism on the host: the per-shard schedulers and request placement, on fake executors (one per
shard, page ids local to each), checked against the unpaged fake model like tests/test_scheduler.py."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinfer.config import EngineConfig
from jaxinfer.engine.data_parallel import DataParallelScheduler
from jaxinfer.engine.engine import Engine, _seed32
from jaxinfer.engine.executor import FakeExecutor, ShardedFakeExecutor, fake_continuation
from jaxinfer.engine.request import SamplingParams
from test_scheduler import check_pages, widest_window

VOCAB, EOS = 50, 7
MAX_STEPS = 5000  # any test run needing more is stuck


def make_engine(shards: int = 2, **overrides) -> Engine:
    values = dict(max_slots=2 * shards, page_size=4, num_pages=24 * shards, max_model_len=64, prefill_chunk=8,
                  decode_steps=2, dtype="float32", attention_backend="reference", mesh_shape=(shards, 1))
    cfg = EngineConfig(**{**values, **overrides})
    local = cfg.shard()
    executor = ShardedFakeExecutor([FakeExecutor(local.num_pages, cfg.page_size, local.max_slots, vocab=VOCAB,
                                                 windows=cfg.kv_groups) for _ in range(shards)])
    return Engine(cfg, executor, vocab_size=VOCAB, eos_ids=(EOS,))


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]], request_ids=None) -> list:
    ids = [engine.add_request(prompt, params, request_id=request_id, stream=False)
           for (prompt, params), request_id in zip(requests, request_ids or [None] * len(requests))]
    finals = {}
    for _ in range(MAX_STEPS):
        if not engine.has_work():
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    engine.check_idle()
    return [finals[i] for i in ids]


def expected(engine, prompt, params, index=0):
    room = engine.cfg.max_model_len - len(prompt)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
    max_new = room if params.max_tokens is None else min(params.max_tokens, room)
    return fake_continuation(prompt, max_new, _seed32(params.seed, index), VOCAB, stops, params.min_tokens,
                             widest_window(engine.cfg))


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 4), st.lists(st.tuples(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30),
                                             st.integers(1, 20), st.integers(1, 3), st.integers(0, 2**32)),
                                   min_size=1, max_size=12))
def test_every_request_matches_the_unpaged_model_on_any_shard(shards, drawn):
    engine = make_engine(shards)
    requests = [(prompt, SamplingParams(n=n, max_tokens=m, seed=seed)) for prompt, m, n, seed in drawn]
    for out, (prompt, params) in zip(run(engine, requests), requests):
        for completion in out.outputs:
            assert completion.token_ids == expected(engine, prompt, params, completion.index)


def test_load_spreads_over_shards_and_siblings_stay_together():
    engine = make_engine(2)
    rng = np.random.default_rng(0)
    for i in range(6):
        engine.add_request(rng.integers(0, VOCAB, 12).tolist(), SamplingParams(n=2 if i == 0 else 1, max_tokens=8,
                                                                               seed=i), stream=False)
    engine.step()  # drains the commands: every request is placed
    scheduler = engine.scheduler
    assert isinstance(scheduler, DataParallelScheduler)
    per_shard = [len(shard.waiting) + len(shard.running) for shard in scheduler.shards]
    assert per_shard == [4, 3] or per_shard == [3, 4]
    first = [seq for shard in scheduler.shards for seq in shard.waiting + shard.running if seq.request_id == "req-0"]
    assert len(first) == 2 and first[0].shard == first[1].shard


def test_a_cached_prefix_draws_its_requests_to_its_shard():
    """Once a 16-token prefix is cached on one shard, later requests sharing it go there even though the
    other shard is idle, and are served from its cache."""
    engine = make_engine(2)
    prefix = list(range(10, 26))
    run(engine, [(prefix + [1, 2], SamplingParams(max_tokens=4, seed=1))])
    home = [shard.pages.num_cached_idle > 0 for shard in engine.scheduler.shards].index(True)
    hits_before = engine.stats().prefix_cache_hits
    outs = [run(engine, [(prefix + [i, i + 1], SamplingParams(max_tokens=4, seed=i))])[0] for i in range(3)]
    assert engine.stats().prefix_cache_hits - hits_before == 3 * 16
    for i, out in enumerate(outs):
        prompt = prefix + [i, i + 1]
        assert out.outputs[0].token_ids == expected(engine, prompt, SamplingParams(max_tokens=4, seed=i))
    assert engine.scheduler.shards[1 - home].pages.num_cached_idle == 0


def test_a_hot_prefix_spills_over_to_an_idle_shard():
    """A prefix cached on one shard (a shared system prompt) draws requests only while that shard is no busier
    than another by more than the tokens the cache saves: a burst sharing it uses both shards, and is exact."""
    engine = make_engine(2)
    prefix = list(range(10, 26))
    run(engine, [(prefix + [1, 2], SamplingParams(max_tokens=4, seed=1))])
    requests = [(prefix + [i], SamplingParams(max_tokens=20, seed=i)) for i in range(8)]
    ids = [engine.add_request(prompt, params, stream=False) for prompt, params in requests]
    engine.step()  # drains the commands: every request is placed
    assert all(len(shard.waiting) + len(shard.running) >= 3 for shard in engine.scheduler.shards)
    finals = {}
    while engine.has_work():
        finals.update({out.request_id: out for out in engine.step() if out.finished})
    engine.check_idle()
    for request_id, (prompt, params) in zip(ids, requests):
        assert finals[request_id].outputs[0].token_ids == expected(engine, prompt, params)


def test_a_burst_is_placed_in_linear_time_on_loads_kept_up_to_date(monkeypatch):
    """Placing each request of a burst summed every queued sequence again (quadratic in the burst). Each shard's
    load is now summed once per step and kept up to date by each placement, so it still equals the full sum."""
    engine = make_engine(2, max_model_len=64)
    calls = []
    for shard in engine.scheduler.shards:
        total = shard.outstanding_tokens
        monkeypatch.setattr(shard, "outstanding_tokens", lambda total=total: calls.append(1) or total())
    for i in range(40):
        engine.add_request(list(range(1, 2 + i % 13)), SamplingParams(n=1 + i % 2, max_tokens=1 + i % 7), stream=False)
    engine._drain_commands()
    assert len(calls) == 2  # once per shard for the whole burst
    loads = engine.scheduler._loads
    assert loads == [shard.outstanding_tokens() for shard in engine.scheduler.shards] and min(loads) > 0.8 * max(loads)
    run(engine, [])


def test_a_reused_request_id_is_placed_afresh():
    """An id used again after its request ended names a new request: it goes where its prompt is cached, not
    where the last request of that id went."""
    engine = make_engine(2)
    cached, other = list(range(10, 30)), [1, 2, 3]
    first = run(engine, [(cached, SamplingParams(max_tokens=20, seed=1)), (other, SamplingParams(max_tokens=2))])
    assert first[1].request_id == "req-1"  # placed last, on the other shard
    hits = engine.stats().prefix_cache_hits
    run(engine, [(cached, SamplingParams(max_tokens=2, seed=3))], request_ids=["req-1"])
    assert engine.stats().prefix_cache_hits - hits == 16


def test_preemption_on_one_shard_while_the_other_has_room():
    """Three siblings of 4 + 24 tokens outgrow their shard's 17 two-token pages (one needs 14) while a short
    request runs on the other shard: the siblings are preempted and recomputed there, and every output is exact."""
    engine = make_engine(2, max_slots=6, page_size=2, num_pages=36, max_model_len=32, prefill_chunk=4,
                         decode_steps=3)
    requests = [([1, 2, 3, 4], SamplingParams(n=3, max_tokens=24, seed=1, ignore_eos=True)),
                ([5, 6], SamplingParams(max_tokens=4, seed=2, ignore_eos=True))]
    outs = run(engine, requests)
    assert engine.stats().preemptions > 0
    for out, (prompt, params) in zip(outs, requests):
        assert [c.token_ids for c in out.outputs] == [expected(engine, prompt, params, i) for i in range(params.n)]
    busy = [len(executor.dispatched) for executor in engine.executor.shards]
    assert min(busy) < max(busy) // 4  # the short request's shard was idle for most of the run


def test_a_request_too_big_for_a_shard_is_refused_naming_the_shards():
    """A shard's part of the pool bounds a request (its pages all come from one shard), and the refusal says so."""
    engine = make_engine(2, num_pages=20)
    with pytest.raises(MemoryError, match="needs 13 KV pages of 4 tokens; the whole pool has 9 per data shard "
                                          r"\(2 shards"):
        engine.add_request(list(range(30)), SamplingParams(max_tokens=20))


def test_a_request_wanting_prompt_logprobs_is_not_drawn_by_a_cache_it_cannot_use():
    """Prompt logprobs need every prompt position computed, so a cached prefix saves such a request nothing:
    it goes to the idle shard, not behind the work on the shard that caches its prompt."""
    engine = make_engine(2)
    prefix = list(range(10, 26))
    run(engine, [(prefix + [1, 2], SamplingParams(max_tokens=4, seed=1))])
    assert engine.scheduler.shards[0].pages.num_cached_idle > 0  # ties go to shard 0
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=8, seed=2), stream=False)  # a tie again: shard 0
    engine.add_request(prefix + [5], SamplingParams(max_tokens=4, prompt_logprobs=1), request_id="x", stream=False)
    engine.step()  # drains the commands: both requests are placed
    assert [seq.shard for seq in engine.scheduler.running + engine.scheduler.waiting if seq.request_id == "x"] == [1]


# --- property-based: random workloads with aborts on small per-shard pools ----------------------------

@dataclasses.dataclass
class Arrival:
    prompt: list
    params: SamplingParams
    priority: int
    request_id: str | None  # a few fixed ids, so that ids are reused once their request has ended
    step: int
    abort_step: int | None


@st.composite
def workloads(draw):
    shards, page_size = draw(st.integers(2, 3)), draw(st.integers(1, 8))
    max_model_len = draw(st.integers(8, 48))
    per_seq = math.ceil(max_model_len / page_size)
    local_pages = draw(st.integers(max(2, per_seq * 2 // 3), per_seq + 6))  # tight: preemption, refusals
    cfg = dict(max_slots=shards * draw(st.integers(1, 3)), page_size=page_size, max_model_len=max_model_len,
               num_pages=shards * local_pages, prefill_chunk=draw(st.integers(1, 12)),
               decode_steps=draw(st.integers(1, 4)), enable_prefix_caching=draw(st.booleans()),
               max_prefill_seqs=draw(st.sampled_from([1, 2, 4])))
    window = draw(st.integers(1, 16))  # KV cache groups: global only (half), sliding only, or both
    cfg["kv_windows"] = draw(st.sampled_from([None, None, (window,), (None, window)]))
    token = st.integers(0, VOCAB - 1)
    shared = draw(st.lists(st.lists(token, min_size=1, max_size=30), min_size=1, max_size=3))
    arrivals = []
    for _ in range(draw(st.integers(2, 10))):
        prefix = draw(st.sampled_from([[]] + shared))
        prompt = (prefix + draw(st.lists(token, min_size=0 if prefix else 1, max_size=20)))[:max_model_len - 1]
        max_tokens = draw(st.one_of(st.none(), st.integers(1, 24)))
        params = SamplingParams(n=draw(st.integers(1, 3)), max_tokens=max_tokens, seed=draw(st.integers(0, 2**32)),
                                min_tokens=draw(st.integers(0, min(max_tokens or 8, 8))),
                                ignore_eos=draw(st.booleans()))
        step = draw(st.integers(0, 10))
        abort = draw(st.one_of(st.none(), st.none(), st.integers(step, step + 6), st.integers(step, step + 30)))
        arrivals.append(Arrival(prompt, params, draw(st.integers(-2, 2)), draw(st.sampled_from([None, "a", "b"])),
                                step, abort))
    return shards, cfg, arrivals


def _add(engine, arrival):
    """Add a drawn request; its id, or None if refused (a reused id still in use, or one that can never fit)."""
    local = engine.cfg.shard()
    max_new = min(arrival.params.max_tokens or local.max_model_len, local.max_model_len - len(arrival.prompt))
    fits = local.sequence_pages(len(arrival.prompt) + max_new - 1) <= local.num_pages - 1
    try:
        request_id = engine.add_request(arrival.prompt, arrival.params, arrival.request_id, arrival.priority,
                                        stream=False)
    except MemoryError:
        assert not fits
        return None
    except ValueError as error:
        assert "already in use" in str(error)
        return None
    assert fits
    return request_id


def check_shards(engine) -> None:
    """After a step: each shard's pages are held exactly by its own sequences, and siblings share a shard."""
    for d, shard in enumerate(engine.scheduler.shards):
        check_pages(shard)
        assert all(seq.shard == d for seq in shard.running + shard.waiting)
    for request in engine._requests.values():
        assert len({seq.shard for seq in request.seqs}) == 1, "siblings on different shards"


def _check_final(engine, arrival, out):
    for completion in out.outputs:
        want = expected(engine, arrival.prompt, arrival.params, completion.index)
        if completion.finish_reason == "abort":
            assert arrival.abort_step is not None and want[:len(completion.token_ids)] == completion.token_ids
        else:
            assert completion.token_ids == want


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_on_shards_match_the_unpaged_model(workload):
    """Random arrivals, aborts (queued, mid-prefill, mid-decode), reused ids, shared prefixes, n > 1, priorities
    and tight per-shard pools: every step leaves each shard consistent, every request ends with the unpaged
    fake model's tokens (a prefix of them when aborted), and at the end every page and slot is free."""
    shards, cfg, arrivals = workload
    engine = make_engine(shards, **cfg)
    live, finals = {}, {}  # request id -> the arrival it names now; arrival -> its final output
    last_event = max(max(a.step, a.abort_step or 0) for a in arrivals)
    for step in range(MAX_STEPS):
        for i, arrival in enumerate(arrivals):
            if arrival.step == step and (request_id := _add(engine, arrival)) is not None:
                live[request_id] = i
            if arrival.abort_step == step and i in live.values():
                engine.abort([request_id for request_id, j in live.items() if j == i])
        if step > last_event and not engine.has_work():
            break
        for out in engine.step():
            if out.finished:
                finals[live.pop(out.request_id)] = out
        check_shards(engine)
    else:
        pytest.fail(f"still busy after {MAX_STEPS} steps")
    engine.check_idle()
    assert not live
    assert engine.stats().generation_tokens == sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    for i, out in finals.items():
        _check_final(engine, arrivals[i], out)
    assert engine.reset_prefix_cache() and engine.stats().kv_usage == 0
    assert all(shard.pages.num_cached_idle == 0 for shard in engine.scheduler.shards)
