"""The engine on the real model (the embedded default checkpoint, float32 on CPU).

One runner serves every test: engines of other pool sizes or cache settings
share its device state (a smaller `num_pages` only uses the low pages of the
pool), so the compiled steps are reused and the tests stay fast. Because they
share the pages, only short-lived engines (used within one test) may keep a
prefix cache: the module's own engine runs without one.
"""

import asyncio
import collections
import dataclasses
import json
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.metrics import ITL, TTFT
from jaxinfer.engine.structured import StructuredOutputsParams
from jaxinfer.llm import LLM, RequestOutputKind, SamplingParams
import jaxinfer.runner as runner_module
from jaxinfer.runner import step_fields
from jaxinfer.sampling import Passes

GREEDY = dict(temperature=0.0, ignore_eos=True)
ATOL = 1e-3  # logprobs from the step vs a separate scoring pass: the trained model's peaked logits differ by ~3e-4


@pytest.fixture(scope="module")
def llm():
    return LLM(engine=EngineConfig(max_slots=6, page_size=16, prefill_chunk=64, min_prefill_bucket=64,
                                   max_model_len=384, decode_steps=4, num_pages=200,
                                   enable_prefix_caching=False, max_prefill_seqs=4, decode_buckets=(2, 6)))


def engine_like(llm, **changes) -> Engine:
    cfg = dataclasses.replace(llm.engine_config, **changes)
    return Engine(cfg, llm.engine.executor, llm.model_config.vocab_size, llm.tokenizer, llm.engine.eos_ids)


def run(engine: Engine, requests, arrivals=None) -> list:
    """Add request i at step arrivals[i] (all at once by default) and step until every one finishes."""
    arrivals = arrivals or [0] * len(requests)
    pending = sorted((step, i) for i, step in enumerate(arrivals))
    ids, outs, step = {}, {}, 0
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            i = pending.pop(0)[1]
            ids[engine.add_request(*requests[i], stream=False)] = i
        for out in engine.step():
            if out.finished:
                outs[ids[out.request_id]] = out
        step += 1
        assert step < 20_000, "the engine stopped making progress"
    return [outs[i] for i in range(len(requests))]


def alone(llm, prompt, params) -> list[int]:
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def _workload(seed: int, count: int, longest: int):
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        prompt = rng.integers(5, 4000, int(rng.integers(1, longest + 1))).tolist()
        if i % 4 == 3:  # a quarter sample, seeded: their draws must not depend on the batch either
            params = SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=0.8, seed=i, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=int(rng.integers(1, 20)), **GREEDY)
        requests.append((prompt, params))
    return requests, rng.integers(0, 60, count).tolist()


def test_outputs_do_not_depend_on_the_batch(llm, monkeypatch):
    """64 requests (1 to 300 prompt tokens) arriving at random steps give each exactly what it gets alone,
    though their prompts were cut into chunks and packed with others' as the traffic fell, and their decode
    steps ran at 6 rows or (alone, and as the batch emptied) at 2."""
    requests, arrivals = _workload(0, 64, 300)
    packed, dispatch = [], llm.engine.executor.dispatch
    monkeypatch.setattr(llm.engine.executor, "dispatch", lambda plan: packed.append(len(plan.prefills)) or dispatch(plan))
    together = run(llm.engine, requests, arrivals)
    monkeypatch.undo()
    assert max(packed) == 4 and packed.count(2) + packed.count(3) > 0, "no step packed several prompts"
    for (prompt, params), out in zip(requests, together):
        assert out.outputs[0].token_ids == alone(llm, prompt, params), f"prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"
    llm.engine.check_idle()
    compiled = llm.runner.layouts
    assert {layout.shape("positions")[0] for layout in compiled if not layout.shape("prefill_tokens")} == {2, 6}


def test_static_control_flow_gives_the_dynamic_outputs(llm):
    """The GPU's static control flow (rounds and sampler passes compiled per step, no on-device branching):
    warm-up compiles the chunk-only step and greedy and plain random sampling for each shape; then every
    request, batched at random steps with requests that switch the sampler's passes on and off, gets exactly
    what the dynamic engine gives it alone: greedy and seeded tokens and their logprobs."""
    static = LLM(engine=dataclasses.replace(llm.engine_config, control_flow="static", max_model_len=64),
                 warmup=True)  # one page width, the module engine's narrowest
    runner = static.engine.executor.runner
    assert runner.num_compiles == 7  # decode at 2 and 6 rows: greedy, random; chunk: no rounds, greedy, random
    rng = np.random.default_rng(7)
    kinds = [GREEDY, dict(temperature=1.0),
             dict(temperature=0.8, top_p=0.9, logprobs=2, repetition_penalty=1.3, prompt_logprobs=1),
             dict(temperature=0.0, logit_bias={7: 5.0, 300: 3.0}, allowed_token_ids=list(range(0, 4000, 7)),
                  bad_words=["of the", "LORD"]),
             dict(temperature=1.0, structured_outputs=StructuredOutputsParams(regex="[a-z]+( [a-z]+)*"))]
    requests = [(rng.integers(5, 4000, int(rng.integers(1, 50))).tolist(),
                 SamplingParams(max_tokens=int(rng.integers(1, 9)), seed=i,
                                **{"ignore_eos": True, **kinds[i % len(kinds)]}))
                for i in range(15)]
    outs = run(static.engine, requests, rng.integers(0, 8, len(requests)).tolist())
    outs += run(static.engine, requests[3:4])  # logit edits alone: the penalties pass, no draw
    for (prompt, params), out in zip(requests + requests[3:4], outs):
        expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.outputs[0].token_ids == expected.token_ids, f"{params}"
        assert out.outputs[0].logprobs == expected.logprobs
    assert {layout.passes for layout in runner.layouts} == {  # finished requests' rows leave no pass on
        Passes(), Passes(draw=True), Passes(penalties=True), Passes(True, True, True, True)}
    assert any(layout.shape("next_tokens") is not None for layout in runner.layouts)  # prompt logprobs
    rest = set(runner._shapes(Passes.every(), scored=(False, True)))  # what warmup_rest() compiles
    assert len(rest) == 2 * 12 + 2 * 13  # 2 decode buckets x 12 samplers; a chunk, with prompt logprobs or not,
    # x (no rounds + 12 samplers)
    # A grammar's steps (every row, one round): warmup_rest() compiles them for greedy and plain random sampling
    # (2 x 2 shapes); beside requests with other passes they compile at first use.
    assert len(set(runner._shapes([Passes(), Passes(draw=True)], (False,), masked=True))) == 2 * 2
    masked = {layout for layout in runner.layouts if layout.shape("token_mask") is not None}
    assert masked and masked <= set(runner._shapes(Passes.every(), (False,), masked=True))
    assert runner.layouts - masked <= rest
    for layout in runner.layouts | llm.engine.executor.runner.layouts:  # as other processes rebuild them
        assert runner.layout_from(step_fields(layout)) == layout
    static.engine.check_idle()


def _device_branching(executable) -> tuple[int, int]:
    """(conditionals, while loops whose trip count XLA does not know) in a compiled step's HLO."""
    lines = executable.as_text().splitlines()
    whiles = [line for line in lines if " while(" in line]
    return sum(" conditional(" in line for line in lines), sum("known_trip_count" not in w for w in whiles)


def test_static_control_flow_compiles_no_device_branching(llm):
    """Why static control flow exists: XLA:GPU makes the host wait for the device at every `conditional` and
    every iteration of a `while` whose trip count it does not know. Statically compiled steps, every sampler
    pass and prompt logprobs on, have neither (jnp attention here: on a GPU the attention loops are inside the
    Pallas kernels); the dynamic steps have both, so the check can fail."""
    every = Passes(penalties=True, draw=True, filter=True, logprobs=True)
    for control_flow in ("static", "dynamic"):
        engine = dataclasses.replace(llm.engine_config, control_flow=control_flow, attention_backend="reference",
                                     max_model_len=32, decode_buckets=None)
        runner = LLM(engine=engine, warmup=False).engine.executor.runner
        layouts = list(runner._shapes([every], scored=(True,)))
        assert len(layouts) == (3 if control_flow == "static" else 2)  # decode; chunk (+ its no-rounds step)
        found = [_device_branching(runner._executable(layout)) for layout in layouts]
        if control_flow == "static":
            assert found == [(0, 0)] * len(layouts)
        else:
            assert all(conditionals > 0 and unknown > 0 for conditionals, unknown in found), found


def test_a_shape_compiles_once_whichever_threads_ask(llm, monkeypatch):
    """warmup_rest() in a background thread and the engine loop may want the same shape at once: it compiles
    once, and the other callers wait for that compile."""
    runner, compiled = llm.engine.executor.runner, []
    executable = type("Executable", (), {})()  # a stand-in the shared caches can hold (and weakly)

    def slow_compile(layout):
        compiled.append(layout)
        time.sleep(0.3)
        return executable

    monkeypatch.setattr(runner_module, "_EXECUTABLES", collections.OrderedDict(runner_module._EXECUTABLES))
    monkeypatch.setattr(runner_module, "_LIVE", weakref.WeakValueDictionary(runner_module._LIVE))
    monkeypatch.setattr(runner, "_executables", dict(runner._executables))
    monkeypatch.setattr(runner, "_compile", slow_compile)
    layout = runner_module.Layout((("a shape nobody compiled", (1,), "int32"),))
    got = []
    threads = [threading.Thread(target=lambda: got.append(runner._executable(layout))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == [executable] * 3 and compiled == [layout]


def test_preemption_keeps_outputs(llm):
    """A pool far too small for the load (19 pages for 6 slots whose sequences grow to 4-7 pages each):
    requests are preempted and recomputed, and every one still gets its own greedy output, logit edits included
    (bad words too, whose prefixes a resumption reloads)."""
    small = engine_like(llm, num_pages=20)
    rng = np.random.default_rng(1)
    edits = [{}, dict(logit_bias={int(t): 4.0 for t in rng.integers(5, 4000, 300)}),
             dict(allowed_token_ids=rng.integers(5, 4000, 200).tolist()),  # reloaded into the slot of a resumption
             dict(bad_words=["the midst", "of the", "the earth"])]
    requests = [(rng.integers(5, 4000, int(rng.integers(10, 40))).tolist(),
                 SamplingParams(max_tokens=int(rng.integers(40, 70)), **GREEDY, **edits[i % 4])) for i in range(10)]
    outs = run(small, requests)
    assert small.stats().preemptions > 0
    for (prompt, params), out in zip(requests, outs):
        assert out.outputs[0].token_ids == alone(llm, prompt, params)
    small.check_idle()


def test_a_resumed_sequence_still_matches_bad_words_across_its_preemption(llm):
    """A bad word's prefix generated before a preemption still bans its last token after the resumption: the
    slot's recent tokens are reloaded from the output so far. Preempted whenever the tokens it will have at
    its resumption (those read and those in flight, which still arrive) end in "the"."""
    engine = engine_like(llm, decode_steps=1)
    the, = llm.tokenizer.encode("the", add_special_tokens=False)
    prompt = llm.tokenizer.encode("In the beginning")
    params = SamplingParams(max_tokens=24, bad_words=["the midst", "the earth"], **GREEDY)
    expected = alone(llm, prompt, params)
    assert expected.count(the) >= 2
    request_id = engine.add_request(prompt, params, stream=False)
    engine.step()  # queued, admitted, its prompt dispatched
    seq, preempted_at, out = engine._requests[request_id].seqs[0], set(), None
    while out is None:
        outs = engine.step()
        out = outs[0] if outs and outs[0].finished else None
        known = len(seq.output_ids) + seq.pending
        if out is None and seq.slot is not None and expected[known - 1] == the and known not in preempted_at:
            preempted_at.add(known)
            engine.scheduler._preempt(seq)
    assert len(preempted_at) >= 2 and engine.stats().preemptions == len(preempted_at)
    assert out.outputs[0].token_ids == expected
    engine.check_idle()


def test_prefix_cache_serves_a_repeated_prefix(llm):
    """A second request sharing 128 prompt tokens with the first computes only the rest; same output."""
    rng = np.random.default_rng(2)
    shared = rng.integers(5, 4000, 128).tolist()
    first, second = shared + [11, 12, 13], shared + rng.integers(5, 4000, 40).tolist()
    params = SamplingParams(max_tokens=8, **GREEDY)
    cached, uncached = engine_like(llm, enable_prefix_caching=True), engine_like(llm)
    outs = {}
    for name, engine in (("cached", cached), ("uncached", uncached)):
        run(engine, [(first, params)])
        before = engine.stats().prefill_tokens_computed
        outs[name] = run(engine, [(second, params)])[0]
        outs[name + " computed"] = engine.stats().prefill_tokens_computed - before
        engine.check_idle()
    assert outs["cached"].num_cached_tokens == 128 and outs["uncached"].num_cached_tokens == 0
    assert outs["cached computed"] == len(second) - 128 and outs["uncached computed"] == len(second)
    assert cached.stats().prefix_cache_hits == 128 and cached.stats().prefix_cache_queries == len(first) + len(second)
    assert outs["cached"].outputs[0].token_ids == outs["uncached"].outputs[0].token_ids


def test_a_cache_salt_shares_cached_pages_only_with_its_own(llm):
    """vLLM's cache_salt: a prompt's cached pages serve only requests of the same salt (or, without one, only
    unsalted requests); outputs are the same either way."""
    rng = np.random.default_rng(3)
    shared = rng.integers(5, 4000, 96).tolist()
    params = SamplingParams(max_tokens=6, **GREEDY)
    engine = engine_like(llm, enable_prefix_caching=True)
    outs = []
    for salt in (None, "tenant-a", "tenant-b", "tenant-a", None):
        prompt = {"prompt_token_ids": shared + rng.integers(5, 4000, 5).tolist()}
        outs.append(run(engine, [(prompt if salt is None else {**prompt, "cache_salt": salt}, params)])[0])
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0, 96, 96]
    assert all(o.outputs[0].token_ids == alone(llm, o.prompt_token_ids, params) for o in outs)
    for bad in ("", 5):
        with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
            engine.add_request({"prompt_token_ids": shared, "cache_salt": bad}, params)
    engine.check_idle()


def test_reset_prefix_cache_after_steps_from_outside_the_engine(llm):
    """Steps dispatched on the runner by hand (the benchmark's bare steps) overwrite the KV of cached pages;
    after `reset_prefix_cache` a repeated prompt computes again and gives its first output. While a request
    is in the engine the reset refuses and changes nothing."""
    from jaxinfer.bench import decode_plan
    engine = engine_like(llm, enable_prefix_caching=True)
    prompt = np.random.default_rng(4).integers(5, 4000, 100).tolist()
    params = SamplingParams(max_tokens=8, **GREEDY)
    first = run(engine, [(prompt, params)])[0]
    np.asarray(engine.executor.runner.dispatch(decode_plan(engine.cfg, 6, 150, 4)))  # writes into pages 1..60
    queued = engine.add_request(prompt, params, stream=False)
    assert engine.reset_prefix_cache() is False
    engine.abort(queued)
    engine.step()
    assert engine.reset_prefix_cache() is True
    hits = engine.stats().prefix_cache_hits
    again = run(engine, [(prompt, params)])[0]
    assert engine.stats().prefix_cache_hits == hits and again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    engine.check_idle()


def test_reset_prefix_cache_while_the_loop_runs_in_its_thread(llm):
    """With the loop in its background thread, a reset from another thread is done by the loop after its
    step: refused while a request streams, done once the engine is idle (then nothing is served from cache)."""
    engine = engine_like(llm, enable_prefix_caching=True)
    prompt = np.random.default_rng(5).integers(5, 4000, 100).tolist()
    params = SamplingParams(max_tokens=40, **GREEDY)

    def generate():
        return list(engine.add_request(prompt, params))[-1]

    engine.start()
    try:
        stream = engine.add_request(prompt, params)
        next(iter(stream))  # the first token is out; 39 to go, at most 4 a step
        assert engine.reset_prefix_cache() is False
        first = list(stream)[-1]
        assert generate().num_cached_tokens == 96  # six full pages of the prompt
        assert engine.reset_prefix_cache() is True
        again = generate()
    finally:
        engine.shutdown()
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    engine.check_idle()


def test_aborts_anywhere_leak_nothing(llm):
    """Aborting requests while queued, mid-prefill and mid-decode frees every page and slot."""
    engine = engine_like(llm, max_slots=6)
    rng = np.random.default_rng(3)
    long_prompt = rng.integers(5, 4000, 300).tolist()  # five chunks of prefill
    ids = [engine.add_request(long_prompt, SamplingParams(max_tokens=50, **GREEDY), stream=False)]
    ids += [engine.add_request(rng.integers(5, 4000, 20).tolist(), SamplingParams(max_tokens=60, **GREEDY),
                               stream=False) for _ in range(9)]
    finished = {}
    for step in range(12):
        for out in engine.step():
            finished[out.request_id] = out
        if step == 1:
            engine.abort(ids[0])  # mid-prefill
            engine.abort(ids[9])  # still queued: only 6 slots
        if step == 8:
            engine.abort(ids[1])  # decoding
    for i in (0, 1, 9):
        assert finished[ids[i]].outputs[0].finish_reason == "abort"
    for i in ids[2:9]:
        engine.abort(i)
    while engine.has_work():
        engine.step()
    engine.check_idle()


def test_top_k_one_and_tiny_top_p_equal_greedy(llm):
    prompt = list(range(100, 140))
    greedy = alone(llm, prompt, SamplingParams(max_tokens=10, **GREEDY))
    for params in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True, **params)
        assert alone(llm, prompt, sampled) == greedy, params


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm):
    """vLLM's left truncation: the request runs as its last k tokens alone would; -1 keeps up to the context."""
    prompt = list(range(100, 140))
    params = dict(max_tokens=6, **GREEDY)
    cut = llm.generate([prompt], SamplingParams(truncate_prompt_tokens=9, **params), use_tqdm=False)[0]
    assert cut.prompt_token_ids == prompt[-9:]
    assert cut.outputs[0].token_ids == alone(llm, prompt[-9:], SamplingParams(**params))
    whole = llm.generate([prompt], SamplingParams(truncate_prompt_tokens=-1, **params), use_tqdm=False)[0]
    assert whole.prompt_token_ids == prompt
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens \(385\) is greater than the maximum context length"):
        llm.generate([prompt], SamplingParams(truncate_prompt_tokens=385, **params), use_tqdm=False)
    with pytest.raises(ValueError, match="the prompt has 384 tokens"):  # -1 with a prompt over the context
        llm.generate([list(range(500))], SamplingParams(truncate_prompt_tokens=-1, **params), use_tqdm=False)


def test_a_truncated_prompts_text_is_its_kept_tokens_text(llm):
    """A cut prompt reports the text of the tokens it kept, special tokens included, as an uncut prompt's text
    keeps them (a chat template's markers, an EOS inside the prompt): the text still encodes to the ids."""
    text = "Once upon a time</s><s> there was"
    params = SamplingParams(max_tokens=1, truncate_prompt_tokens=5, **GREEDY)
    out = llm.generate([text], params, use_tqdm=False)[0]
    assert out.prompt == "time</s><s> there was"
    assert llm.tokenizer.encode(out.prompt, add_special_tokens=False) == out.prompt_token_ids


def test_penalties_change_greedy_output(llm):
    """The embedded model repeats itself under greedy decoding; a repetition penalty breaks the loop."""
    prompt = list(range(200, 230))
    plain = alone(llm, prompt, SamplingParams(max_tokens=24, **GREEDY))
    for penalty in (dict(repetition_penalty=1.8), dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        penalised = alone(llm, prompt, SamplingParams(max_tokens=24, **GREEDY, **penalty))
        assert penalised != plain, penalty
        assert len(set(penalised)) >= len(set(plain)), penalty


def test_min_tokens_holds_back_eos(llm):
    """With the first greedy token made an EOS (as a stop token id), min_tokens forces it away."""
    prompt = list(range(300, 320))
    first = alone(llm, prompt, SamplingParams(max_tokens=1, **GREEDY))[0]
    stopped = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first
    held = llm.generate([prompt], SamplingParams(max_tokens=8, min_tokens=4, temperature=0.0,
                                                 stop_token_ids=[first]), use_tqdm=False)[0].outputs[0]
    assert first not in held.token_ids[:4] and len(held.token_ids) >= 4


def test_logprobs_agree_with_the_model_logits(llm):
    """Sampled-token and prompt logprobs are log-softmax of the model's logits (scored separately)."""
    prompt = list(range(1000, 1040))
    out = llm.generate([prompt], SamplingParams(max_tokens=6, logprobs=5, prompt_logprobs=3, **GREEDY),
                       use_tqdm=False)[0]
    tokens = prompt + out.outputs[0].token_ids
    pages = llm.engine.scheduler.pages.allocate(4)
    table = np.zeros(llm.engine_config.pages_per_seq, np.int32)
    table[:4] = pages
    logits = llm.runner.score(np.asarray(tokens[:-1], np.int32), 0, table)
    llm.engine.scheduler.pages.free(pages)
    expected = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):  # vLLM's {token id: Logprob}: the top 3 in rank order, then the token
        entry, top = out.prompt_logprobs[j], np.argsort(-expected[j - 1])[:3].tolist()
        assert list(entry)[:3] == top and set(entry) == set(top) | {prompt[j]}
        assert [entry[t].rank for t in top] == [1, 2, 3]
        np.testing.assert_allclose(entry[prompt[j]].logprob, expected[j - 1, prompt[j]], atol=ATOL)
        assert entry[prompt[j]].rank == 1 + int((expected[j - 1] > expected[j - 1, prompt[j]]).sum())
        assert entry[prompt[j]].decoded_token == llm.tokenizer.token_text(prompt[j])
    for i, entry in enumerate(out.outputs[0].logprobs):
        row = expected[len(prompt) - 1 + i]
        token = out.outputs[0].token_ids[i]
        assert list(entry)[0] == token and len(entry) == 5 and entry[token].rank == 1
        np.testing.assert_allclose(entry[token].logprob, row[token], atol=ATOL)
        np.testing.assert_allclose([lp.logprob for lp in entry.values()], np.sort(row)[::-1][:5], atol=ATOL)
    chosen = [entry[t].logprob for t, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs)]
    np.testing.assert_allclose(out.outputs[0].cumulative_logprob, sum(chosen))
    llm.engine.check_idle()


def test_prompt_logprobs_of_a_prompt_packed_behind_another(llm):
    """A prompt whose chunk sits behind another prompt's in a packed step reads its own rows of the
    chunk's prompt logprobs: the same as when it runs alone."""
    scored = SamplingParams(max_tokens=2, prompt_logprobs=2, **GREEDY)
    first, second = list(range(200, 210)), list(range(300, 330))
    together = llm.generate([first, second], [SamplingParams(max_tokens=2, **GREEDY), scored], use_tqdm=False)
    alone_out = llm.generate([second], scored, use_tqdm=False)[0]
    assert together[0].prompt_logprobs is None
    for mine, theirs in zip(together[1].prompt_logprobs[1:], alone_out.prompt_logprobs[1:]):
        assert list(mine) == list(theirs) and [m.rank for m in mine.values()] == [t.rank for t in theirs.values()]
        np.testing.assert_allclose([m.logprob for m in mine.values()], [t.logprob for t in theirs.values()], atol=1e-5)
    assert together[1].outputs[0].token_ids == alone_out.outputs[0].token_ids


def test_a_prompt_packed_behind_another_reads_the_prefix_it_writes_in_the_same_step(llm):
    """Two prompts with a 2-page common prefix, packed into one step: the second is admitted after the first's
    chunk has named those pages, hits them, and reads KV that the same step writes. Its tokens are those it
    gets alone with no cache."""
    tok = llm.tokenizer
    prefix = tok.encode("Once upon a time there was a little girl who lived in a village near the forest. " * 3)[:32]
    prompts = [prefix + tok.encode(text, add_special_tokens=False) for text in (" The king said", " One day, a dragon")]
    params = SamplingParams(max_tokens=6, **GREEDY)
    engine = engine_like(llm, enable_prefix_caching=True)
    together = run(engine, [(p, params) for p in prompts])
    assert engine.stats().prefix_cache_hits == 32 and engine.stats().steps == 3  # one prefill step, both prompts
    cold = engine_like(llm)
    singles = [run(cold, [(p, params)])[0].outputs[0].token_ids for p in prompts]
    assert [o.outputs[0].token_ids for o in together] == singles and singles[0] != singles[1]
    engine.check_idle()


def test_n_samples_share_the_prompt_pages(llm):
    engine = engine_like(llm, enable_prefix_caching=True)
    prompt = list(range(500, 580))  # 5 full pages
    out = run(engine, [(prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))])[0]
    samples = [c.token_ids for c in out.outputs]
    assert len(samples) == 3 and len({tuple(s) for s in samples}) == 3
    assert engine.stats().prefix_cache_hits == 2 * 64  # each sibling reuses the first one's 4 full pages
    again = run(engine, [(prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))])[0]
    assert [c.token_ids for c in again.outputs] == samples
    engine.check_idle()


def test_stop_string_on_the_real_tokenizer(llm):
    full = llm.generate("Once upon a time", SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop = full.text[5:9]
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=12, stop=[stop], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:full.text.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop


def test_streams_from_threads_and_event_loops(llm):
    """The background loop serves a blocking stream and async streams; the last item equals generate()."""
    params = SamplingParams(max_tokens=10, **GREEDY)
    expected = llm.generate(["Hello", "The sea"], params, use_tqdm=False)
    engine = llm.engine
    engine.start()
    try:
        texts = [out.outputs[0].text for out in engine.add_request("Hello", params)]
        assert texts[-1] == expected[0].outputs[0].text and len(texts) > 1

        async def consume():
            streams = [engine.add_request(p, params) for p in ("Hello", "The sea")]
            return [[out async for out in s] for s in streams]

        results = asyncio.run(consume())
        assert [r[-1].outputs[0].token_ids for r in results] == [e.outputs[0].token_ids for e in expected]
        stream = engine.add_request("Hello", SamplingParams(max_tokens=200, **GREEDY))
        for i, out in enumerate(stream):
            if i == 1:
                stream.abort()
        assert out.finished and out.outputs[0].finish_reason == "abort"
    finally:
        engine.shutdown()
    engine.check_idle()
    stats = engine.stats()
    h = stats.histograms
    assert h[TTFT].count >= 4 and h["e2e_request_latency_seconds"].count >= 4 and h[ITL].count > 0


def test_output_kinds_stream_whole_outputs_deltas_or_the_final_one(llm):
    """vLLM's RequestOutputKind on one request three ways (n=2 seeded samples with logprobs, prompt logprobs and
    a stop string that holds text back): DELTA's pieces add up to CUMULATIVE's last output (text, token ids,
    logprobs; the prompt logprobs come once, in the first piece); FINAL_ONLY yields that last output alone."""
    engine = engine_like(llm, decode_steps=2)
    base = SamplingParams(n=2, max_tokens=16, temperature=0.8, seed=1, logprobs=2, prompt_logprobs=1,
                          stop=[" the s", " in the"], ignore_eos=True)
    streams = {kind: engine.add_request("Once upon a time", dataclasses.replace(base, output_kind=kind))
               for kind in RequestOutputKind}
    while engine.has_work():
        engine.step()
    got = {kind: list(stream) for kind, stream in streams.items()}
    last = got[RequestOutputKind.CUMULATIVE][-1]
    assert last.finished and len(got[RequestOutputKind.CUMULATIVE]) > 3
    final, = got[RequestOutputKind.FINAL_ONLY]
    assert final.finished and final.outputs == last.outputs and final.prompt_logprobs == last.prompt_logprobs
    pieces = got[RequestOutputKind.DELTA]
    assert len(pieces) > 3 and pieces[-1].finished and not any(p.finished for p in pieces[:-1])
    assert pieces[0].prompt_logprobs == last.prompt_logprobs and all(p.prompt_logprobs is None for p in pieces[1:])
    for whole in last.outputs:
        mine = [c for p in pieces for c in p.outputs if c.index == whole.index]
        assert "".join(c.text for c in mine) == whole.text
        assert sum((c.token_ids for c in mine), []) == whole.token_ids
        assert sum((c.logprobs for c in mine), []) == whole.logprobs
        assert mine[-1].finish_reason == whole.finish_reason and not any(c.finish_reason for c in mine[:-1])
        assert all(c.token_ids or c.text or c.finish_reason for c in mine)
    assert [o.finish_reason for o in last.outputs] == ["stop", "stop"]  # the stop strings held text back
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind=1)
    engine.check_idle()


def test_cpu_decode_buckets_keep_a_rows_bits():
    """What the CPU's default decode buckets rest on (`default_decode_buckets`): XLA:CPU's dot gives a row
    the same bits at every row count from 2 to CPU_SAME_BITS_ROWS, at one row it may not. If an XLA update
    breaks the first, the default buckets must change with it."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.config import CPU_SAME_BITS_ROWS, MIN_DECODE_BUCKET, default_decode_buckets
    rng = np.random.default_rng(0)
    dot = jax.jit(lambda a, w: a @ w)
    rows = rng.standard_normal((CPU_SAME_BITS_ROWS, 576)).astype(np.float32)
    for out in (192, 1536, 4096):
        w = jnp.asarray(rng.standard_normal((576, out)).astype(np.float32))
        full = np.asarray(dot(rows, w))
        for R in range(2, CPU_SAME_BITS_ROWS):
            np.testing.assert_array_equal(np.asarray(dot(rows[:R], w)), full[:R], err_msg=f"{R} rows")
    assert default_decode_buckets(32, "cpu") == (8, 16, 32) and default_decode_buckets(6, "cpu") == (6,)
    assert default_decode_buckets(64, "cpu") == (64,) and default_decode_buckets(32, "gpu") == (32,)
    assert MIN_DECODE_BUCKET >= 2


def test_decode_buckets_resolve_per_data_shard_and_refuse_bad_values():
    from jaxinfer.config import ConfigError, ModelConfig
    model = ModelConfig.from_hf(json.loads((Path(__file__).parent.parent / "configs/smollm2-135m.json").read_text()))
    resolve = lambda platform="cpu", **kw: EngineConfig(**kw).resolve(model, platform).decode_buckets  # noqa: E731
    assert resolve(max_slots=32) == (8, 16, 32) and resolve("gpu", max_slots=32) == (32,)
    assert resolve(max_slots=32, mesh_shape=(2, 1)) == (8, 16)  # 16 slots a shard
    assert resolve("gpu", max_slots=256, decode_buckets=(64, 128)) == (64, 128, 256)
    with pytest.raises(ConfigError, match=r"decode_buckets \[8, 32\] exceed the 16 slots of a data shard"):
        resolve(max_slots=32, mesh_shape=(2, 1), decode_buckets=(8, 32))
    for bad in [(), (0, 4), (8, 4), (4, 4), (2.5,)]:
        with pytest.raises(ConfigError, match="decode_buckets must be ascending positive integers"):
            EngineConfig(decode_buckets=bad)
