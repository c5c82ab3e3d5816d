"""The first Python API and the command line: sampling, batch independence, limits, errors, no leaks."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_models import build
from jaxinfer.config import EngineConfig
from jaxinfer.llm import LLM, SamplingParams
from jaxinfer.model.checkpoint import find_model


@pytest.fixture(scope="module")
def llm():
    """The embedded default model, small enough limits to reach them in a test."""
    return LLM(engine=EngineConfig(max_slots=3, page_size=8, prefill_chunk=32, max_model_len=96))


def _free_all(llm):
    llm.engine.check_idle()
    return True


def test_default_model_generates_text(llm):
    out = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt == "Hello" and out.prompt_token_ids[0] == llm.tokenizer.bos_id
    assert len(out.outputs[0].token_ids) == 8
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
    assert _free_all(llm)


def test_outputs_do_not_depend_on_the_rest_of_the_batch(llm):
    """Greedy and seeded sampling give the same tokens alone and among other requests."""
    prompts = ["The quick brown fox", "Once upon a time", "To be or not", "Hello", "A much longer prompt " * 4]
    for params in (SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.9, seed=1234, ignore_eos=True)):
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        alone = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
        assert together == alone
    assert _free_all(llm)


def test_generate_queues_in_the_order_given(llm):
    """As vLLM: a batch is queued in the order given, whatever its max_tokens (in real use a cap, not the
    length; ordering by it paid only where it is the exact length, under ignore_eos, and there static
    batching gains far more from the same order). With 3 slots and 5 requests the last two wait; outputs
    come back in the order given."""
    prompts = ["The quick brown fox", "Once upon a time", "To be or not", "Hello", "A much longer prompt"]
    lengths = [3, 20, 4, 20, 12]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts and [len(o.outputs[0].token_ids) for o in outs] == lengths
    queued = [o.metrics.queue_time for o in outs]
    assert min(queued[3], queued[4]) > max(queued[:3])  # the fourth and fifth waited for a slot
    assert [int(o.request_id.split("-")[1]) for o in outs] == sorted(int(o.request_id.split("-")[1]) for o in outs)
    assert _free_all(llm)


def test_generate_takes_vllm_priorities(llm):
    """vLLM's generate(priority=[...]): lower is admitted first. With 3 slots and 5 requests, the two given -1
    run in the first wave and the first two of the others wait; bad lists raise before anything is queued."""
    prompts = ["The quick brown fox", "Once upon a time", "To be or not", "Hello", "A much longer prompt"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[0, 0, 0, -1, -1])
    queued = [o.metrics.queue_time for o in outs]
    assert min(queued[1], queued[2]) > max(queued[3], queued[4])
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    with pytest.raises(ValueError, match="2 priorities for 5 prompts"):
        llm.generate(prompts, params, priority=[0, 1])
    with pytest.raises(ValueError, match="^prompt 1: priority must be an integer"):
        llm.generate(prompts, params, priority=[0, 0.5, 0, 0, 0])
    assert _free_all(llm)


def test_prompts_as_vllm_dicts_each_tokenized_once(llm, monkeypatch):
    """vLLM's prompt dicts: {"prompt": text} as the text, {"prompt_token_ids": ids} as the ids, with an
    optional "prompt" kept as the output's text and not tokenized. generate() tokenizes each text once."""
    calls = []
    encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text, *a, **k: calls.append(text) or encode(text, *a, **k))
    ids = encode("Hello")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate(["Hello", {"prompt": "Hello"}, {"prompt_token_ids": ids},
                         {"prompt_token_ids": ids, "prompt": "Hello"}], params)
    assert calls == ["Hello", "Hello"]
    assert [o.prompt for o in outs] == ["Hello", "Hello", None, "Hello"]
    assert all(o.prompt_token_ids == ids and o.outputs[0].token_ids == outs[0].outputs[0].token_ids for o in outs)
    assert llm.generate({"prompt": "Hello"}, params)[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert _free_all(llm)


def _vllm_bad_words_ids(hf_tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words (SamplingParams.update_from_tokenizer), with transformers' tokenizer."""
    found = []
    for word in words:
        alone = hf_tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = hf_tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        found += [alone] + ([spaced] if spaced[0] != alone[0] and len(spaced) == len(alone) else [])
    return found


def test_bad_words_match_transformers(llm):
    """vLLM's bad_words against transformers' `bad_words_ids` (its NoBadWordsLogitsProcessor), greedy, on the
    embedded checkpoint: a one-token word never comes out; a longer word's last token never follows the rest
    of it. Requests with and without bad words share the three slots and reuse each other's. (transformers
    also matches across the prompt's end, vLLM only within the output: the prompts here do not end in any
    word's first token.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory = find_model(None).directory
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prompts = ["The LORD is my shepherd", "And God said", "In the beginning", "The LORD is my shepherd",
               "And God said", "In the beginning"]
    words = [["people"], [], ["the midst", "LORD"], [], ["not go", " will", "thee"], ["the earth"]]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, bad_words=w) for w in words]
    outs = llm.generate(prompts, params, use_tqdm=False)
    changed = 0
    for prompt, out, banned in zip(prompts, outs, words):
        ids = llm.tokenizer.encode(prompt)
        hf = {"bad_words_ids": _vllm_bad_words_ids(hf_tokenizer, banned)} if banned else {}
        assert not any(ids[-1] == word[0] for word in hf.get("bad_words_ids", []))
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                 **hf)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref, (prompt, banned)
        plain = llm.generate(prompt, dataclasses.replace(params[0], bad_words=()))[0].outputs[0].token_ids
        changed += plain != ref
    assert changed == 4  # every request with bad words
    assert _free_all(llm)


def test_bad_words_errors(llm):
    with pytest.raises(ValueError, match="bad_words must be a list of words"):
        SamplingParams(bad_words=["fine", "  "])
    with pytest.raises(ValueError, match="at most 128 words"):
        SamplingParams(bad_words=[f"w{i}" for i in range(129)])
    with pytest.raises(ValueError, match="bad_words may be at most 32 tokens long each"):
        llm.generate("Hello", SamplingParams(bad_words=["and " * 40]))
    spaced_apart = lambda text: [1 if text.startswith(" ") else 2] + [3] * (len(text.strip()) // 4)  # noqa: E731
    with pytest.raises(ValueError, match="make 130 token sequences after tokenization; the most is 128"):
        SamplingParams(bad_words=[f"word{i}" for i in range(65)]).bad_word_ids(spaced_apart)
    # The spaced form is kept only if it starts with another token and has as many (vLLM's rule).
    assert SamplingParams(bad_words=[" ab", "abcdefgh"]).bad_word_ids(spaced_apart) == ((2,), (1,), (2, 3, 3), (1, 3, 3))
    assert SamplingParams(bad_words=["ab"]).bad_word_ids(lambda text: [7] + [8] * text.startswith(" ")) == ((7,),)
    with pytest.raises(ValueError, match="must tokenize to at least one token"):
        SamplingParams(bad_words=["ab"]).bad_word_ids(lambda text: [])
    assert SamplingParams(bad_words="LORD").bad_words == ("LORD",)
    ok = SamplingParams(max_tokens=4, temperature=0.0)  # a batch is checked whole before any of it is queued
    with pytest.raises(ValueError, match="^prompt 1: bad_words may be at most 32 tokens"):
        llm.generate(["Hello", "World"], [ok, SamplingParams(max_tokens=4, bad_words=["and " * 40])], use_tqdm=False)
    assert not llm.engine.has_work()
    assert _free_all(llm)


def test_prompt_dicts_take_a_cache_salt(llm):
    """vLLM's prompt dicts may carry a cache_salt; LLM.generate passes it on, checked with the rest."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    plain = llm.generate("Hello", params, use_tqdm=False)[0]
    salted = llm.generate([{"prompt": "Hello", "cache_salt": "tenant"}], params, use_tqdm=False)[0]
    assert salted.outputs[0].token_ids == plain.outputs[0].token_ids and salted.prompt == "Hello"
    with pytest.raises(ValueError, match="^prompt 1: cache_salt must be a non-empty string"):
        llm.generate(["Hello", {"prompt": "Hello", "cache_salt": ""}], params)
    assert _free_all(llm)


def test_detokenize_false_gives_token_ids_only(llm):
    """vLLM's detokenize=False: the same tokens, no text (nor logprob token texts); stop strings need text."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    plain = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0]
    bare = llm.generate("Hello", dataclasses.replace(params, detokenize=False), use_tqdm=False)[0].outputs[0]
    assert bare.token_ids == plain.token_ids and plain.text and bare.text == ""
    assert all(lp.decoded_token is None for entry in bare.logprobs for lp in entry.values())
    assert all(lp.decoded_token is not None for entry in plain.logprobs for lp in entry.values())
    with pytest.raises(ValueError, match="stop strings need detokenize=True"):
        llm.generate("Hello", dataclasses.replace(params, detokenize=False, stop=["x"]))
    with pytest.raises(ValueError, match="detokenize must be True or False"):
        SamplingParams(detokenize=None)
    original = SamplingParams(logit_bias={5: 1.0}, bad_words=["x"])
    copied = original.clone()  # vLLM's clone(): a deep copy
    assert copied == original and copied.logit_bias is not original.logit_bias
    assert _free_all(llm)


def test_chat_renders_as_transformers_and_generates(llm):
    """vLLM's LLM.chat: one conversation or several, rendered as transformers' apply_chat_template renders them
    (encoded without a second BOS), then generated as generate() does; bad conversations raise, naming which."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(find_model(None).directory)
    chats = [[{"role": "user", "content": "Hello there"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"},
              {"role": "assistant", "content": "Blue"}, {"role": "user", "content": "Another"}]]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = llm.chat(chats, params, use_tqdm=False)
    for chat, out in zip(chats, outs):
        text = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert out.prompt == text and out.prompt_token_ids == hf.encode(text, add_special_tokens=False)
        assert out.outputs[0].token_ids == llm.generate([out.prompt_token_ids], params)[0].outputs[0].token_ids
    assert llm.chat(chats[0], params)[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert llm.get_tokenizer() is llm.tokenizer
    with pytest.raises(ValueError, match="conversation 1: must be a list of message dicts"):
        llm.chat([chats[0], "hi"], params)
    with pytest.raises(ValueError, match="messages must be a conversation"):
        llm.chat([], params)
    assert _free_all(llm)


# Renders tools, which the default model's ChatML template leaves out.
TOOLS_TEMPLATE = ("{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
                  "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_continues_messages_renders_tools_and_other_templates(llm):
    """vLLM's LLM.chat arguments continue_final_message (the final message left open, for the model to continue),
    tools and chat_template, rendered as transformers renders them; continuing with a generation prompt raises."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(find_model(None).directory)
    prefilled = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "My favourite is"}]
    tools = [{"type": "function", "function": {"name": "paint", "parameters": {"type": "object"}}}]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    cases = [(prefilled, dict(add_generation_prompt=False, continue_final_message=True)),
             (prefilled[:1], dict(chat_template=TOOLS_TEMPLATE, tools=tools)),
             (prefilled, dict(chat_template=TOOLS_TEMPLATE, tools=tools, add_generation_prompt=False,
                              continue_final_message=True))]
    for chat, kwargs in cases:
        out = llm.chat(chat, params, use_tqdm=False, **kwargs)[0]
        text = hf.apply_chat_template(chat, tokenize=False, **{"add_generation_prompt": True, **kwargs})
        assert out.prompt == text and out.prompt_token_ids == hf.encode(text, add_special_tokens=False), kwargs
    assert text.startswith('<|im_start|>system\n[{"type": "function"') and text.endswith("\nMy favourite is")
    with pytest.raises(ValueError, match="conversation 0: .* continue_final_message and add_generation_prompt "
                                         "cannot both be true"):
        llm.chat(prefilled, params, continue_final_message=True)
    with pytest.raises(ValueError, match="tools must be a list of JSON-schema dicts"):  # transformers converts
        llm.chat(prefilled[:1], params, tools=[print])  # a function with its get_json_schema; we take schemas
    with pytest.raises(ValueError, match="conversation 0: .* division by zero"):  # the template's fault, not ours
        llm.chat(prefilled, params, chat_template="{{ 1 / 0 }}")
    assert _free_all(llm)


def test_chat_hands_tool_call_arguments_to_the_template_as_objects(llm):
    """As vLLM's LLM.chat: OpenAI-style tool-call arguments (JSON strings) are parsed before the template runs."""
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
                "{{ c.function.arguments | tojson }}{% endfor %}\n{% endfor %}")
    call = {"type": "function", "function": {"name": "paint", "arguments": '{"colour": "red"}'}}
    chat = [{"role": "user", "content": "Paint it"}, {"role": "assistant", "tool_calls": [call]}]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    out = llm.chat(chat, params, use_tqdm=False, chat_template=template, add_generation_prompt=False)[0]
    from transformers import AutoTokenizer

    parsed = [chat[0], {**chat[1], "tool_calls": [{**call, "function": {"name": "paint", "arguments": {"colour": "red"}}}]}]
    hf = AutoTokenizer.from_pretrained(find_model(None).directory)
    assert out.prompt == hf.apply_chat_template(parsed, chat_template=template, tokenize=False)
    assert 'assistant:{"colour": "red"}' in out.prompt  # the object, once encoded
    assert _free_all(llm)


def test_seeds_decide_samples(llm):
    params = dict(max_tokens=16, temperature=1.0, ignore_eos=True)
    a = llm.generate("Hello", SamplingParams(seed=1, **params))[0].outputs[0].token_ids
    b = llm.generate("Hello", SamplingParams(seed=1, **params))[0].outputs[0].token_ids
    c = llm.generate("Hello", SamplingParams(seed=2, **params))[0].outputs[0].token_ids
    greedy = llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert a == b
    assert a != c and a != greedy[0].outputs[0].token_ids


def test_context_end_stops_with_length(llm):
    prompt = list(range(5, 5 + 90))
    out = llm.generate([prompt], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 96 - 90 and out.outputs[0].finish_reason == "length"
    assert out.prompt is None and out.outputs[0].text  # token-id prompts still decode their output


def test_stop_token_ids_finish_with_stop(llm):
    first = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    stop = first.outputs[0].token_ids[2]
    out = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, stop_token_ids=[stop]))
    completion = out[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == stop
    assert completion.token_ids == first.outputs[0].token_ids[:len(completion.token_ids)]


@pytest.mark.parametrize("prompt, message", [
    ([[]], "prompt 0: the prompt is empty"),
    ([[1, 4096]], "token id 4096 is outside the vocabulary"),
    ([[-1]], "token id -1 is outside"),
    ([list(range(96))], "96 tokens; the maximum context length is 96"),
    ([], "non-empty"),
    ({"prompt": "Hi", "multi_modal_data": {}}, "prompt 0: a prompt dict takes only 'prompt' .* 'multi_modal_data'"),
    ([{"prompt": ["Hi"]}], "needs 'prompt' text or 'prompt_token_ids'"),
    ([{"prompt_token_ids": [1, 2], "prompt": 5}], "'prompt' must be text"),
    ([{"prompt_token_ids": "Hi"}], "a list of integer token ids"),
])
def test_bad_prompts_are_refused_clearly(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, SamplingParams(max_tokens=4))
    assert _free_all(llm)
    assert llm.generate("still serving", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), r"max_tokens must be an integer in \[1, "),
    (dict(temperature=-1.0), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(seed="3"), "seed must be a 64-bit integer"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_request_that_cannot_fit_is_refused():
    tight = LLM(engine=EngineConfig(max_slots=1, page_size=8, max_model_len=64, num_pages=3))
    with pytest.raises(MemoryError, match="prompt 1: a request of 20 prompt tokens \\+ 4 new tokens needs 3 KV "
                                          "pages of 8 tokens; the whole pool has 2"):
        tight.generate([[7, 8], list(range(5, 25))], SamplingParams(max_tokens=4))
    tight.engine.check_idle()
    assert tight.generate([[7, 8]], SamplingParams(max_tokens=4))[0].outputs[0].token_ids


def test_warmup_compiles_every_shape_generation_needs():
    """The full 4-page table (the narrowest bucket is 64 tokens), with and without a 16-token chunk (static
    control flow: tests/test_engine.py)."""
    llm = LLM(engine=EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, max_model_len=32), warmup=True)
    assert llm.runner.num_compiles == 2
    for temperature in (0.5, 0.0):
        llm.generate(["a", "a longer prompt that takes more than one chunk of the prefill"],
                     SamplingParams(max_tokens=12, temperature=temperature, ignore_eos=True))
    assert llm.runner.num_compiles == 2


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jaxinfer.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_generate_with_the_embedded_model(tmp_path):
    result = _cli("generate", "Hello", "--max-tokens", "6", cwd=tmp_path)  # no model files anywhere
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and len(result.stdout.strip()) > len("Hello")
    assert "tokens/s" in result.stderr


def test_cli_convert_then_generate_gives_the_same_tokens(tmp_path):
    build("qwen2", tmp_path / "hf")
    result = _cli("convert", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "orbax"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine = EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, dtype="float32")
    prompt = [[5, 9, 200, 31, 7, 77, 12, 150, 3, 4, 90, 91, 92, 93, 94, 95, 96, 97]]
    a = LLM(tmp_path / "hf", engine).generate(prompt, params)[0].outputs[0].token_ids
    b = LLM(tmp_path / "orbax", engine).generate(prompt, params)[0].outputs[0].token_ids
    assert a == b


def test_cli_reports_bad_checkpoints(tmp_path):
    result = _cli("generate", "Hi", "--model", str(tmp_path))
    assert result.returncode == 2 and "no config.json" in result.stderr


def test_bfloat16_runs_on_cpu():
    """XLA:CPU has no bf16 x bf16 -> f32 dot; the model must still run in bfloat16 there."""
    llm = LLM(engine=EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, max_model_len=64, dtype="bfloat16"))
    out = llm.generate("Hello there", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 6 and llm.runner.params["embed"].dtype == "bfloat16"


def test_kv_pool_is_sized_from_the_memory_budget():
    """GPU: what the weights left of gpu_memory_utilization, less one step's activations, per KV shard;
    capped at 16 full-length sequences per slot; CPU: every slot at full length four times over, capped; a
    budget too small for one sequence fails."""
    import types

    import numpy as np

    from jaxinfer.config import ConfigError, ModelConfig
    from jaxinfer.llm import kv_budget_bytes
    cfg = ModelConfig.from_hf(json.loads((Path(__file__).parent.parent / "configs/llama-3-8b.json").read_text()))
    engine = EngineConfig(max_slots=64, page_size=16, max_model_len=4096, dtype="bfloat16")
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 80 << 30, "bytes_in_use": 16 << 30})
    mesh = types.SimpleNamespace(devices=np.array([gpu]), shape={"data": 1, "model": 2})
    activations = 16 * 256 * (cfg.hidden_size + cfg.intermediate_size + cfg.vocab_size)
    assert kv_budget_bytes(engine, cfg, mesh) == int((0.9 * (80 << 30) - (16 << 30) - activations) * 2)
    few = dataclasses.replace(engine, max_slots=2)
    assert kv_budget_bytes(few, cfg, mesh) == (16 * 2 * 256 + 1) * few.kv_bytes_per_page(cfg)
    engine = dataclasses.replace(engine, max_slots=8)
    cpu = types.SimpleNamespace(platform="cpu", memory_stats=lambda: None)
    mesh = types.SimpleNamespace(devices=np.array([cpu]), shape={"data": 1, "model": 1})
    per_page = engine.kv_bytes_per_page(cfg)
    assert per_page == 2 * 32 * 8 * 16 * 128 * 2
    assert kv_budget_bytes(engine, cfg, mesh) == min(1 << 30, (4 * 8 * 256 + 1) * per_page)
    assert engine.with_kv_budget(cfg, 1 << 30).num_pages == (1 << 30) // per_page
    with pytest.raises(ConfigError, match="less than one sequence of max_model_len=4096 needs"):
        engine.with_kv_budget(cfg, 100 * per_page)
