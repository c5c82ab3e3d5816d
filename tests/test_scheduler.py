"""The host engine against the fake executor: scheduling, paging, preemption, prefix caching, stop rules,
streams and counters. Every output is compared with `fake_continuation`, which knows nothing of paging, so
any bookkeeping bug shows up as a wrong token."""

import asyncio
import copy
import dataclasses
import math
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import Engine, EngineError, _seed32
from jaxinfer.engine.executor import FakeExecutor, fake_continuation
from jaxinfer.engine.metrics import HISTOGRAMS, ITL, TTFT
from jaxinfer.engine.pages import NULL_PAGE, pages_for
from jaxinfer.engine.request import SamplingParams, Status
from jaxinfer.engine.scheduler import neutral_sampling
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer

VOCAB, EOS = 50, 7
MAX_STEPS = 5000  # any test run needing more is stuck
E2E = "e2e_request_latency_seconds"


def make_engine(vocab=VOCAB, eos=(EOS,), tokenizer=None, executor=FakeExecutor, **overrides) -> Engine:
    values = dict(max_slots=4, page_size=4, num_pages=40, max_model_len=64, prefill_chunk=8, decode_steps=2,
                  dtype="float32", attention_backend="reference")
    cfg = EngineConfig(**{**values, **overrides})
    fake = executor(cfg.num_pages, cfg.page_size, cfg.max_slots, vocab=vocab, windows=cfg.kv_groups)
    return Engine(cfg, fake, vocab_size=vocab, tokenizer=tokenizer, eos_ids=eos)


def widest_window(cfg):
    """The context the fake model reads: everything, unless every KV cache group slides."""
    return None if None in cfg.kv_groups else max(cfg.kv_groups)


def stop_ids(engine, params):
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(engine.eos_ids))


def expected(engine, prompt, params, index=0):
    """What sequence `index` of a request must produce: the fake model run alone, without paging."""
    room = engine.cfg.max_model_len - len(prompt)
    max_new = room if params.max_tokens is None else min(params.max_tokens, room)
    return fake_continuation(prompt, max_new, _seed32(params.seed, index), engine.vocab_size,
                             stop_ids(engine, params), params.min_tokens, widest_window(engine.cfg))


def check_invariants(engine, plans_seen: int) -> int:
    """The scheduler's state after a step; returns how many plans have been checked."""
    s, cfg = engine.scheduler, engine.cfg
    check_pages(s)
    plans = engine.executor.dispatched
    for plan in plans[plans_seen:]:
        packed = sum(len(chunk.tokens) for chunk in plan.prefills)
        assert packed <= cfg.prefill_chunk and len(plan.prefills) <= cfg.prompts_per_step
        assert all(len(chunk.tokens) >= 1 for chunk in plan.prefills)
        assert plan.steps.max(initial=0) <= cfg.decode_steps
        assert plan.num_steps >= plan.steps.max(initial=0)
    return len(plans)


def check_pages(s) -> None:
    """One scheduler's pages and slots: each running sequence holds a page per position in every group (a sliding
    group from its window on, null before), its block tables say so, and every page's references are its
    holders; waiting sequences hold nothing."""
    cfg = s.cfg
    s.pages.check()
    running = s.running
    assert len(running) <= cfg.max_slots
    holders = {}
    for seq in running:
        assert s.slots[seq.slot] is seq and seq.status is Status.RUNNING
        assert len(seq.pages) == len(cfg.kv_groups)
        for group, (pages, window) in enumerate(zip(seq.pages, cfg.kv_groups)):
            held = [page != NULL_PAGE for page in pages]
            first = held.index(True) if any(held) else len(pages)
            assert all(held[first:]), "the null page after a held one"
            assert first <= s._window_start(group, seq.num_computed), "a page of the window was freed"
            assert window is not None or first == 0, "a global group freed a page"
            assert len(pages) >= pages_for(seq.num_computed, cfg.page_size), "computed positions without a page"
            assert list(s._tables[seq.slot, group, :len(pages)]) == pages
            assert not s._tables[seq.slot, group, len(pages):].any()
            for page in pages[first:]:
                holders[page] = holders.get(page, 0) + 1
    assert all(not seq.pages and seq.slot is None for seq in s.waiting)
    for page in range(1, s.pages.num_pages):
        assert s.pages._refs[page] == holders.get(page, 0), f"page {page}: refs != holders"
        if holders.get(page, 0) > 1:
            assert page in s.pages._hash_of, f"page {page} is shared but holds no cached prefix"


def step_and_check(engine, finals: dict, seen: int) -> int:
    """One engine step: collect final outputs (each once) and check the invariants."""
    for out in engine.step():
        if out.finished:
            assert out.request_id not in finals, "a request finished twice"
            finals[out.request_id] = out
    return check_invariants(engine, seen)


def run(engine):
    """Step until idle; returns the final output of each request. Fails if the engine stops progressing."""
    finals, seen = {}, 0
    for _ in range(MAX_STEPS):
        if not engine.has_work():
            break
        seen = step_and_check(engine, finals, seen)
    assert not engine.has_work(), f"still busy after {MAX_STEPS} steps"
    engine.check_idle()
    return finals


def prompts(count, length, seed=0):
    """`count` distinct fixed prompts of `length` tokens."""
    return [[(seed * 31 + i * 17 + j * 7 + (i * j) % 5) % VOCAB for j in range(length)] for i in range(count)]


# --- property-based: random workloads on random engine shapes -----------------------------------------

@dataclasses.dataclass
class Arrival:
    prompt: list
    params: SamplingParams
    priority: int
    step: int
    abort_step: int | None


@st.composite
def workloads(draw):
    page_size = draw(st.integers(1, 8))
    max_model_len = draw(st.integers(8, 72))
    per_seq = math.ceil(max_model_len / page_size)
    cfg = dict(max_slots=draw(st.integers(1, 5)), page_size=page_size, max_model_len=max_model_len,
               num_pages=draw(st.integers(max(2, per_seq * 2 // 3), per_seq + 8)),  # tight: preemption, refusals
               prefill_chunk=draw(st.integers(1, 12)), decode_steps=draw(st.integers(1, 4)),
               enable_prefix_caching=draw(st.booleans()), max_prefill_seqs=draw(st.sampled_from([1, 1, 2, 4])))
    window = draw(st.integers(1, 20))  # KV cache groups: global only (half), sliding only, or both (hybrid)
    cfg["kv_windows"] = draw(st.sampled_from([None, None, (window,), (None, window), (None, window, window)]))
    eos = draw(st.sampled_from([(), (EOS,), (EOS, 11)]))
    token = st.integers(0, VOCAB - 1)
    shared = draw(st.lists(st.lists(token, min_size=1, max_size=40), min_size=1, max_size=3))
    arrivals = []
    for _ in range(draw(st.integers(1, 8))):
        prefix = draw(st.sampled_from([[]] + shared))
        prompt = (prefix + draw(st.lists(token, min_size=0 if prefix else 1, max_size=30)))[:max_model_len - 1]
        max_tokens = draw(st.one_of(st.none(), st.integers(1, 24), st.integers(1, 24)))  # None: a third
        params = SamplingParams(n=draw(st.integers(1, 3)), max_tokens=max_tokens,
                                min_tokens=draw(st.integers(0, min(max_tokens or 8, 8))),
                                seed=draw(st.integers(0, 2**64 - 1)),
                                stop_token_ids=draw(st.lists(token, max_size=2)), ignore_eos=draw(st.booleans()))
        step = draw(st.integers(0, 15))
        # Half are never aborted; the others soon (often queued or mid-prefill) or later (mid-decode or done).
        abort = draw(st.one_of(st.none(), st.none(), st.integers(step, step + 6), st.integers(step, step + 30)))
        arrivals.append(Arrival(prompt, params, draw(st.integers(-2, 2)), step, abort))
    return cfg, eos, arrivals


def _add(engine, arrival):
    """Add a drawn request; returns its id, or None when it was refused (as it must be iff it can never fit)."""
    cfg, p = engine.cfg, arrival.params
    max_new = min(p.max_tokens or cfg.max_model_len, cfg.max_model_len - len(arrival.prompt))
    fits = cfg.sequence_pages(len(arrival.prompt) + max_new - 1) <= cfg.num_pages - 1  # no KV for the last
    try:
        request_id = engine.add_request(arrival.prompt, p, priority=arrival.priority, stream=False)
    except MemoryError:
        assert not fits
        return None
    assert fits
    return request_id


def _check_final(engine, arrival, out):
    for completion in out.outputs:
        want = expected(engine, arrival.prompt, arrival.params, completion.index)
        if completion.finish_reason == "abort":
            assert arrival.abort_step is not None
            assert want[:len(completion.token_ids)] == completion.token_ids
            continue
        assert completion.token_ids == want
        stops = stop_ids(engine, arrival.params)
        ended = bool(want) and want[-1] in stops and len(want) >= arrival.params.min_tokens
        assert completion.finish_reason == ("stop" if ended else "length")
        if ended:
            reported = want[-1] in arrival.params.stop_token_ids or want[-1] != EOS  # EOS is the first eos id
            assert completion.stop_reason == (want[-1] if reported else None)


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_match_the_unpaged_model(workload):
    """Random arrivals, aborts (queued, mid-prefill, mid-decode), shared prefixes, n > 1, stop ids, min_tokens,
    priorities, tight pools and sliding KV cache groups: the invariants hold after every step, every request
    ends, and every token equals the unpaged fake model's (a prefix of it when aborted); requests that can never
    fit are refused."""
    cfg, eos, arrivals = workload
    engine = make_engine(eos=eos, **cfg)
    ids, finals, seen = {}, {}, 0
    last_event = max(max(a.step, a.abort_step or 0) for a in arrivals)
    for step in range(MAX_STEPS):
        for i, arrival in enumerate(arrivals):
            if arrival.step == step and (request_id := _add(engine, arrival)) is not None:
                ids[i] = request_id
            if arrival.abort_step == step and i in ids:
                engine.abort(ids[i])
        if step > last_event and not engine.has_work():
            break
        seen = step_and_check(engine, finals, seen)
    else:
        pytest.fail(f"still busy after {MAX_STEPS} steps")
    engine.check_idle()
    assert set(finals) == set(ids.values())
    for i, request_id in ids.items():
        _check_final(engine, arrivals[i], finals[request_id])


# --- targeted ------------------------------------------------------------------------------------------

def test_repeated_prefix_is_served_from_cache():
    """The second request with the same 24-token prefix reads its pages from the cache: hits are counted,
    fewer prefill tokens are computed than without caching, and the outputs are unchanged."""
    prefix = prompts(1, 24)[0]
    requests = [(prefix + [1, 2, 3], SamplingParams(max_tokens=6, seed=1, ignore_eos=True)),
                (prefix + [4, 5], SamplingParams(max_tokens=6, seed=2, ignore_eos=True))]
    computed = {}
    for caching in (True, False):
        engine = make_engine(enable_prefix_caching=caching)
        ids = []
        for prompt, params in requests:
            ids.append(engine.add_request(prompt, params, stream=False))
            finals = run(engine)  # one after the other, so the first has filled the cache
            assert finals[ids[-1]].outputs[0].token_ids == expected(engine, prompt, params)
        stats = engine.stats()
        computed[caching] = stats.prefill_tokens_computed
        assert stats.prefix_cache_queries == (27 + 26 if caching else 0)  # vLLM counts lookups only
        assert stats.prefix_cache_hits == (24 if caching else 0)
        assert finals[ids[1]].num_cached_tokens == (24 if caching else 0)
    assert computed[True] == computed[False] - 24


def test_an_admission_that_does_not_fit_leaves_the_lru_order_alone():
    """A queue head that cannot fit yet does not take and give back its cached prefix, which would make those
    pages the most recently used (vLLM checks the free pages before it touches any); once room appears it is
    admitted with its hits and the exact output."""
    engine = make_engine(max_slots=2, page_size=4, num_pages=12, max_model_len=40, decode_steps=1)
    first, second = prompts(1, 9)[0], prompts(1, 9, seed=1)[0]
    for prompt in (first, second):  # their full pages go idle into the LRU: the first's are the oldest
        engine.add_request(prompt, SamplingParams(max_tokens=1, seed=1), stream=False)
        run(engine)
    engine.add_request(prompts(1, 8, seed=2)[0], SamplingParams(max_tokens=12, seed=2, ignore_eos=True),
                       stream=False)
    engine.step()
    lru = list(engine.scheduler.pages._lru)
    assert len(lru) == 4
    long = first + prompts(1, 24, seed=3)[0]  # 33 tokens: the first's 2 cached pages + 7 new, with 1 kept back
    params = SamplingParams(max_tokens=1, seed=3)
    request_id = engine.add_request(long, params, stream=False)
    for _ in range(3):
        engine.step()
        assert engine.stats().num_waiting == 1 and list(engine.scheduler.pages._lru) == lru
    finals = run(engine)
    assert finals[request_id].num_cached_tokens == 8
    assert finals[request_id].outputs[0].token_ids == expected(engine, long, params)


def test_short_prompts_share_a_step_up_to_the_token_budget():
    """With room for 4 prompts per step, prompts of 5, 6 and 20 tokens fill the first step's 16-token budget
    in arrival order (the last one cut short) and the rest of the long one comes next; with 1 they go one
    per step as before. The outputs are the same either way."""
    lengths = (5, 6, 20)
    params = SamplingParams(max_tokens=4, seed=3, ignore_eos=True)
    for packs, first_chunks in ((4, [(5, True), (6, True), (5, False)]), (1, [(5, True)])):
        engine = make_engine(prefill_chunk=16, max_prefill_seqs=packs)
        requests = [(p, engine.add_request(p, params, stream=False)) for p in [prompts(1, n, seed=i)[0] for i, n in enumerate(lengths)]]
        finals = run(engine)
        first, second = engine.executor.dispatched[:2]
        assert [(len(c.tokens), c.sample) for c in first.prefills] == first_chunks
        if packs > 1:
            assert [(c.start, len(c.tokens)) for c in second.prefills] == [(5, 15)]
            assert first.num_steps == 1 and sorted(first.seqs) == [0, 1, 2]
        for prompt, request_id in requests:
            assert finals[request_id].outputs[0].token_ids == expected(engine, prompt, params)
        engine.check_idle()


def test_preemption_under_a_tiny_pool():
    """Twelve requests of 4 + 24 tokens through a pool of 17 two-token pages (one sequence needs 14): short
    prompts are admitted together, then outgrow the pool, so sequences are preempted and recomputed, yet
    every output is exact and the run ends within the step bound."""
    engine = make_engine(max_slots=4, page_size=2, num_pages=18, max_model_len=32, prefill_chunk=4, decode_steps=3)
    params = [SamplingParams(max_tokens=24, seed=i, ignore_eos=True) for i in range(12)]
    requests = [(p, q, engine.add_request(p, q, stream=False)) for p, q in zip(prompts(12, 4), params)]
    finals = run(engine)
    assert engine.stats().preemptions > 0
    for prompt, p, request_id in requests:
        assert finals[request_id].outputs[0].token_ids == expected(engine, prompt, p)
        assert finals[request_id].outputs[0].finish_reason == "length"


def test_request_too_big_for_the_pool_is_refused_and_engine_keeps_serving():
    """A request whose prompt plus max_tokens cannot fit in the whole pool is refused at add_request with a
    MemoryError naming the sizes, while a running request and one that exactly fits are served: the last
    sampled token's KV is never written, so 10 + 11 tokens fit in 20 slots of KV."""
    engine = make_engine(page_size=4, num_pages=6, max_model_len=64)  # 5 usable pages: 20 tokens
    params = SamplingParams(max_tokens=10, seed=3, ignore_eos=True)
    request_id = engine.add_request(list(range(10)), params, stream=False)
    engine.step()
    with pytest.raises(MemoryError, match=r"10 prompt tokens \+ 12 new tokens needs 6 KV pages of 4 tokens; "
                                          r"the whole pool has 5"):
        engine.add_request(list(range(10)), SamplingParams(max_tokens=12))
    fits = dataclasses.replace(params, seed=4, max_tokens=11)
    full = engine.add_request(list(range(10)), fits, stream=False)
    finals = run(engine)
    assert finals[full].outputs[0].token_ids == expected(engine, list(range(10)), fits)
    assert finals[request_id].outputs[0].token_ids == expected(engine, list(range(10)), params)
    engine.check_idle()


@pytest.mark.parametrize("field, value, message", [
    ("n", 0, "n must be an integer >= 1"),
    ("max_tokens", 0, "max_tokens must be"),
    ("min_tokens", -1, "min_tokens must be"),
    ("temperature", -0.5, "temperature must be"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1e-300, r"top_p must be in \(0, 1\] \(at least"),  # would be 0 on the device
    ("top_k", -2, "top_k must be"),
    ("top_k", 2**31, "top_k must be"),  # would overflow the device's int32 row
    ("min_tokens", 2**40, "min_tokens must be"),
    ("repetition_penalty", 0.0, "repetition_penalty must be"),
    ("repetition_penalty", 1e-300, "repetition_penalty must be"),
    ("seed", 2**64, "seed must be"),
    ("stop", [""], "stop must be"),
    ("stop", 5, "stop must be a string or a list, got 5"),
    ("stop_token_ids", 5, "stop_token_ids must be a list of token ids, got 5"),
    ("stop_token_ids", [-1], "stop_token_ids must be token ids"),
    ("stop_token_ids", [2**40], "stop_token_ids must be token ids"),  # crashed the step that admitted it
    ("temperature", 1e39, "temperature must be"),  # inf on the device
    ("repetition_penalty", 1e39, "repetition_penalty must be"),
    ("ignore_eos", "yes", "ignore_eos must be True or False"),
    ("skip_special_tokens", None, "skip_special_tokens must be True or False"),
    ("logprobs", 21, r"logprobs must be an integer in \[0, 20\]"),
    ("logit_bias", [(1, 2.0)], "logit_bias must be a dict of token id -> bias"),
    ("logit_bias", {"x": 2.0}, "logit_bias must have token ids"),
    ("logit_bias", {-1: 2.0}, "logit_bias must have token ids"),
    ("logit_bias", {5: float("nan")}, "logit_bias values must be finite numbers"),
    ("logit_bias", {5: 1e39}, "logit_bias values must be finite numbers"),  # inf on the device
    ("logit_bias", dict.fromkeys(range(1025), 1.0), "logit_bias may hold at most 1024 tokens, got 1025"),
    ("allowed_token_ids", [], "allowed_token_ids must hold 1 to 1024 token ids, got 0"),
    ("allowed_token_ids", 5, "allowed_token_ids must be a list of token ids, got 5"),
    ("allowed_token_ids", [1.5], "allowed_token_ids must have token ids"),
    ("allowed_token_ids", list(range(1025)), "allowed_token_ids must hold 1 to 1024 token ids, got 1025"),
    ("truncate_prompt_tokens", 0, "truncate_prompt_tokens must be an integer >= 1 or -1"),
    ("truncate_prompt_tokens", -2, "truncate_prompt_tokens must be an integer >= 1 or -1"),
    ("truncate_prompt_tokens", 2.0, "truncate_prompt_tokens must be an integer >= 1 or -1"),
])
def test_invalid_sampling_params_name_the_field(field, value, message):
    """Each bad setting raises ValueError saying which field was wrong."""
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_logit_bias_takes_json_keys_and_stays_a_copy():
    """JSON objects have string keys, so OpenAI's logit_bias arrives as {"50256": -100}."""
    given = {"7": -100, 9: 2.5}
    params = SamplingParams(logit_bias=given)
    assert params.logit_bias == {7: -100, 9: 2.5} and params.uses_edits
    given[11] = 1.0
    assert 11 not in params.logit_bias
    assert copy.deepcopy(params) == params  # vLLM users clone params so (vLLM's own clone() is a deepcopy)
    assert not SamplingParams().uses_edits and SamplingParams(allowed_token_ids=[3]).allowed_token_ids == (3,)


def test_repetition_penalty_above_two_is_allowed():
    """vLLM bounds repetition_penalty only below (> 0); the [-2, 2] range is the OpenAI penalties'."""
    assert SamplingParams(repetition_penalty=2.5).repetition_penalty == 2.5


def test_min_tokens_above_max_tokens_is_refused():
    """min_tokens larger than max_tokens is a ValueError naming both."""
    with pytest.raises(ValueError, match="min_tokens=5 exceeds max_tokens=3"):
        SamplingParams(max_tokens=3, min_tokens=5)


@pytest.mark.parametrize("prompt, params, message", [
    ([], None, "the prompt is empty"),
    ([1, 50], None, r"token id 50 is outside the vocabulary \[0, 50\)"),
    (list(range(40)) * 2, None, "the prompt has 80 tokens; the maximum context length is 64"),
    ([1], SamplingParams(stop="x"), "stop strings need a tokenizer"),
    ([1], SamplingParams(stop_token_ids=[50], min_tokens=2), r"stop token id 50 is outside the vocabulary \[0, 50\)"),
    ([1], SamplingParams(allowed_token_ids=[3, 50]), r"allowed_token_ids 50 is outside the vocabulary \[0, 50\)"),
    ([1], SamplingParams(logit_bias={60: 1.0}), r"logit_bias 60 is outside the vocabulary \[0, 50\)"),
])
def test_invalid_requests_are_refused_in_the_callers_thread(prompt, params, message):
    """add_request checks the prompt against the vocabulary and the context before queuing anything."""
    engine = make_engine()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_work()


def test_lower_priority_value_is_admitted_first():
    """With one slot, queued requests are admitted by priority (lower first), ties in arrival order."""
    engine = make_engine(max_slots=1)
    order = {engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), priority=prio, stream=False): prio
             for prio in (3, 0, 3, -1, 0)}
    run(engine)
    admitted = [plan.seqs[chunk.slot].request_id for plan in engine.executor.dispatched
                for chunk in plan.prefills if chunk.start == 0]
    assert admitted == sorted(order, key=lambda rid: (order[rid], int(rid.split("-")[1])))


def test_a_freed_slot_keeps_no_sampling_rows():
    """A finished request's rows (random draw, filters, penalties, logit edits, logprobs) leave its slot with
    it: the steps of a greedy request still running must not keep running the sampler passes it turned on."""
    engine = make_engine()
    greedy = engine.add_request([1, 2, 3], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                                stream=False)
    busy = SamplingParams(max_tokens=2, temperature=0.8, top_p=0.5, presence_penalty=0.5, logprobs=1, seed=1,
                          logit_bias={3: 1.0}, allowed_token_ids=[3, 4], ignore_eos=True)
    engine.add_request([4, 5, 6], busy, stream=False)
    finals, seen = {}, 0
    while not finals:
        seen = step_and_check(engine, finals, seen)
    done = len(engine.executor.dispatched)
    finals.update(run(engine))
    assert greedy in finals and len(engine.executor.dispatched) > done
    neutral = neutral_sampling(engine.cfg.max_slots)
    for plan in engine.executor.dispatched[done:]:
        assert list(plan.seqs) == [0]
        for name, row in plan.sampling.items():
            assert (row[1:] == neutral[name][1:]).all(), name


@pytest.mark.parametrize("caching", [True, False])
def test_siblings_share_prompt_pages_and_differ_by_seed(caching):
    """n=3: the siblings hold the same pages for the prompt's full pages (counted as prefix hits when the
    prefix cache is on; shared all the same when it is off), and each produces its own seeded continuation.
    A request with prompt logprobs, which skips the cache, is no lookup."""
    engine = make_engine(max_slots=4, page_size=4, prefill_chunk=16, enable_prefix_caching=caching)
    prompt = prompts(1, 13)[0]  # 12 tokens before the last: 3 full pages
    params = SamplingParams(n=3, max_tokens=8, seed=42, ignore_eos=True)
    request_id = engine.add_request(prompt, params, stream=False)
    shared = False
    finals, seen = {}, 0
    while engine.has_work():
        for out in engine.step():
            finals[out.request_id] = out
        seen = check_invariants(engine, seen)
        running = engine.scheduler.running
        if len(running) == 3:
            shared = shared or all(seq.pages[0][:3] == running[0].pages[0][:3] for seq in running)
    engine.check_idle()
    assert shared
    stats = engine.stats()
    assert stats.prefill_tokens_computed == 13 + 2 * 1
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == ((3 * 13, 2 * 12) if caching else (0, 0))
    outputs = [c.token_ids for c in finals[request_id].outputs]
    assert outputs == [expected(engine, prompt, params, i) for i in range(3)]
    assert len({tuple(o) for o in outputs}) == 3
    engine.add_request(prompt, SamplingParams(max_tokens=2, prompt_logprobs=1), stream=False)
    run(engine)
    assert engine.stats().prefix_cache_queries == stats.prefix_cache_queries
    engine.check_idle()


def _seed_where(predicate, prompt, vocab, stops, limit=2000):
    for seed in range(limit):
        if predicate(fake_continuation(prompt, 20, _seed32(seed, 0), vocab, stops)):
            return seed
    raise AssertionError("no seed found")


def test_min_tokens_suppresses_eos():
    """A seed whose free run hits EOS within 2 tokens: with min_tokens=6 the engine bans EOS until 6 tokens
    exist, matching the fake model with the same ban."""
    vocab, prompt = 8, [1, 2, 3]
    seed = _seed_where(lambda out: len(out) <= 2, prompt, vocab, {EOS})
    engine = make_engine(vocab=vocab, decode_steps=3)
    params = SamplingParams(max_tokens=20, min_tokens=6, seed=seed)
    request_id = engine.add_request(prompt, params, stream=False)
    tokens = run(engine)[request_id].outputs[0].token_ids
    assert len(tokens) >= 6 and EOS not in tokens[:6]
    assert tokens == fake_continuation(prompt, 20, _seed32(seed, 0), vocab, {EOS}, min_tokens=6)


def test_tokens_after_eos_in_a_multi_step_dispatch_are_dropped():
    """With decode_steps=4 the device samples past EOS inside one dispatch; the output ends at EOS."""
    prompt = [4, 5, 6]
    seed = _seed_where(lambda out: len(out) in (3, 4, 7, 8) and out[-1] == EOS, prompt, VOCAB, {EOS}, 20000)
    engine = make_engine(decode_steps=4)
    params = SamplingParams(max_tokens=20, seed=seed)
    request_id = engine.add_request(prompt, params, stream=False)
    out = run(engine)[request_id].outputs[0]
    sampled = 1 + sum(int(plan.steps.sum()) for plan in engine.executor.dispatched)
    assert sampled > len(out.token_ids)  # the device did run past EOS
    assert out.token_ids == expected(engine, prompt, params) and out.token_ids[-1] == EOS
    assert out.finish_reason == "stop" and out.stop_reason is None


@pytest.mark.parametrize("end, reason", [(EOS, None), (11, 11)])
def test_extra_eos_ids_report_themselves_as_the_stop_reason(end, reason):
    """As in vLLM: the model's EOS ends a sequence with stop_reason None, another EOS id (a generation config's
    extra ones) with stop_reason that id; both are kept in token_ids and finish as 'stop'."""
    prompt, eos = [1, 2, 3], (EOS, 11)
    seed = _seed_where(lambda out: out[-1] == end, prompt, VOCAB, set(eos))
    engine = make_engine(eos=eos)
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=20, seed=seed), stream=False)
    out = run(engine)[request_id].outputs[0]
    assert out.token_ids == fake_continuation(prompt, 20, _seed32(seed, 0), VOCAB, set(eos)) and out.token_ids[-1] == end
    assert (out.finish_reason, out.stop_reason) == ("stop", reason)


def test_the_tokenizers_eos_is_the_one_without_a_stop_reason(tokenizer):
    """With a tokenizer, its eos_token (transformers' eos_token_id) is the model's EOS whatever the order of the
    checkpoint's EOS ids; the bundled checkpoint's generation config adds id 4."""
    assert tokenizer.eos_ids == (2, 4) and tokenizer.eos_id == 2
    assert make_engine(vocab=tokenizer.vocab_size, eos=(4, 2), tokenizer=tokenizer).eos_id == 2


@pytest.mark.parametrize("where", ["queued", "prefilling", "decoding"])
def test_abort_frees_everything(where):
    """Abort while queued, mid-prefill or mid-decode: the request ends with finish_reason 'abort', holds no
    page or slot, and the other request still produces its exact output."""
    engine = make_engine(max_slots=1, prefill_chunk=4, decode_steps=2)
    first = SamplingParams(max_tokens=12, seed=5, ignore_eos=True)
    other = engine.add_request(prompts(1, 6)[0], first, stream=False)
    victim = engine.add_request(prompts(1, 20, seed=1)[0], SamplingParams(max_tokens=20, seed=6, ignore_eos=True),
                                stream=False)
    state = {"queued": lambda s: s.status is Status.WAITING and not s.output_ids,
             "prefilling": lambda s: s is engine.scheduler.prefilling and s.num_computed > 0,
             "decoding": lambda s: s.decoding and len(s.output_ids) >= 2}[where]
    outs = {}
    for _ in range(MAX_STEPS):
        outs.update({o.request_id: o for o in engine.step()})
        seq = engine._requests[victim].seqs[0] if victim in engine._requests else None
        if seq is not None and state(seq):
            break
    else:
        pytest.fail(f"the request never reached the {where} state")
    engine.abort(victim)
    outs.update(run(engine))
    assert outs[victim].finished and outs[victim].outputs[0].finish_reason == "abort"
    assert outs[other].outputs[0].token_ids == expected(engine, prompts(1, 6)[0], first)
    assert engine.stats().finished_requests["abort"] == 1


# --- stop strings with a real tokenizer -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained("jaxinfer/assets/default")


def _pieces(tokenizer, prompt, tokens):
    """The text each generated token adds, as the engine's detokenizer streams it."""
    detok = IncrementalDetokenizer(tokenizer, prompt)
    return [detok.add(t) for t in tokens]


def _stop_case(tokenizer, seed=2):
    """A prompt, its free continuation and a stop string made of the last two characters of token k-1's text
    and the first two of token k's, found nowhere earlier."""
    prompt = tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=30, seed=seed, ignore_eos=True)
    tokens = fake_continuation(prompt, 30, _seed32(seed, 0), tokenizer.vocab_size)
    pieces = _pieces(tokenizer, prompt, tokens)
    text = "".join(pieces)
    for k in range(6, len(tokens) - 3):  # late enough for several dispatches
        a, b = pieces[k - 1], pieces[k]
        if len(a) >= 2 and len(b) >= 2 and (a + b).isascii():
            at = len("".join(pieces[:k])) - 2
            stop = text[at:at + 4]
            if text.find(stop) == at:
                return prompt, params, tokens, text, k, at, stop
    raise AssertionError("no token boundary to put a stop string on")


def test_an_id_reused_at_once_gets_none_of_the_old_requests_tokens(tokenizer):
    """A request ends on a stop token while its next step is already dispatched; its id, free again, names a
    new request at once. Reading that in-flight step must not hand the old sequence's tokens and text to the
    new request (it did: the new text began with the old one's)."""
    engine = make_engine(vocab=tokenizer.vocab_size, eos=(), tokenizer=tokenizer, decode_steps=1)
    prompt = tokenizer.encode("Once upon a time")
    old = fake_continuation(prompt, 20, _seed32(1, 0), tokenizer.vocab_size)
    first = engine.add_request(prompt, SamplingParams(max_tokens=20, seed=1, stop_token_ids=[old[3]]),
                               request_id="r")
    while not any(out.finished for out in engine.step()):
        pass
    assert list(first)[-1].outputs[0].finish_reason == "stop"
    assert engine.has_work()  # the surplus step is still to be read
    stream = engine.add_request(prompt, SamplingParams(max_tokens=6, seed=2), request_id="r")
    while engine.has_work():
        engine.step()
    engine.check_idle()
    new = fake_continuation(prompt, 6, _seed32(2, 0), tokenizer.vocab_size)
    streamed = [out.outputs[0] for out in stream]
    assert streamed[-1].token_ids == new
    assert streamed[-1].text == "".join(_pieces(tokenizer, prompt, new))
    assert all(new[:len(out.token_ids)] == out.token_ids and streamed[-1].text.startswith(out.text)
               for out in streamed)


@pytest.mark.parametrize("decode_steps, include", [(1, False), (1, True), (4, False)])
def test_stop_string_across_a_token_boundary(tokenizer, decode_steps, include):
    """The text is cut before the stop string (kept with include_stop_str_in_output), token ids end at the
    token that completed it, no streamed text ever shows what the final text leaves out, and tokens cut
    off after the stop string are not counted as generated."""
    prompt, params, tokens, text, k, at, stop = _stop_case(tokenizer)
    engine = make_engine(vocab=tokenizer.vocab_size, eos=tokenizer.eos_ids, tokenizer=tokenizer,
                         decode_steps=decode_steps)
    params = dataclasses.replace(params, stop=(stop, "never-in-this-text"), include_stop_str_in_output=include)
    stream = engine.add_request(prompt, params)
    while engine.has_work():
        engine.step()
    engine.check_idle()
    streamed = [out.outputs[0] for out in stream]
    final = streamed[-1]
    assert final.text == text[:at + 4 if include else at]
    assert final.token_ids == tokens[:k + 1]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert len(streamed) > 2
    assert all(final.text.startswith(out.text) for out in streamed)
    stats = engine.stats()
    assert stats.generation_tokens == len(final.token_ids)
    assert stats.histograms[ITL].count == len(streamed) - 1  # a gap per step that gave tokens, cut or not


def test_stop_string_in_the_last_dispatch_beats_length(tokenizer):
    """A stop string completed in the same multi-token dispatch as the max_tokens limit still ends the request
    as a stop (the string found first in the text decides the reason)."""
    prompt, params, tokens, text, k, at, stop = _stop_case(tokenizer)
    # Tokens 1..4, 5..8, ... arrive together with decode_steps=4; make the last one share k's dispatch.
    assert k % 4, "the stop string must complete inside a dispatch, not at its end"
    last = 4 * math.ceil(k / 4)
    engine = make_engine(vocab=tokenizer.vocab_size, eos=(), tokenizer=tokenizer, decode_steps=4)
    request_id = engine.add_request(prompt, dataclasses.replace(params, max_tokens=last + 1, stop=(stop,)),
                                    stream=False)
    out = run(engine)[request_id].outputs[0]
    assert out.text == text[:at] and out.token_ids == tokens[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_token_adds_no_text(tokenizer, include):
    """As in vLLM, the stop token (or EOS) that ends a sequence stays in its token ids but adds no text,
    unless include_stop_str_in_output."""
    prompt = tokenizer.encode("Once upon a time")
    tokens = fake_continuation(prompt, 20, _seed32(1, 0), tokenizer.vocab_size)
    pieces = _pieces(tokenizer, prompt, tokens)
    k = next(i for i in range(3, 20) if pieces[i].strip() and tokens[i] not in tokens[:i])
    engine = make_engine(vocab=tokenizer.vocab_size, eos=(), tokenizer=tokenizer)
    params = SamplingParams(max_tokens=20, seed=1, stop_token_ids=[tokens[k]], include_stop_str_in_output=include)
    out = run_one(engine, prompt, params)
    assert out.token_ids == tokens[:k + 1] and out.stop_reason == tokens[k]
    assert out.text == "".join(pieces[:k + 1 if include else k])


@pytest.mark.parametrize("extra", [0, 1])
def test_stop_strings_count_only_after_min_tokens(tokenizer, extra):
    """vLLM looks for stop strings once more than min_tokens tokens exist: a string completed by token
    number min_tokens does not stop the request; by the token after it, it does."""
    prompt, params, tokens, text, k, at, stop = _stop_case(tokenizer)  # token k (0-based) completes the string
    engine = make_engine(vocab=tokenizer.vocab_size, eos=(), tokenizer=tokenizer)
    out = run_one(engine, prompt, dataclasses.replace(params, stop=(stop,), min_tokens=k + extra))
    if extra:  # token k is token number min_tokens
        assert out.finish_reason == "length" and out.token_ids == tokens
    else:
        assert out.finish_reason == "stop" and out.text == text[:at] and out.token_ids == tokens[:k + 1]


def run_one(engine, prompt, params):
    request_id = engine.add_request(prompt, params, stream=False)
    out = run(engine)[request_id].outputs[0]
    engine.check_idle()
    return out


def test_prompt_logprobs_of_a_one_token_prompt_are_none():
    engine = make_engine()
    request_id = engine.add_request([7], SamplingParams(max_tokens=2, prompt_logprobs=1), stream=False)
    assert run(engine)[request_id].prompt_logprobs == [None]


# --- streams, threads, asyncio, counters ----------------------------------------------------------------

class SlowExecutor(FakeExecutor):
    """A fake device that takes 2 ms per step, so a caller can act while a request runs."""

    def dispatch(self, plan):
        time.sleep(0.002)
        return super().dispatch(plan)


def _check_stream(engine, prompt, params, outs):
    assert outs and outs[-1].finished and not any(o.finished for o in outs[:-1])
    final = outs[-1].outputs[0].token_ids
    assert final == expected(engine, prompt, params)
    assert all(final[:len(o.outputs[0].token_ids)] == o.outputs[0].token_ids for o in outs)


def test_streams_consumed_from_many_threads():
    """Eight threads each add a request to the running engine and iterate its stream: every stream yields
    growing outputs and ends with the exact continuation; afterwards the engine is idle."""
    engine = make_engine(max_slots=3, num_pages=24)
    engine.start()
    results, errors = {}, []

    def client(i):
        try:
            prompt, params = prompts(1, 5 + i, seed=i)[0], SamplingParams(max_tokens=10 + i, seed=i)
            results[i] = (prompt, params, list(engine.add_request(prompt, params)))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    engine.shutdown()
    assert not errors and len(results) == 8
    for prompt, params, outs in results.values():
        _check_stream(engine, prompt, params, outs)
    engine.check_idle()


def test_async_streams():
    """Streams created inside an event loop are consumed with `async for`, concurrently, to exact outputs."""
    engine = make_engine(max_slots=2)
    engine.start()
    cases = [(prompts(1, 4 + i, seed=i)[0], SamplingParams(max_tokens=9, seed=i)) for i in range(5)]

    async def consume(stream):
        return [out async for out in stream]

    async def main():
        streams = [engine.add_request(prompt, params) for prompt, params in cases]
        return await asyncio.gather(*(consume(s) for s in streams))

    try:
        results = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        engine.shutdown()
    for (prompt, params), outs in zip(cases, results):
        _check_stream(engine, prompt, params, outs)
    engine.check_idle()


def _within(seconds, work):
    """work() in a thread; its result, or a failure (not a hung test) if it takes longer than `seconds`."""
    result = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still waiting after {seconds}s"
    return result[0]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stream_read_before_the_loop_runs_starts_it(kind):
    """Reading a stream with no loop started and no step taken used to wait for ever; it now starts the loop.
    From then on step() belongs to the loop, and says so; a finished stream read again yields nothing."""
    engine = make_engine()
    prompt, params = [1, 2, 3], SamplingParams(max_tokens=7, seed=4)
    try:
        if kind == "sync":
            stream = engine.add_request(prompt, params)
            outs = _within(20, lambda: list(stream))
            assert _within(5, lambda: list(stream)) == []
        else:
            async def main():
                stream = engine.add_request(prompt, params)
                return [out async for out in stream], [out async for out in stream]
            outs, again = _within(20, lambda: asyncio.run(main()))
            assert again == []
        assert engine.running_in_background
        with pytest.raises(RuntimeError, match="background thread"):
            engine.step()
    finally:
        engine.shutdown()
    _check_stream(engine, prompt, params, outs)
    engine.check_idle()
    late = engine.add_request(prompt, params)  # after a shutdown a stream waits for an explicit start()
    assert late._before_wait() is None and not engine.running_in_background
    engine.start()
    _check_stream(engine, prompt, params, _within(20, lambda: list(late)))
    engine.shutdown()


@pytest.mark.parametrize("how", ["stream", "engine"])
def test_abort_mid_stream(how):
    """Aborting a streaming request (through its stream or by id) ends the stream with 'abort' after a
    prefix of the exact output; a queued request aborted by id ends with no tokens; nothing stays held."""
    engine = make_engine(max_slots=1, max_model_len=512, num_pages=140, decode_steps=1, executor=SlowExecutor)
    engine.start()
    try:
        prompt, params = [1, 2, 3], SamplingParams(max_tokens=400, seed=9, ignore_eos=True)
        stream = engine.add_request(prompt, params)
        queued = engine.add_request([4, 5], SamplingParams(max_tokens=5))
        outs = []
        for out in stream:
            outs.append(out)
            if len(outs) == 3:
                engine.abort(queued.request_id)
                if how == "stream":
                    stream.abort()
                else:
                    engine.abort(stream.request_id)
        queued_outs = list(queued)
    finally:
        engine.shutdown()
    final = outs[-1].outputs[0]
    assert final.finish_reason == "abort" and 3 <= len(final.token_ids) < 400
    assert final.token_ids == expected(engine, prompt, params)[:len(final.token_ids)]
    assert queued_outs[-1].outputs[0].finish_reason == "abort" and queued_outs[-1].outputs[0].token_ids == []
    engine.check_idle()
    assert engine.stats().finished_requests == {"abort": 2}


def test_dropping_a_stream_early_aborts_its_request():
    """A stream dropped unfinished (a consumer that broke out and let go of it) or a consumer task cancelled
    while it waits frees the request's slot and pages, as vLLM's generate() does; a stream still held may be
    read again after a break; abort() takes one id or several."""
    engine = make_engine(max_slots=2, max_model_len=512, num_pages=140, decode_steps=1, executor=SlowExecutor)
    engine.start()
    try:
        params = SamplingParams(max_tokens=400, seed=9, ignore_eos=True)
        stream = engine.add_request([1, 2, 3], params)
        for _ in zip(range(3), stream):
            pass
        assert len(list(zip(range(3), stream))) == 3  # held: still running
        stream = None  # dropped

        async def cancelled():
            held = engine.add_request([4, 5], params)
            task = asyncio.ensure_future(anext(aiter(held)))
            await asyncio.sleep(0)
            task.cancel()
            return held

        held = asyncio.run(cancelled())  # held, but its reader was cancelled
        others = [engine.add_request([6 + i], params) for i in range(2)]
        engine.abort([other.request_id for other in others])
        assert all(list(other)[-1].outputs[0].finish_reason == "abort" for other in others)
        with pytest.raises(TypeError, match="request ids are strings"):
            engine.abort([1])
        deadline = time.monotonic() + 10
        while engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.shutdown()
    engine.check_idle()
    assert engine.stats().finished_requests == {"abort": 4}


def test_latencies_are_split_as_vllm_splits_them():
    """One inter-token gap per step that gave a request tokens (a 4-round dispatch is one gap, not three of 0),
    time to first token observed as soon as it arrives, and at the finish vLLM's split of the request's life:
    queue + prefill + decode = end to end (up to the finish), decode = the gaps' sum, TPOT = decode over the
    tokens after the first."""
    engine = make_engine(decode_steps=4)
    stream = engine.add_request(prompts(1, 5)[0], SamplingParams(max_tokens=9, ignore_eos=True))
    while not engine.stats().histograms[TTFT].count:
        engine.step()
    assert engine.has_work() and engine.stats().histograms[E2E].count == 0  # observed live, before the finish
    while engine.has_work():
        engine.step()
    outs = list(stream)
    m = outs[-1].metrics
    assert [len(out.outputs[0].token_ids) for out in outs] == [1, 5, 9]  # the prefill's token, then 4 and 4
    stats = engine.stats()
    assert len(m.inter_token_latencies) == stats.histograms[ITL].count == 2
    assert sum(m.inter_token_latencies) == pytest.approx(m.decode_time)
    assert m.time_per_output_token == pytest.approx(m.decode_time / 8)
    assert m.inference_time == pytest.approx(m.prefill_time + m.decode_time)
    assert m.queue_time + m.inference_time <= m.e2e_latency and m.time_to_first_token == pytest.approx(
        m.queue_time + m.prefill_time)
    for spec in HISTOGRAMS:
        if spec.field is not None:
            hist = stats.histograms[spec.name]
            assert hist.count == 1 and hist.total == pytest.approx(getattr(m, spec.field)), spec.name
    assert (m.prompt_tokens, m.generation_tokens) == (5, 9)


def test_each_sample_counts_as_a_request_in_the_histograms():
    """As vLLM runs the n samples of a request as requests of their own, each sample is one observation of
    every per-request histogram and one finished request; a sample of one token has a TPOT of 0 (vLLM's), and
    the token-count histograms take 1-2-5 buckets up to the context length. A snapshot does not move."""
    engine = make_engine(max_model_len=64)
    engine.add_request(prompts(1, 6)[0], SamplingParams(n=3, max_tokens=5, seed=1, ignore_eos=True), stream=False)
    one = engine.add_request(prompts(1, 4, seed=1)[0], SamplingParams(max_tokens=1), stream=False)
    before = engine.stats()
    assert run(engine)[one].metrics.time_per_output_token == 0.0
    h = engine.stats().histograms
    assert engine.stats().finished_requests == {"length": 4}
    assert all(h[spec.name].count == 4 for spec in HISTOGRAMS if spec.name != ITL)  # TPOT too: a 0
    assert h["request_prompt_tokens"].buckets == (1, 2, 5, 10, 20, 50)
    assert h["request_prompt_tokens"].total == 3 * 6 + 4
    assert h["request_generation_tokens"].total == 3 * 5 + 1
    assert all(hist.count == 0 for hist in before.histograms.values())


def test_counters_and_histograms():
    """stats() while running and after: running/waiting counts, kv usage, prompt and generation tokens,
    prefix-cache queries and hits, preemptions and the latency histogram counts."""
    engine = make_engine(max_slots=2, page_size=4, num_pages=40, decode_steps=2)
    prefix = prompts(1, 8)[0]
    cases = [(prefix + [i + 1], SamplingParams(max_tokens=5 + i, seed=i, ignore_eos=True)) for i in range(3)]
    for prompt, params in cases:
        engine.add_request(prompt, params, stream=False)
    assert engine.stats().num_waiting == 0  # commands are drained by the engine loop
    engine.step()  # one admission per step: the others wait
    stats = engine.stats()
    assert stats.num_running == 1 and stats.num_waiting == 2 and stats.kv_usage > 0
    while engine.stats().num_running < 2:
        engine.step()
    assert engine.stats().num_waiting == 1
    finals = run(engine)
    stats = engine.stats()
    generated = [len(finals[f"req-{i}"].outputs[0].token_ids) for i in range(3)]
    assert generated == [5, 6, 7]
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_usage == 0
    assert stats.prompt_tokens == stats.prefix_cache_queries == 27
    assert stats.prefix_cache_hits == 16  # the second and third reuse the 8-token prefix's two pages
    assert stats.generation_tokens == sum(generated) and stats.preemptions == 0
    assert stats.finished_requests == {"length": 3}
    h = stats.histograms
    assert h[TTFT].count == h[E2E].count == h["request_queue_time_seconds"].count == 3
    gaps = [len(finals[f"req-{i}"].metrics.inter_token_latencies) for i in range(3)]
    assert h[ITL].count == sum(gaps) < sum(generated) - 3  # two-token dispatches: one gap each
    assert all(h[spec.name].count == 3 for spec in HISTOGRAMS if spec.name != ITL)
    assert h[TTFT].cumulative()[-1] == 3
    engine.add_request(prefix, SamplingParams(n=3, max_tokens=4, seed=5), stream=False)
    engine.step()  # as in vLLM, each of the n samples counts: one runs, two wait for a slot
    assert (engine.stats().num_running, engine.stats().num_waiting) == (1, 2)
    run(engine)


def test_shutdown_right_after_the_last_output_leaves_nothing_in_flight():
    """A request ending at EOS inside a multi-step dispatch has its next step (surplus tokens) in flight when
    its final output goes out; a shutdown() at exactly that moment still leaves the engine idle."""
    prompt = [4, 5, 6]
    seed = _seed_where(lambda out: len(out) == 3 and out[-1] == EOS, prompt, VOCAB, {EOS}, 20000)
    engine = make_engine(decode_steps=4)
    stream = engine.add_request(prompt, SamplingParams(max_tokens=20, seed=seed))
    put = stream.put

    def put_then_wait_for_shutdown(out):  # holds the engine thread at the final output until shutdown() begins
        put(out)
        deadline = time.monotonic() + 5
        while out.finished and not engine._stopping and time.monotonic() < deadline:
            time.sleep(0.001)

    stream.put = put_then_wait_for_shutdown
    engine.start()
    outs = list(stream)
    engine.shutdown()
    assert outs[-1].outputs[0].token_ids == expected(engine, prompt, SamplingParams(max_tokens=20, seed=seed))
    engine.check_idle()


class HeldExecutor(FakeExecutor):
    """A fake device whose dispatch waits for `release`: the engine thread stays inside one step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered, self.release = threading.Event(), threading.Event()

    def dispatch(self, plan):
        self.entered.set()
        self.release.wait(10)
        return super().dispatch(plan)


def test_a_reset_pending_at_shutdown_is_answered_at_once():
    """A reset queued while the loop is inside a step, then a shutdown: the loop answers the reset as it
    stops (here True: the held step finished the request), instead of leaving its caller to wait out the
    timeout. A reset asked during the shutdown is refused, and one after it runs on the caller's thread."""
    engine = make_engine(executor=HeldExecutor, decode_steps=8)
    stream = engine.add_request([4, 5, 6], SamplingParams(max_tokens=1, seed=3, ignore_eos=True))
    engine.start()
    assert engine.executor.entered.wait(10)
    answers = []
    asking = threading.Thread(target=lambda: answers.append(engine.reset_prefix_cache(timeout=20)))
    asking.start()
    while engine._commands.empty():  # the reset is queued behind the held step
        time.sleep(0.001)
    stopping = threading.Thread(target=engine.shutdown)
    stopping.start()
    while not engine._stopping:
        time.sleep(0.001)
    assert engine.reset_prefix_cache(timeout=20) is False
    started = time.monotonic()
    engine.executor.release.set()
    stopping.join(10)
    asking.join(10)
    assert answers == [True] and time.monotonic() - started < 5
    assert list(stream)[-1].finished
    assert engine.reset_prefix_cache() is True
    engine.check_idle()


def test_a_shutdown_that_times_out_still_stops_the_loop_after_its_step(caplog):
    """shutdown(timeout) returning while the loop is inside a step must not leave the loop running: it ends
    after that step, and a second shutdown() waits for it."""
    engine = make_engine(executor=HeldExecutor)
    stream = engine.add_request([4, 5, 6], SamplingParams(max_tokens=1, seed=3, ignore_eos=True))
    engine.start()
    assert engine.executor.entered.wait(10)
    thread = engine._thread
    engine.shutdown(timeout=0.05)
    assert "still in a step" in caplog.text and thread.is_alive()
    assert engine.reset_prefix_cache() is False  # still stopping: refused, not run beside the loop
    engine.executor.release.set()
    thread.join(10)
    assert not thread.is_alive()
    engine.shutdown()
    assert not engine.running_in_background and engine.reset_prefix_cache() is True
    assert list(stream)[-1].finished
    engine.check_idle()


class BrokenExecutor(FakeExecutor):
    def dispatch(self, plan):
        if len(self.dispatched) == 3:
            raise RuntimeError("device lost")
        return super().dispatch(plan)


def test_a_failed_step_fails_every_stream():
    """If a step raises, every open stream raises EngineError naming the cause, the pages are released, and
    later requests are refused instead of hanging."""
    engine = make_engine(executor=BrokenExecutor)
    streams = [engine.add_request(p, SamplingParams(max_tokens=20, seed=1, ignore_eos=True)) for p in prompts(3, 6)]
    engine.start()
    for stream in streams:
        with pytest.raises(EngineError, match="RuntimeError: device lost"):
            list(stream)
    engine.shutdown()
    engine.check_idle()
    with pytest.raises(EngineError, match="stopped after an error"):
        engine.add_request([1, 2])


def test_a_step_that_raises_in_the_callers_thread_fails_the_engine():
    """Stepping by hand (as LLM.generate does): the step's error reaches the caller, every request is over
    and its pages are back, and later calls raise EngineError instead of looping on a half-updated state."""
    engine = make_engine(executor=BrokenExecutor)
    for prompt in prompts(3, 6):
        engine.add_request(prompt, SamplingParams(max_tokens=20, seed=1, ignore_eos=True), stream=False)
    with pytest.raises(RuntimeError, match="device lost"):
        while engine.has_work():
            engine.step()
    engine.check_idle()
    with pytest.raises(EngineError, match="stopped after an error"):
        engine.step()
    with pytest.raises(EngineError, match="stopped after an error"):
        engine.add_request([1, 2])


class HeldBrokenExecutor(HeldExecutor):
    def dispatch(self, plan):
        if len(self.dispatched) < 2:
            return FakeExecutor.dispatch(self, plan)
        super().dispatch(plan)  # held until released
        raise RuntimeError("device lost")


def test_a_request_queued_while_a_step_fails_gets_the_error_too():
    """A request added while the failing step runs never reaches the scheduler: its stream still raises
    EngineError (it used to hang, the loop dying on it), and the pages of the running one are released."""
    engine = make_engine(executor=HeldBrokenExecutor)
    running = engine.add_request(prompts(1, 6)[0], SamplingParams(max_tokens=20, seed=1, ignore_eos=True))
    engine.start()
    assert engine.executor.entered.wait(10)
    queued = engine.add_request(prompts(1, 6, seed=3)[0], SamplingParams(max_tokens=20, seed=2, ignore_eos=True))
    engine.executor.release.set()
    errors = {}

    def read(name, stream):
        try:
            list(stream)
        except EngineError as error:
            errors[name] = str(error)

    readers = [threading.Thread(target=read, args=item, daemon=True) for item in
               (("running", running), ("queued", queued))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(10)  # not forever: the queued stream used to hang
    assert sorted(errors) == ["queued", "running"]
    assert all("RuntimeError: device lost" in error for error in errors.values())
    engine.shutdown()
    engine.check_idle()
