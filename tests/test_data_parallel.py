"""Data parallelism on the host: the per-shard schedulers and request placement, on fake executors (one per
shard, page ids local to each), checked against the unpaged fake model like tests/test_scheduler.py."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinfer.config import EngineConfig
from jaxinfer.engine.data_parallel import DataParallelScheduler
from jaxinfer.engine.engine import Engine, _seed32
from jaxinfer.engine.executor import FakeExecutor, ShardedFakeExecutor, fake_continuation
from jaxinfer.engine.request import SamplingParams

VOCAB, EOS = 50, 7


def make_engine(shards: int = 2, **overrides) -> Engine:
    values = dict(max_slots=2 * shards, page_size=4, num_pages=24 * shards, max_model_len=64, prefill_chunk=8,
                  decode_steps=2, dtype="float32", attention_backend="reference", mesh_shape=(shards, 1))
    cfg = EngineConfig(**{**values, **overrides})
    local = cfg.shard()
    executor = ShardedFakeExecutor([FakeExecutor(local.num_pages, cfg.page_size, local.max_slots, vocab=VOCAB)
                                    for _ in range(shards)])
    return Engine(cfg, executor, vocab_size=VOCAB, eos_ids=(EOS,))


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> dict:
    ids = [engine.add_request(prompt, params, stream=False) for prompt, params in requests]
    finals = {}
    for _ in range(5000):
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
    return fake_continuation(prompt, min(params.max_tokens, room), _seed32(params.seed, index), VOCAB, stops,
                             params.min_tokens)


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
    outs = run(engine, [(prefix + [i, i + 1], SamplingParams(max_tokens=4, seed=i)) for i in range(3)])
    assert engine.stats().prefix_cache_hits - hits_before == 3 * 16
    for i, out in enumerate(outs):
        prompt = prefix + [i, i + 1]
        assert out.outputs[0].token_ids == expected(engine, prompt, SamplingParams(max_tokens=4, seed=i))
    assert engine.scheduler.shards[1 - home].pages.num_cached_idle == 0

