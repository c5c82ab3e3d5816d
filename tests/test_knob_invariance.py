"""Greedy tokens depend neither on the batch nor on the engine's knobs, and equal Hugging Face's.

Two engines over one tiny random checkpoint (Mistral: its sliding window of 24 is crossed by the longer
sequences), knobs chosen far apart and small enough that every path runs: prompts cut into chunks that
straddle pages, several prompts packed into one step, a pool so small that sequences are preempted and
recomputed, prefix-cache hits (shared prefixes and the n > 1 siblings), multi-round decode dispatches,
decode steps shrunk to fewer rows, static and dynamic control flow, the reference and page-loop attention.
One workload runs through both, requests arriving while others decode: greedy requests (including n = 3,
one reaching max_model_len, one with presence penalty) among seeded sampled ones that switch the sampler's
passes on. Every greedy token must be Hugging Face's greedy token (unless HF's own top-2 logits are a
float32 near-tie there), its logprob HF's to 1e-4, every other request the same in both engines, and every
page and slot must come back.
"""

import numpy as np
import pytest
import torch

from hf_models import build
from jaxinfer.config import EngineConfig
from jaxinfer.llm import LLM, SamplingParams
from test_engine import run

MAX_LEN = 40
NEAR_TIE = 1e-4  # HF top-2 logit gap under which a different argmax is float32 rounding, not a defect
LOGPROB_ATOL = 1e-4
ENGINES = {
    # Page-loop attention, dynamic control flow; 5 slots over 13 usable pages of 4 tokens (a full-length
    # sequence needs 10): preempts. Chunks of 6 tokens packing up to 3 prompts; 5 decode rounds a dispatch,
    # shrunk to 2 rows when few slots decode.
    "packed": EngineConfig(max_slots=5, page_size=4, num_pages=14, prefill_chunk=6, max_prefill_seqs=3,
                           decode_steps=5, decode_buckets=(2,), control_flow="dynamic", attention_backend="xla",
                           enable_prefix_caching=True, max_model_len=MAX_LEN, dtype="float32"),
    # Reference attention, static control flow (rounds and sampler passes compiled per step); 3 slots over
    # 5 usable pages of 8 tokens, what one full-length sequence needs: preempts. One prompt a step in chunks
    # of 12 (buckets 4, 8, 12), 3 decode rounds; no prefix cache (the n > 1 siblings still share their
    # prompt's pages).
    "static": EngineConfig(max_slots=3, page_size=8, num_pages=6, prefill_chunk=12, min_prefill_bucket=4,
                           max_prefill_seqs=1, decode_steps=3, control_flow="static", attention_backend="reference",
                           enable_prefix_caching=False, max_model_len=MAX_LEN, dtype="float32"),
}


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0, **kw)


def _workload(vocab: int):
    """Prompts one under, at and one past page (4, 8) and chunk (6, 12) boundaries and their multiples; five
    sharing a 16-token prefix; n = 3 greedy; one to the end of the context; seeded samplers among them."""
    rng = np.random.default_rng(0)
    prompt = lambda n: rng.integers(3, vocab, n).tolist()  # noqa: E731
    requests = [(prompt(n), greedy(int(rng.integers(3, 12)))) for n in (1, 3, 4, 5, 7, 8, 9, 11, 12, 13, 17, 25)]
    shared = prompt(16)
    requests += [(shared + prompt(extra), greedy(8)) for extra in (0, 1, 3, 4, 5)]
    requests += [(prompt(10), SamplingParams(n=3, max_tokens=9, temperature=0.0, ignore_eos=True)),
                 (prompt(MAX_LEN - 12), greedy(None)),  # stops at max_model_len: 12 new tokens
                 (prompt(6), greedy(7, presence_penalty=1.5))]
    samplers = [dict(temperature=0.9), dict(temperature=0.7, top_p=0.8, top_k=20),
                dict(temperature=1.0, repetition_penalty=1.4, logprobs=3), dict(temperature=1.0, min_p=0.1),
                dict(n=2, temperature=0.8)]
    requests += [(prompt(int(rng.integers(1, 20))), SamplingParams(max_tokens=int(rng.integers(2, 14)), seed=i,
                                                                   ignore_eos=True, **kw))
                 for i, kw in enumerate(samplers)]
    return requests


def _hf_greedy(model, prompt, n):
    """HF's greedy tokens, their logprobs and the top-2 logit gap at each step."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack(out.logits)[:, 0].float()
    logprobs = torch.log_softmax(logits, -1)[torch.arange(n), tokens].tolist()
    top2 = logits.topk(2, -1).values
    return tokens, logprobs, (top2[:, 0] - top2[:, 1]).tolist()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the HF model, the workload, {engine name: (its outputs, its stats)})."""
    directory = tmp_path_factory.mktemp("mistral")
    model = build("mistral", directory)
    requests = _workload(model.config.vocab_size)
    results = {}
    for i, (name, cfg) in enumerate(ENGINES.items()):
        llm = LLM(directory, cfg)
        arrivals = np.random.default_rng(10 + i).integers(0, 30, len(requests)).tolist()
        outs = run(llm.engine, requests, arrivals)
        llm.engine.check_idle()
        results[name] = outs, llm.engine.stats()
    return model, requests, results


def test_the_workload_reaches_preemption_and_the_prefix_cache(served):
    _, _, results = served
    for name, (_, stats) in results.items():
        assert stats.preemptions > 0, name
    assert results["packed"][1].prefix_cache_hits > 0


@pytest.mark.parametrize("name", list(ENGINES))
def test_greedy_tokens_and_logprobs_equal_transformers(served, name):
    model, requests, results = served
    checked = 0
    for (prompt, params), out in zip(requests, results[name][0]):
        if params.temperature != 0 or params.presence_penalty:
            continue
        ref, ref_logprobs, gaps = _hf_greedy(model, prompt, len(out.outputs[0].token_ids))
        for completion in out.outputs:
            tokens = completion.token_ids
            differ = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
            if differ < len(ref):  # past a near-tie the two runs may rightly go apart; before one, never
                assert gaps[differ] < NEAR_TIE, (f"{name}: prompt of {len(prompt)} tokens, token {differ}: "
                                                 f"{tokens[differ]} against HF's {ref[differ]} (gap {gaps[differ]:.2e})")
            checked += differ
            if completion.logprobs is not None:
                ours = [entry[t].logprob for t, entry in zip(tokens[:differ], completion.logprobs)]
                np.testing.assert_allclose(ours, ref_logprobs[:differ], atol=LOGPROB_ATOL, rtol=0,
                                           err_msg=f"{name}: prompt of {len(prompt)} tokens")
        assert out.outputs[0].finish_reason == "length"
    assert checked >= 150  # tokens compared


def test_every_request_gets_the_same_tokens_under_both_engines(served):
    """Seeded samplers and penalties as much as greedy: no output depends on the knobs."""
    _, requests, results = served
    (packed, _), (static, _) = results.values()
    for (prompt, params), a, b in zip(requests, packed, static):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs], f"{params}, {len(prompt)} tokens"
        if params.logprobs is not None:
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert list(x) == list(y)
                np.testing.assert_allclose([v.logprob for v in x.values()], [v.logprob for v in y.values()],
                                           atol=LOGPROB_ATOL, rtol=0)
