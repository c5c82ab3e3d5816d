"""KV cache groups (vLLM's hybrid KV cache manager): sliding-window layers keep only their window's pages.

The layout (which layers share a block table and a slot of the pool), the scheduler's paging against the fake
executor (which checks that every group reads the same tokens over its window), and tiny models against
transformers with the pages their sliding layers hold counted.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models import build, random_prompts
from jaxinfer.config import EngineConfig, ModelConfig, kv_layout
from jaxinfer.engine.pages import NULL_PAGE
from jaxinfer.llm import LLM, SamplingParams
from test_scheduler import expected, make_engine, prompts, run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def preset(name: str) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((CONFIGS / name).read_text()))


def test_gemma3_layers_group_by_kind_into_one_pool():
    """Gemma 3 1B: 4 global layers and 22 sliding ones make groups of 4 layers, one global and six sliding (the
    last with two slots unused); every layer has its own (group, slot), and a group's layers are of one kind.
    A page then holds 4 layers' KV, not 26, and a 4096-token sequence holds its 256 global pages plus six
    windows of 512 tokens and a chunk."""
    cfg = preset("gemma-3-1b.json")
    layout = kv_layout(cfg)
    assert (layout.width, layout.windows) == (4, (None,) + (512,) * 6)
    places = list(zip(layout.group_of, layout.slot_of))
    assert len(set(places)) == cfg.num_layers and all(slot < layout.width for _, slot in places)
    assert all(layout.windows[group] == cfg.layer_window(layer) for layer, group in enumerate(layout.group_of))
    assert [layout.group_of.count(g) for g in range(layout.num_groups)] == [4, 4, 4, 4, 4, 4, 2]
    hybrid = EngineConfig(page_size=16, max_model_len=4096).resolve(cfg, "gpu")
    whole = EngineConfig(page_size=16, max_model_len=4096, disable_hybrid_kv_cache_manager=True).resolve(cfg, "gpu")
    assert whole.kv_groups == (None,) and kv_layout(cfg, hybrid=False).width == 26
    assert whole.kv_bytes_per_page(cfg) == 26 / 4 * hybrid.kv_bytes_per_page(cfg)
    assert hybrid.sequence_pages(4096) == 256 + 6 * (-(-(511 + 256) // 16) + 1)
    assert whole.sequence_pages(4096) == 256


@pytest.mark.parametrize("name, windows, width", [("gemma-2-9b.json", (None, 4096), 21),
                                                  ("llama-3-8b.json", (None,), 32)])
def test_other_layouts(name, windows, width):
    """Gemma 2 alternates: two groups of 21. A model without sliding layers keeps one group of all of them."""
    layout = kv_layout(preset(name))
    assert (layout.windows, layout.width) == (windows, width)


def test_a_model_whose_every_layer_slides_has_one_sliding_group():
    cfg = ModelConfig("mistral", 32, 16, 32, 4, 2, 2, 8, 4096, sliding_window=64)
    assert kv_layout(cfg) == kv_layout(cfg, hybrid=False)
    assert kv_layout(cfg).windows == (64,) and kv_layout(cfg).width == 4


def sliding_pages_held(engine, params, prompt):
    """Run one request step by step; -> (its output, the most pages its sliding groups held at once)."""
    request_id = engine.add_request(prompt, params, stream=False)
    most, finals = 0, {}
    while engine.has_work():
        for out in engine.step():
            finals[out.request_id] = out
        for seq in engine.scheduler.running:
            most = max([most] + [sum(p != NULL_PAGE for p in pages)
                                 for pages, w in zip(seq.pages, engine.cfg.kv_groups) if w is not None])
    engine.check_idle()
    return finals[request_id].outputs[0].token_ids, most


@pytest.mark.parametrize("windows", [(None, 6), (6,), (None, 6, 6)])
def test_sliding_groups_hold_their_window_only(windows):
    """A 50-token prompt and 60 new tokens in pages of 4 (28 pages of context): each sliding group (window 6)
    holds at most its window, a 16-token chunk and the pages they straddle, the output is exact, and every page
    comes back."""
    engine = make_engine(page_size=4, num_pages=80, max_model_len=128, prefill_chunk=16, decode_steps=2,
                         kv_windows=windows)
    prompt, params = prompts(1, 50)[0], SamplingParams(max_tokens=60, seed=5, ignore_eos=True)
    tokens, most = sliding_pages_held(engine, params, prompt)
    assert tokens == expected(engine, prompt, params)
    assert 2 <= most <= -(-(6 - 1 + 16) // 4) + 1


def test_a_long_sequence_fits_a_pool_its_global_pages_alone_would_fill():
    """A pool of 30 usable pages: 100 tokens of context need 25 pages per group. With a sliding group beside the
    global one the request fits and runs to the exact output; with both groups global it is refused by name."""
    prompt, params = prompts(1, 40)[0], SamplingParams(max_tokens=61, seed=2, ignore_eos=True)
    engine = make_engine(page_size=4, num_pages=31, max_model_len=128, prefill_chunk=8, kv_windows=(None, 5))
    assert run_one(engine, prompt, params) == expected(engine, prompt, params)
    whole = make_engine(page_size=4, num_pages=31, max_model_len=128, prefill_chunk=8, kv_windows=(None, None))
    with pytest.raises(MemoryError, match="needs 50 KV pages"):
        whole.add_request(prompt, params, stream=False)


def run_one(engine, prompt, params):
    request_id = engine.add_request(prompt, params, stream=False)
    finals = run(engine)
    engine.check_idle()
    return finals[request_id].outputs[0].token_ids


def test_a_cached_prefix_serves_the_sliding_group_from_its_window():
    """The second request with the same 24-token prefix takes all 6 global pages from the cache but only the
    sliding group's last pages (those its window reads from position 24 on); its output is exact. Once those
    pages are evicted, the hit shrinks to what the sliding group still holds."""
    prefix = prompts(1, 24)[0]
    engine = make_engine(page_size=4, num_pages=40, max_model_len=64, prefill_chunk=8, kv_windows=(None, 6))
    first = SamplingParams(max_tokens=6, seed=1, ignore_eos=True)
    assert run_one(engine, prefix + [1, 2, 3], first) == expected(engine, prefix + [1, 2, 3], first)
    second = SamplingParams(max_tokens=6, seed=2, ignore_eos=True)
    request_id = engine.add_request(prefix + [4, 5], second, stream=False)
    engine.step()
    (seq,) = engine.scheduler.running
    assert seq.num_computed >= 24 and seq.pages[1][:4] == [NULL_PAGE] * 4 and NULL_PAGE not in seq.pages[0]
    finals = run(engine)
    assert finals[request_id].num_cached_tokens == 24
    assert finals[request_id].outputs[0].token_ids == expected(engine, prefix + [4, 5], second)
    names = engine.scheduler._group_names(engine.scheduler.cache_names(seq), 1)
    for name in names[4:6]:  # evict the sliding group's pages the window at position 24 would read
        for page in list(engine.scheduler.pages._pages_of.get(name, ())):
            engine.scheduler.pages._lru.pop(page)
            engine.scheduler.pages._forget(page)
            engine.scheduler.pages._free.append(page)
    engine.scheduler.pages.check()
    third = SamplingParams(max_tokens=3, seed=3, ignore_eos=True)
    request_id = engine.add_request(prefix + [6, 7], third, stream=False)
    finals = run(engine)
    assert finals[request_id].num_cached_tokens == 16  # pages 2-3 of the sliding group are still cached
    assert finals[request_id].outputs[0].token_ids == expected(engine, prefix + [6, 7], third)


@pytest.fixture(scope="module", params=["gemma2", "mistral"])
def model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, build(request.param, directory), directory


def test_models_with_sliding_layers_free_their_pages_and_match_transformers(model):
    """Gemma 2 (a global layer between two sliding ones, window 12) and Mistral (every layer slides, window 24):
    a 40-token prompt and 80 new tokens give transformers' greedy tokens with the hybrid KV cache manager and
    without it. With it, each sliding layer holds its window's pages, not the context's 15; a page holds one
    layer of Gemma 2 (all three without). Mistral's single group slides either way."""
    name, hf_model, directory = model
    prompt = random_prompts(256, [40])[0]
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=80,
                                min_new_tokens=80)[0, len(prompt):].tolist()
    window = {"gemma2": 12, "mistral": 24}[name]
    expected_windows = {("gemma2", False): (None, 12, 12), ("gemma2", True): (None,),
                        ("mistral", False): (24,), ("mistral", True): (24,)}
    for disable in (False, True):
        llm = LLM(directory, EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, dtype="float32",
                                          disable_hybrid_kv_cache_manager=disable))
        layout = llm.engine_config.kv_layout(llm.model_config)
        assert llm.engine_config.kv_groups == layout.windows == expected_windows[name, disable]
        whole = disable or name == "mistral"
        assert llm.runner.kv.k.shape[0] == layout.width == (llm.model_config.num_layers if whole else 1)
        tokens, most = sliding_pages_held(llm.engine, params, prompt)
        assert tokens == ref, f"{name}, hybrid {not disable}"
        if None not in layout.windows or len(layout.windows) > 1:
            assert 2 <= most <= -(-(window - 1 + 16) // 8) + 1 < 15


def test_a_busy_tight_pool_gives_each_request_its_output_alone(model):
    """Twelve requests, half sharing a 24-token prefix, arriving at random steps into 4 slots whose pool is too
    small for them (Gemma 2: 23 pages, where one 90-token sequence holds up to 22 over its three groups): packed
    prefill chunks, decode steps of 2 and 4 rows, prefix hits on pages a sliding group freed, preemptions and
    resumptions; each output is what the request gets alone, and every page comes back."""
    from test_engine import run
    name, _, directory = model
    llm = LLM(directory, EngineConfig(max_slots=4, page_size=8, prefill_chunk=16, max_model_len=96,
                                      num_pages={"gemma2": 24, "mistral": 10}[name], max_prefill_seqs=2,
                                      decode_buckets=(2, 4), dtype="float32"))
    rng = np.random.default_rng(3)
    shared = rng.integers(3, 256, 24).tolist()
    requests = []
    for i in range(12):
        prompt = (shared if i % 2 else []) + rng.integers(3, 256, int(rng.integers(1, 40))).tolist()
        requests.append((prompt, SamplingParams(max_tokens=int(rng.integers(8, 96 - len(prompt))), temperature=0.0,
                                                ignore_eos=True)))
    together = run(llm.engine, requests, rng.integers(0, 30, len(requests)).tolist())
    stats = llm.engine.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
    llm.engine.check_idle()
    for (prompt, params), out in zip(requests, together):
        alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert out.outputs[0].token_ids == alone, f"{name}, prompt of {len(prompt)} tokens"
