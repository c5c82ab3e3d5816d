"""Structured outputs (vLLM's `StructuredOutputsParams`): outputs held to a regex, a choice, a JSON schema or a
grammar; checked with Python's own `re` and `json`, and greedy tokens against transformers held to the same
grammar; batch independence, preemption and no leaks."""

import dataclasses
import json
import re
import shutil

import llguidance
import numpy as np
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine import structured
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.structured import GrammarCompiler, StructuredOutputsParams
from jaxinfer.llm import LLM, SamplingParams
from jaxinfer.model.checkpoint import DEFAULT_MODEL_DIR, find_model

GREEDY = SamplingParams(max_tokens=48, temperature=0.0)
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "saved": {"type": "boolean"}},
          "required": ["name", "age", "saved"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    """The embedded default model; three slots, so that requests with and without a grammar share them."""
    return LLM(engine=EngineConfig(max_slots=3, page_size=8, prefill_chunk=32, max_model_len=160))


def held(**kind) -> SamplingParams:
    return dataclasses.replace(GREEDY, structured_outputs=StructuredOutputsParams(**kind))


def _text(out) -> str:
    return out.outputs[0].text


def test_outputs_follow_regex_choice_and_json_schema(llm):
    prompts = ["The LORD is my shepherd", "And God said", "In the beginning", "Number:"]
    params = [held(regex=r"(Yes|No), [0-9]{2} (sheep|goats)\."), held(choice=["light", "darkness", "the waters"]),
              held(json=PERSON, disable_any_whitespace=True), held(regex=r"[0-9]{1,4}")]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert re.fullmatch(r"(Yes|No), [0-9]{2} (sheep|goats)\.", _text(outs[0]))
    assert _text(outs[1]) in ("light", "darkness", "the waters")
    person = json.loads(_text(outs[2]))
    assert set(person) == {"name", "age", "saved"} and isinstance(person["name"], str)
    assert type(person["age"]) is int and 0 <= person["age"] <= 150 and type(person["saved"]) is bool
    assert re.fullmatch(r"[0-9]{1,4}", _text(outs[3]))
    for out in outs:  # each ended when its grammar did, with the EOS the grammar then allows
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids[-1] in llm.engine.eos_ids
    llm.engine.check_idle()


def test_any_json_object_and_a_lark_grammar(llm):
    """Allowed any whitespace between JSON tokens (the default, as in vLLM), this small model fills its answer
    with newlines; without it, it closes the object."""
    kinds = [held(json_object=True), held(json_object=True, disable_any_whitespace=True),
             held(grammar='start: "a" ("b" | "c")+ "d"'), held(grammar='root ::= "x" [0-9] [0-9]?')]  # Lark, GBNF
    outs = llm.generate(["JSON:", "JSON:", "Say", "Say"], kinds, use_tqdm=False)
    assert re.fullmatch(r"\{\s*", _text(outs[0])) and outs[0].outputs[0].finish_reason == "length"
    assert json.loads(_text(outs[1])) == {}
    assert re.fullmatch("a[bc]+d", _text(outs[2])) and re.fullmatch("x[0-9]{1,2}", _text(outs[3]))
    assert [o.outputs[0].finish_reason for o in outs[1:]] == ["stop"] * 3
    llm.engine.check_idle()


def _allowed(tokenizer: llguidance.LLTokenizer, grammar: str, output: list[int]) -> list[int]:
    """The tokens a fresh matcher allows after `output`."""
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    assert matcher.consume_tokens(output)
    mask = np.zeros((1, (tokenizer.vocab_size + 31) // 32), np.int32)
    llguidance.numpy.fill_next_token_bitmask(matcher, mask)
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:tokenizer.vocab_size]).tolist()


def test_greedy_tokens_match_transformers_held_to_the_same_grammar(llm):
    """transformers' `prefix_allowed_tokens_fn` masks each step to what a fresh matcher allows after the output so
    far: the engine's masks, carried to the device as bits and applied there, must pick the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(find_model(None).directory, dtype=torch.float32)
    structured = [StructuredOutputsParams(regex=r"[A-Z][a-z]+ [0-9]{3}"),
                  StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)]
    prompts = ["And God said", "The LORD is my shepherd"]
    outs = llm.generate(prompts, [dataclasses.replace(GREEDY, structured_outputs=s) for s in structured],
                        use_tqdm=False)
    for prompt, out, constraint in zip(prompts, outs, structured):
        grammar = llm.engine.grammars.compile(constraint)
        tokenizer = llm.engine.grammars._llguidance_tokenizer()
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=GREEDY.max_tokens,
                                 prefix_allowed_tokens_fn=lambda _, seen: _allowed(
                                     tokenizer, grammar, seen[len(ids):].tolist()))[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref, prompt
    plain = llm.generate(prompts[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert plain != outs[0].outputs[0].token_ids  # the grammar changed the answer
    llm.engine.check_idle()


def test_outputs_do_not_depend_on_the_rest_of_the_batch(llm):
    """Requests with and without grammars, greedy and seeded, alone and together (and n = 2 siblings, each with
    a matcher of its own), give the same tokens."""
    prompts = ["The LORD is my shepherd", "And God said", "In the beginning", "Hello", "Number:"]
    sampled = dataclasses.replace(GREEDY, temperature=0.9, seed=7)
    params = [held(regex=r"[a-z ]{3,20}\."), GREEDY, dataclasses.replace(held(json=PERSON), n=2, temperature=1.0,
                                                                      seed=3),
              sampled, dataclasses.replace(sampled, structured_outputs=StructuredOutputsParams(choice=["1", "22"]))]
    together = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [[c.token_ids for c in llm.generate(p, q, use_tqdm=False)[0].outputs] for p, q in zip(prompts, params)]
    assert together == alone
    assert re.fullmatch(r"[a-z ]{3,20}\.", llm.tokenizer.decode(together[0][0]))
    assert llm.tokenizer.decode(together[4][0]) in ("1", "22")
    llm.engine.check_idle()


@pytest.mark.parametrize("extra", [dict(ignore_eos=True), dict(min_tokens=20)])
def test_a_complete_grammar_ends_what_eos_could_not(llm, extra, caplog):
    """Ignoring EOS, or before min_tokens (which would ban the EOS, the one token a complete grammar allows),
    the sequence ends as its grammar does, its last token's text kept, and with no token past it."""
    out = llm.generate("Choose", dataclasses.replace(held(choice=["alpha", "beta"]), **extra),
                       use_tqdm=False)[0].outputs[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"
    assert llm.tokenizer.decode(out.token_ids, skip_special_tokens=False) == out.text
    assert "breaks its structured output" not in caplog.text
    assert not set(out.token_ids) & set(llm.engine.eos_ids)
    llm.engine.check_idle()


def test_preempted_sequences_resume_their_grammar():
    """A pool far too small for the load: sequences under a grammar are preempted, recomputed and resumed with
    their matchers where they were; every output is the one a roomy pool gives."""
    prompts = [f"Verse {i}: the LORD said unto" for i in range(6)]
    params = [held(regex=r"([a-z]+ ){6}[a-z]+\."), held(json=PERSON, disable_any_whitespace=True), GREEDY] * 2
    roomy = LLM(engine=EngineConfig(max_slots=3, page_size=8, prefill_chunk=32, max_model_len=160))
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(engine=EngineConfig(max_slots=3, page_size=8, prefill_chunk=32, max_model_len=160, num_pages=13))
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert tight.engine.scheduler.counters.preemptions > 0
    tight.engine.check_idle()


def test_a_reasoning_models_thinking_comes_before_the_grammar(llm, monkeypatch):
    """As vLLM with a reasoning parser: the grammar holds only once the thinking's end token has come, the
    thinking itself is the model's own (here two ordinary tokens stand for <think> and </think>); a prompt whose
    last such token closes the thinking (a template that turned it off) is held from the first token.
    The thinking runs as unheld sequences do, several rounds a dispatch: the end token came third of a
    dispatch's four, so the fourth, sampled unheld, is dropped and the sequence recomputed from there (a
    rewind, not a preemption) to sample its next token under the grammar."""
    prompt = llm.tokenizer.encode("The LORD is my shepherd")
    plain = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    start, end = 1, plain[3]  # BOS cannot come again; the plain answer's 4th token ends its "thinking"
    assert end not in plain[:3] and llm.engine_config.decode_steps == 4
    monkeypatch.setattr(llm.engine.grammars, "thinking_tokens", ((start,), (end,)))
    rewinds, preemptions = [], llm.engine.scheduler.counters.preemptions
    rewind = Scheduler._rewind
    monkeypatch.setattr(Scheduler, "_rewind",
                        lambda self, seq: rewinds.append(len(seq.output_ids)) or rewind(self, seq))
    regex = r"[0-9]{2}"
    out = llm.generate({"prompt_token_ids": prompt}, held(regex=regex), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:4] == plain[:4]  # the thinking, unheld
    assert re.fullmatch(regex, llm.tokenizer.decode(out.token_ids[4:]))
    assert rewinds == [4] and llm.engine.scheduler.counters.preemptions == preemptions
    closed = llm.generate({"prompt_token_ids": prompt + [start, end]}, held(regex=regex), use_tqdm=False)
    assert re.fullmatch(regex, _text(closed[0]))
    # gpt-oss's markers are runs of tokens (<|channel|> final <|message|>): here the plain answer's 3rd and 4th,
    # which end the thinking only together; the same rewind
    grammars = llm.engine.grammars
    monkeypatch.setattr(grammars, "thinking_tokens", ((start,), (plain[2], end)))
    out = llm.generate({"prompt_token_ids": prompt}, held(regex=regex), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:4] == plain[:4] and re.fullmatch(regex, llm.tokenizer.decode(out.token_ids[4:]))
    assert rewinds == [4, 4]
    assert grammars._thinking_until(prompt + [end]) == (plain[2], end)  # the last token alone closes nothing
    assert grammars._thinking_until(prompt + [plain[2], end]) is None
    assert grammars._thinking_until(prompt + [plain[2], end, start]) == (plain[2], end)
    llm.engine.check_idle()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", ""]}, "non-empty list of non-empty strings"),
    ({"regex": 5}, "regex must be a string"),
    ({"json": 5}, "a JSON schema"),
    ({"json_object": True, "disable_any_whitespace": "yes"}, "disable_any_whitespace"),
])
def test_bad_structured_outputs_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"regex": "[a-"}, "regex"),
    ({"json": "{not json"}, "not a JSON schema"),
    ({"json": {"type": "foo"}}, "json cannot be used"),
    ({"grammar": "start: foo"}, "grammar cannot be used"),
])
def test_bad_grammars_are_refused_before_queueing(llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llm.generate("Hi", held(**kwargs), use_tqdm=False)
    assert llm.generate("Hi", held(choice=["ok"]), use_tqdm=False)[0].outputs[0].text == "ok"  # still serving
    llm.engine.check_idle()


def test_sampling_params_take_a_dict():
    params = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert params.structured_outputs == StructuredOutputsParams(choice=("a", "b"))
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs="json")


def test_compiled_grammars_are_kept_for_requests_that_share_them(llm, monkeypatch):
    """The server checks a request before queueing it, and many requests share a schema: equal params (a schema's
    keys in any order) compile once, while the last GRAMMAR_CACHE_SIZE are kept; errors are not kept."""
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.vocab_size, llm.engine.eos_ids)
    made = []
    monkeypatch.setattr(StructuredOutputsParams, "grammar_text",
                        lambda self, real=StructuredOutputsParams.grammar_text: made.append(self) or real(self))
    monkeypatch.setattr(structured, "GRAMMAR_CACHE_SIZE", 2)
    reordered = dict(reversed(list(PERSON.items())))
    assert compiler.compile(StructuredOutputsParams(json=PERSON)) == \
        compiler.compile(StructuredOutputsParams(json=reordered)) and len(made) == 1
    for regex in ("a", "b", "a"):  # PERSON's drops out of the two kept
        compiler.compile(StructuredOutputsParams(regex=regex))
    compiler.compile(StructuredOutputsParams(json=PERSON))
    assert len(made) == 4
    for _ in range(2):
        with pytest.raises(ValueError):
            compiler.compile(StructuredOutputsParams(regex="[a-"))
    assert len(made) == 6


def test_a_sentencepiece_only_checkpoint_gives_what_its_tokenizer_json_gives(llm, tmp_path):
    """Without tokenizer.json, llguidance reads the sentencepiece vocabulary through our wrapper (each id's bytes;
    byte-fallback pieces that duplicate a piece set apart; pieces of output tokenized without sentencepiece's
    word-start space). The same prompt ids then give the same held tokens as the tokenizer.json checkpoint."""
    for path in DEFAULT_MODEL_DIR.iterdir():
        if path.name != "tokenizer.json":
            shutil.copy(path, tmp_path / path.name)
    pieces = LLM(str(tmp_path), EngineConfig(max_slots=3, page_size=8, prefill_chunk=32, max_model_len=160))
    assert pieces.tokenizer.tokenizer_json() is None
    prompts = [{"prompt_token_ids": llm.tokenizer.encode(p)} for p in ("The LORD is my shepherd", "And God said")]
    params = [held(regex=r"(Yes|No), [0-9]{2} (sheep|goats)\."), held(json=PERSON, disable_any_whitespace=True)]
    ours = pieces.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == \
        [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert re.fullmatch(r"(Yes|No), [0-9]{2} (sheep|goats)\.", _text(ours[0])) and json.loads(_text(ours[1]))
    pieces.engine.check_idle()


def test_closed_objects_take_only_their_properties(llm):
    """vLLM's disable_additional_properties: every object schema that does not say otherwise is closed, however
    deep (items, anyOf, $defs...), and a property named like a keyword is left alone; the model then writes only
    the named properties where, open, it wrote others too."""
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "properties": {"type": "string"}},
              "$defs": {"d": {"properties": {}}}, "items": {"anyOf": [{"type": "object"}, {"type": "string"}]},
              "additionalProperties": True}
    closed = structured.closed_objects(schema)
    assert closed["additionalProperties"] is True  # it said otherwise
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["properties"]  # a property, not a keyword
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["items"]["anyOf"][0]["additionalProperties"] is False and closed["items"]["anyOf"][1] == {
        "type": "string"}
    open_schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    outs = [llm.generate("JSON:", held(json=open_schema, disable_any_whitespace=True, disable_additional_properties=c),
                         use_tqdm=False)[0].outputs[0] for c in (False, True)]
    assert outs[0].text.startswith('{"a":0,"') and outs[0].finish_reason == "length"  # open: another property
    assert json.loads(outs[1].text) == {"a": 0} and outs[1].finish_reason == "stop"


def test_a_servers_defaults_apply_to_every_request(llm, monkeypatch):
    """vLLM's --structured-outputs-config: {"disable_any_whitespace": true} makes this small model close a JSON
    object it otherwise pads with newlines to max_tokens."""
    out = llm.generate("JSON:", held(json_object=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and re.fullmatch(r"\{\s*", out.text)
    monkeypatch.setitem(llm.engine.grammars.defaults, "disable_any_whitespace", True)
    out = llm.generate("JSON:", held(json_object=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and json.loads(out.text) == {}
