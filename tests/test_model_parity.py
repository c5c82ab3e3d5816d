"""Model numerics against Hugging Face transformers, for every supported family (float32).

Logits: our chunked, paged prefill against `AutoModelForCausalLM` on the whole
prompt. Greedy tokens: `LLM.generate` (continuous batching over fewer slots than
prompts, prompts crossing page and chunk boundaries) against `generate(do_sample=False)`.
fp8 checkpoints (FP8_FAMILIES) against transformers' model of the same fp8 files.
"""

import numpy as np
import pytest
import torch

from hf_models import FAMILIES, FP8_FAMILIES, build, random_prompts, scored_in_chunks
from jaxinfer.config import EngineConfig
from jaxinfer.llm import LLM, SamplingParams

PAGE, CHUNK = 8, 16
# 1 token; one under, exactly, one past a page; exactly a chunk; one past; three chunks.
PROMPT_LENGTHS = (1, 7, 8, 9, 16, 17, 40)
NEW_TOKENS = 24
# The longest prompt and its answer fill the context exactly: one block-table width, so each family compiles two
# step shapes rather than three (about 2 s a family; widths are the engine tests' to cover).
MAX_MODEL_LEN = 64
LOGIT_ATOL = 2e-4  # float32 end to end; observed differences are ~3e-6


@pytest.fixture(scope="module", params=list(FAMILIES) + list(FP8_FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = build(request.param, directory)
    engine = EngineConfig(max_slots=3, page_size=PAGE, prefill_chunk=CHUNK, dtype="float32",
                          max_model_len=MAX_MODEL_LEN)
    return request.param, model, LLM(directory, engine)


def test_prompt_logits_match_transformers(family):
    name, model, llm = family
    prompt = np.asarray(random_prompts(llm.model_config.vocab_size, PROMPT_LENGTHS)[-1], np.int32)
    ours = scored_in_chunks(llm, prompt, CHUNK)
    with torch.no_grad():
        ref = model(torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=0, err_msg=name)


def test_greedy_tokens_match_transformers_generate(family):
    name, model, llm = family
    prompts = random_prompts(llm.model_config.vocab_size, PROMPT_LENGTHS)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref, f"{name}, prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"
    llm.engine.check_idle()


def test_logit_bias_and_allowed_token_ids_match_transformers(family):
    """vLLM's `logit_bias` and `allowed_token_ids` against transformers' `sequence_bias` and
    `prefix_allowed_tokens_fn`, greedy. Requests with and without them share the batch and reuse each
    other's slots: a plain request never sees the edits a slot's last sequence loaded."""
    name, model, llm = family
    if name in FP8_FAMILIES:
        pytest.skip("the sampler's edits do not see how weights are stored: the base family's case covers them")
    vocab = llm.model_config.vocab_size
    prompts = random_prompts(vocab, PROMPT_LENGTHS)
    rng = np.random.RandomState(11)
    edits = []
    for i, prompt in enumerate(prompts):
        if i % 2:
            edits.append({})
        elif i % 4:
            edits.append(dict(allowed_token_ids=sorted(rng.choice(vocab, 40, replace=False).tolist())))
        else:
            ids = rng.choice(vocab, 30, replace=False).tolist()
            edits.append(dict(logit_bias={t: float(rng.choice([-100.0, 3.0, 8.0])) for t in ids}))
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **e) for e in edits]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, e in zip(prompts, outputs, edits):
        hf = {}
        if "logit_bias" in e:
            hf["sequence_bias"] = {(t,): b for t, b in e["logit_bias"].items()}
        if "allowed_token_ids" in e:
            hf["prefix_allowed_tokens_fn"] = lambda batch, ids, allowed=e["allowed_token_ids"]: allowed
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                 **hf)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref, f"{name}, prompt of {len(prompt)} tokens, {sorted(e)}"
        if "allowed_token_ids" in e:
            assert set(ref) <= set(e["allowed_token_ids"])
    llm.engine.check_idle()
