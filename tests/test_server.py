"""The HTTP server against real clients: the official `openai` package, raw SSE, and lm-eval-shaped scoring.

Faults that need a server process of their own (warm-up, SIGTERM, memory over
many disconnects) are in test_server_process.py; the bad-input list is in
test_server_bad_input.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import socket
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from hf_models import build
from jaxinfer import cli
from jaxinfer.config import EngineConfig
from jaxinfer.llm import load_engine
from jaxinfer.server.app import ServerConfig
from jaxinfer.tokenizer import load_chat_template
from live_server import ENGINE, LiveServer, serves_normally

GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def live():
    server = LiveServer(ServerConfig(served_model_name="tiny"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def stream_text(chunks, chat: bool = False) -> tuple[dict, dict]:
    """Texts and finish reasons per choice index from openai stream chunks."""
    texts, reasons = {}, {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = (c.delta.content or "") if chat else c.text
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons


def test_completions_stream_and_not_agree(live, client):
    prompt = "The quick brown fox"
    full = client.completions.create(model="tiny", prompt=prompt, seed=7, temperature=0.9, max_tokens=20)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, seed=7, temperature=0.9, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True}))
    texts, reasons = stream_text(chunks)
    assert texts[0] == full.choices[0].text and full.choices[0].text
    assert reasons[0] == full.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert full.usage.completion_tokens == 20 and full.usage.prompt_tokens == len(live.engine.tokenizer.encode(prompt))
    live.wait_idle()


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(live, client):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries the prompt tokens and
    the completion tokens so far, rising to the final usage chunk's; without include_usage it adds nothing."""
    messages = [{"role": "user", "content": "Hello there"}]
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0.0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))  # the SDK passes the extra key
    final = chunks[-1].usage
    assert chunks[-1].choices == [] and final.completion_tokens == 16
    assert all(c.usage is not None and c.usage.prompt_tokens == final.prompt_tokens for c in chunks)
    so_far = [c.usage.completion_tokens for c in chunks]
    assert so_far[0] == 0 and so_far == sorted(so_far) and so_far[-2] == 16
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    plain = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True,
                                                stream_options={"include_usage": False,
                                                                "continuous_usage_stats": True}))
    assert all(c.usage is None for c in plain)
    live.wait_idle()


def test_chat_stream_and_not_agree(live, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model="tiny", messages=messages, seed=3, max_tokens=16)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, seed=3, max_tokens=16,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    texts, reasons = stream_text(chunks, chat=True)
    assert texts[0] == full.choices[0].message.content
    assert reasons[0] == full.choices[0].finish_reason
    rendered = live.engine.tokenizer.apply_chat_template(messages)
    assert full.usage.prompt_tokens == len(live.engine.tokenizer.encode(rendered, add_special_tokens=False))
    live.wait_idle()


def test_a_response_is_the_chat_answer_to_the_same_conversation(live, client):
    """On the real model: instructions and input give the chat route's prompt and its seeded answer, streamed or
    not; the usage counts the same tokens."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, seed=3, max_tokens=16)
    response = client.responses.create(model="tiny", instructions="Be brief.", input="Hello there",
                                       max_output_tokens=16, extra_body={"seed": 3})  # seed: vLLM's extension
    assert response.output_text == chat.choices[0].message.content
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                           chat.usage.completion_tokens)
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    events = list(client.responses.create(model="tiny", instructions="Be brief.", input="Hello there",
                                          max_output_tokens=16, stream=True, extra_body={"seed": 3}))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    live.wait_idle()


def test_n_choices_and_prompt_batches(live, client):
    out = client.completions.create(model="tiny", prompt=["One", "Two"], n=3, seed=1, max_tokens=6, temperature=1)
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert out.usage.completion_tokens == 36
    texts, _ = stream_text(client.completions.create(model="tiny", prompt=["One", "Two"], n=3, seed=1,
                                                     max_tokens=6, temperature=1, stream=True))
    assert texts == {c.index: c.text for c in out.choices}
    greedy = client.completions.create(model="tiny", prompt="One", n=2, max_tokens=6, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text
    live.wait_idle()


def test_logprobs_of_generated_tokens(live, client):
    out = client.completions.create(model="tiny", prompt="Hello", logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == out.choices[0].text or "\ufffd" in "".join(lp.tokens)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and chosen == pytest.approx(max(top.values()))  # greedy: the most likely
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                          top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    live.wait_idle()


def test_logprob_tokens_as_token_ids(live, client):
    """vLLM's return_tokens_as_token_ids: logprobs name each token "token_id:<id>" (completions' tokens and
    top_logprobs keys, chat's token, bytes and alternatives), the same tokens and logprobs otherwise."""
    as_ids = {"return_tokens_as_token_ids": True, "return_token_ids": True}
    out = client.completions.create(model="tiny", prompt="Hello", logprobs=3, extra_body=as_ids, **GREEDY).choices[0]
    plain = client.completions.create(model="tiny", prompt="Hello", logprobs=3, **GREEDY).choices[0]
    ids = out.model_extra["token_ids"]
    assert out.logprobs.tokens == [f"token_id:{t}" for t in ids] and plain.logprobs.tokens != out.logprobs.tokens
    assert out.logprobs.token_logprobs == plain.logprobs.token_logprobs and out.text == plain.text
    assert all(all(k.startswith("token_id:") for k in top) for top in out.logprobs.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                          top_logprobs=2, extra_body=as_ids, **GREEDY).choices[0]
    content, ids = chat.logprobs.content, chat.model_extra["token_ids"]
    assert [t.token for t in content] == [f"token_id:{t}" for t in ids]
    assert all(t.bytes == list(t.token.encode()) and all(a.token.startswith("token_id:") for a in t.top_logprobs)
               for t in content)
    live.wait_idle()


def test_logit_bias_and_allowed_token_ids_through_the_client(live, client):
    """OpenAI's logit_bias (string keys on the wire, read as vLLM reads them: Python's int()) and vLLM's
    allowed_token_ids (extra_body) steer the tokens; a request without them, sent next, is unchanged."""
    def ids(**extra):
        out = client.completions.create(model="tiny", prompt="Hello", extra_body={"return_token_ids": True,
                                                                                   **extra.pop("extra_body", {})},
                                        **GREEDY, **extra)
        return out.choices[0].model_extra["token_ids"]

    plain = ids()
    assert ids(logit_bias={"1234": 100}) == [1234] * len(plain)
    assert ids(logit_bias={"+1234": 100}) == ids(logit_bias={" 01_234 ": 100}) == [1234] * len(plain)  # as int()
    banned = ids(logit_bias={str(plain[0]): -100})
    assert banned[0] != plain[0]
    allowed = [7, 99, plain[1], 2000]
    assert set(ids(extra_body={"allowed_token_ids": allowed})) <= set(allowed)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          logit_bias={"1234": 100}, max_tokens=3, temperature=0.0,
                                          extra_body={"return_token_ids": True})
    assert chat.choices[0].model_extra["token_ids"] == [1234] * 3
    assert ids() == plain
    live.wait_idle()


def test_bad_words_through_the_client(live, client):
    """vLLM's bad_words (extra_body): the words' tokens, as the engine tokenizes them, never complete a word in
    the output; a request without them, sent next, is unchanged."""
    def text(**extra_body):
        out = client.completions.create(model="tiny", prompt="In the beginning", extra_body=extra_body, **GREEDY)
        return out.choices[0].text

    plain = text()
    first = plain.split()[0]
    steered = text(bad_words=[first])
    assert first in plain and first not in steered.split()
    assert text() == plain
    live.wait_idle()


def test_structured_outputs_through_the_client(live, client):
    """OpenAI's response_format (a JSON schema) and vLLM's choice and regex fields: the answers hold to them,
    streamed or not."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=48,
                response_format={"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}})
    whole = client.chat.completions.create(**chat).choices[0]
    texts, reasons = stream_text(client.chat.completions.create(stream=True, **chat), chat=True)
    assert (texts[0], reasons[0]) == (whole.message.content, whole.finish_reason)
    # This random model, allowed any whitespace (the default, as in vLLM), spends its tokens on newlines:
    assert whole.finish_reason == "length" and re.fullmatch(r"\{\s*", whole.message.content)
    compact = dict(chat, response_format=None,
                   extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    answer = client.chat.completions.create(**compact).choices[0]
    assert answer.finish_reason == "stop", answer.message.content
    fields = json.loads(answer.message.content)
    assert set(fields) == {"ok", "n"} and type(fields["ok"]) is bool and type(fields["n"]) is int
    picked = client.completions.create(model="tiny", prompt="Pick", logprobs=5, **GREEDY, extra_body={
        "guided_choice": ["red", "blue"], "return_tokens_as_token_ids": True}).choices[0]  # (two tokens may read alike)
    assert picked.text in ("red", "blue") and picked.finish_reason == "stop"
    # Logprobs of the masked distribution, as vLLM's: the few tokens that can start a choice share all the
    # probability (unmasked, this model's top 5 after "Pick" hold 31% of it).
    assert abs(sum(math.exp(lp) for lp in picked.logprobs.top_logprobs[0].values()) - 1) < 1e-3
    digits = client.completions.create(model="tiny", prompt="Count", n=2, seed=5, temperature=1.0, max_tokens=12,
                                       extra_body={"structured_outputs": {"regex": "[0-9]{2,5}"}})
    assert all(re.fullmatch("[0-9]{2,5}", c.text) for c in digits.choices)
    live.wait_idle()


def test_a_forced_tool_call_is_held_to_the_tool_parameters(live, client):
    """tool_choice naming a tool: the model's answer, masked on device, is JSON of the tool's parameters schema,
    returned as the call's arguments (vLLM's way; no tool-call parser is configured here). The schema asks
    llguidance for JSON without free whitespace, which this random model would otherwise fill its answer with."""
    tool = {"type": "function", "function": {"name": "paint", "parameters": {
        "type": "object", "properties": {"color": {"enum": ["red", "green"]}, "coats": {"type": "integer"}},
        "required": ["color", "coats"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}}}
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Paint it"}], tools=[tool], temperature=0, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "paint"}}).choices[0]
    (call,) = answer.message.tool_calls
    assert call.function.name == "paint" and not answer.message.content
    assert answer.finish_reason == "stop", call.function.arguments
    arguments = json.loads(call.function.arguments)
    assert arguments["color"] in ("red", "green") and type(arguments["coats"]) is int and len(arguments) == 2
    live.wait_idle()


def test_stop_strings_through_the_client(live, client):
    plain = client.completions.create(model="tiny", prompt="Once upon", **GREEDY).choices[0].text
    stop = plain[3:7]
    cut = client.completions.create(model="tiny", prompt="Once upon", stop=[stop], **GREEDY).choices[0]
    assert cut.text == plain[:plain.index(stop)] and cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop
    texts, reasons = stream_text(client.completions.create(model="tiny", prompt="Once upon", stop=stop, stream=True,
                                                           **GREEDY))
    assert texts[0] == cut.text and reasons[0] == "stop"
    live.wait_idle()


def test_models_tokenize_detokenize_version(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    ids = httpx.post(f"{live.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["tokens"] == live.engine.tokenizer.encode("Hello world") and ids["count"] == len(ids["tokens"])
    text = httpx.post(f"{live.url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text == live.engine.tokenizer.decode(ids["tokens"], skip_special_tokens=False)  # as vLLM: BOS kept
    assert text.endswith("Hello world") and text != "Hello world"  # the tiny tokenizer adds a BOS
    assert httpx.post(f"{live.url}/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    for nested in ([[5, 6]], "5", [5, "6"]):
        assert httpx.post(f"{live.url}/detokenize", json={"tokens": nested}).status_code == 400
    assert httpx.get(f"{live.url}/version").json()["version"]
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
        assert httpx.post(f"{live.url}{path}", json={**body, "model": "other"}).status_code == 404
        assert httpx.post(f"{live.url}{path}", json={**body, "model": "tiny"}).status_code == 200
    surrogate = httpx.post(f"{live.url}/tokenize", content=b'{"prompt": "\\ud800"}',
                           headers={"content-type": "application/json"})
    assert surrogate.status_code == 400 and surrogate.json()["error"]["param"] == "prompt"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    joined = [{"role": "user", "content": "Hello\nworld"}]  # vLLM joins text parts with newlines
    tokenized = [httpx.post(f"{live.url}/tokenize", json={"messages": m}).json()["tokens"] for m in (parts, joined)]
    assert tokenized[0] == tokenized[1]


def test_a_model_alias_is_served_under_the_first_name(live, client, monkeypatch):
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, model_aliases=("alias",)))
    assert [card.id for card in client.models.list().data] == ["tiny", "alias"]
    out = client.completions.create(model="alias", prompt="Hi", **GREEDY)
    assert out.model == "tiny" and out.choices[0].text
    with pytest.raises(openai.NotFoundError, match="'tiny', 'alias'"):
        client.completions.create(model="other", prompt="Hi", **GREEDY)
    live.wait_idle()


def test_a_cache_salt_is_taken(live, client):
    """vLLM's cache_salt (extra_body) reaches the engine's prefix cache (tests/test_engine.py); the output is as
    without it."""
    def text(**extra_body):
        return client.completions.create(model="tiny", prompt="In the beginning", extra_body=extra_body,
                                         **GREEDY).choices[0].text

    assert text(cache_salt="tenant-a") == text() == text(cache_salt="tenant-b")
    live.wait_idle()


def test_add_special_tokens_as_vllm(live, client):
    """vLLM's add_special_tokens: completions encode the prompt with them (the BOS) unless told not to (a prompt
    that already has them, say a chat template rendered by the client); chat does not unless told to."""
    tokenizer = live.engine.tokenizer
    def prompt_ids(route: str, **body) -> list[int]:
        out = httpx.post(f"{live.url}/v1/{route}", json={"model": "tiny", "max_tokens": 1, "return_token_ids": True,
                                                           **body}).json()
        return out["choices"][0]["prompt_token_ids"]

    assert prompt_ids("completions", prompt="Hello") == tokenizer.encode("Hello")
    assert prompt_ids("completions", prompt="Hello", add_special_tokens=False) == tokenizer.encode(
        "Hello", add_special_tokens=False) != tokenizer.encode("Hello")
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt_ids("chat/completions", messages=messages) == tokenizer.encode(rendered, add_special_tokens=False)
    assert prompt_ids("chat/completions", messages=messages, add_special_tokens=True) == tokenizer.encode(rendered)
    assert httpx.post(f"{live.url}/tokenize", json={"messages": messages, "add_special_tokens": True}).json()[
        "tokens"] == tokenizer.encode(rendered)
    live.wait_idle()


def test_chat_template_fields_render_as_transformers(live, client, monkeypatch):
    """vLLM's chat fields continue_final_message (the final message left open), tools (rendered, with tool_choice
    none; auto needs a tool-call parser: test_tool_calls.py) and chat_template (on a server that trusts request
    templates) give the prompt transformers renders, in /v1/chat/completions and /tokenize alike."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(live.engine.tokenizer.name)
    trusting = dataclasses.replace(live.server.config, trust_request_chat_template=True)
    monkeypatch.setattr(live.server, "config", trusting)
    template = ("{{ tools | tojson }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tools = [{"type": "function", "function": {"name": "paint", "parameters": {"type": "object", "properties": {}}}}]
    prefilled = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Mine is"}]
    cases = [(prefilled, {"add_generation_prompt": False, "continue_final_message": True}),
             (prefilled[:1], {"chat_template": template, "tools": tools, "tool_choice": "none"}),
             (prefilled, {"chat_template": template, "add_generation_prompt": False, "continue_final_message": True})]
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for messages, fields in cases:
            text = hf.apply_chat_template(messages, tokenize=False, **{"add_generation_prompt": True, **fields})
            ids = hf.encode(text, add_special_tokens=False)
            body = {"model": "tiny", "messages": messages, "max_tokens": 2, "return_token_ids": True, **fields}
            chat = http.post("/v1/chat/completions", json=body).json()
            assert chat["choices"][0]["prompt_token_ids"] == ids, (fields, chat)
            assert http.post("/tokenize", json={"messages": messages, **fields}).json()["tokens"] == ids
    assert text.endswith("assistant\nMine is")
    sdk = client.chat.completions.create(model="tiny", messages=prefilled[:1], max_tokens=2, tools=tools,
                                         tool_choice="none", extra_body={"chat_template": template})
    assert sdk.usage.prompt_tokens == len(hf.apply_chat_template(prefilled[:1], tools=tools, chat_template=template,
                                                                 add_generation_prompt=True)["input_ids"])


def test_a_servers_chat_template_replaces_the_checkpoints(live, monkeypatch, tmp_path):
    """vLLM's --chat-template (a file, or the template on one line with its escapes): chat requests and /tokenize
    render what transformers renders with it; a request's own template still needs the server's trust."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(live.engine.tokenizer.name)
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}→ assistant:"
    (tmp_path / "template.jinja").write_text(template, encoding="utf-8")
    one_line = template.replace("\n", "\\n")  # as a shell passes '...\n...'
    assert load_chat_template(str(tmp_path / "template.jinja")) == load_chat_template(one_line) == template
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config,
                                                                  chat_template=load_chat_template(one_line)))
    messages = [{"role": "user", "content": "Hi"}]
    ids = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)["input_ids"]
    assert ids != hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    with httpx.Client(base_url=live.url, timeout=60) as http:
        chat = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 1,
                                                       "return_token_ids": True}).json()
        assert chat["choices"][0]["prompt_token_ids"] == ids
        assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == ids
        own = http.post("/tokenize", json={"messages": messages, "chat_template": "{{ messages }}"})
        assert own.status_code == 400 and own.json()["error"]["param"] == "chat_template"
    live.wait_idle()


@pytest.mark.parametrize("value, words", [("templates/missing.jinja", "looks like a file path"),
                                          ("{% for m in messages %}", "not valid Jinja")])
def test_a_chat_template_flag_that_cannot_be_used_stops_the_start(value, words, capsys, monkeypatch):
    from jaxinfer.server import run
    monkeypatch.setattr(run, "serve", lambda *args, **kwargs: pytest.fail("the server started"))
    assert cli.main(["serve", "--chat-template", value, "--skip-warmup"]) == 2
    assert words in capsys.readouterr().err


CALL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
                 "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
                 "</call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def test_tool_call_arguments_reach_the_template_as_objects(live, monkeypatch):
    """OpenAI sends an assistant's tool-call arguments as a JSON string; tool-use templates (Llama 3.1, Qwen 2.5:
    `arguments | tojson`) expect the object, so vLLM parses it first. The prompt is transformers' rendering of the
    parsed conversation; arguments that are not JSON are 400."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(live.engine.tokenizer.name)
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, trust_request_chat_template=True))
    call = {"id": "c1", "type": "function", "function": {"name": "paint", "arguments": '{"colour": "red"}'}}
    sent = [{"role": "user", "content": "Paint it"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    parsed = [sent[0], {**sent[1], "tool_calls": [{**call, "function": {"name": "paint", "arguments": {"colour": "red"}}}]},
              sent[2]]
    ids = hf.apply_chat_template(parsed, chat_template=CALL_TEMPLATE, add_generation_prompt=True)["input_ids"]
    with httpx.Client(base_url=live.url, timeout=60) as http:
        body = {"messages": sent, "chat_template": CALL_TEMPLATE}
        assert http.post("/tokenize", json=body).json()["tokens"] == ids
        assert '{"colour": "red"}</call>' in hf.decode(ids)  # once encoded, not a string of a string
        bad = {**call, "function": {"name": "paint", "arguments": "{colour: red"}}
        answer = http.post("/v1/chat/completions", json={**body, "messages": [sent[0], {**sent[1], "tool_calls": [bad]}]})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages"
        assert "arguments must be a JSON object" in answer.json()["error"]["message"]


def test_without_a_generation_prompt_the_answer_takes_the_last_messages_role(client):
    """As vLLM: with add_generation_prompt false the model continues the last message, so the answer (and the
    first streamed chunk) carries that message's role; with a generation prompt, "assistant"."""
    messages = [{"role": "user", "content": "Once upon"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                            extra_body={"add_generation_prompt": False})
    assert answer.choices[0].message.role == "user"
    with client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, stream=True,
                                        extra_body={"add_generation_prompt": False}) as stream:
        assert next(iter(stream)).choices[0].delta.role == "user"
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].message.role \
        == "assistant"


def test_chat_template_kwargs_win_over_the_request_fields(live):
    """vLLM (and LLM.chat) update the request's template arguments with chat_template_kwargs: flags sent there
    render as if sent as fields."""
    prefilled = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Mine is"}]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    text = live.engine.tokenizer.apply_chat_template(prefilled, **flags)
    ids = live.engine.tokenizer.encode(text, add_special_tokens=False)
    with httpx.Client(base_url=live.url, timeout=60) as http:
        body = {"messages": prefilled, "chat_template_kwargs": flags}
        assert http.post("/tokenize", json=body).json()["tokens"] == ids
        chat = http.post("/v1/chat/completions", json={**body, "max_tokens": 2, "return_token_ids": True}).json()
        assert chat["choices"][0]["prompt_token_ids"] == ids
    assert text.endswith("assistant\nMine is")
    live.wait_idle()


def test_reasoning_effort_and_thinking_reach_the_chat_template(live, client, monkeypatch):
    """OpenAI's reasoning_effort (gpt-oss's template reads it) goes to the chat template as vLLM passes it, under
    chat_template_kwargs' value where both are sent; a Responses request's reasoning.effort is the same field,
    echoed back. Earlier thinking sent back reaches it as `thinking` too."""
    trusting = dataclasses.replace(live.server.config, trust_request_chat_template=True)
    monkeypatch.setattr(live.server, "config", trusting)
    template = "{{ reasoning_effort | default('unset') }}:{{ messages[-1].content }}"
    tokenizer = live.engine.tokenizer
    with httpx.Client(base_url=live.url, timeout=60) as http:
        def rendered(**extra):
            body = {"messages": [{"role": "user", "content": "Hi"}], "chat_template": template, **extra}
            return tokenizer.decode(http.post("/tokenize", json=body).json()["tokens"], skip_special_tokens=True)

        assert [rendered(), rendered(reasoning_effort="low"),
                rendered(reasoning_effort="low", chat_template_kwargs={"reasoning_effort": "high"})] == \
            ["unset:Hi", "low:Hi", "high:Hi"]
        # an assistant's thinking sent back under vLLM's names is also the `thinking` gpt-oss's template reads
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes", "reasoning": "Greet."},
                 {"role": "assistant", "content": "No", "reasoning_content": "Refuse."},
                 {"role": "assistant", "content": "Hm", "reasoning": "x", "thinking": "Own."},
                 {"role": "user", "content": "Bye", "reasoning": "not an assistant's"}]
        body = {"messages": turns, "chat_template": "{% for m in messages %}{{ m.thinking }};{% endfor %}"}
        assert tokenizer.decode(http.post("/tokenize", json=body).json()["tokens"], skip_special_tokens=True) == \
            ";Greet.;Refuse.;Own.;;"
        # a tool-call turn's null content reaches it as "", as vLLM passes it (gpt-oss's template tests `in` it)
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        body = {"messages": [turns[0], {"role": "assistant", "content": None, "tool_calls": [call]}],
                "chat_template": "{% for m in messages %}{{ 'x' in m.content }}{{ m.content | length }};{% endfor %}"}
        assert tokenizer.decode(http.post("/tokenize", json=body).json()["tokens"], skip_special_tokens=True) == \
            "False2;False0;"
    response = client.responses.create(model="tiny", input="Hi", max_output_tokens=2, reasoning={"effort": "low"})
    assert response.reasoning.effort == "low"
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="tiny", input="Hi", max_output_tokens=2, reasoning={"effort": "max"})
    assert refused.value.body["param"] == "reasoning"
    live.wait_idle()


def test_prompt_logprobs_come_back_as_vllm_returns_them(live, client):
    """vLLM's extension: completions choices carry `prompt_logprobs` (None, then {"token id": {logprob, rank,
    decoded_token}} per prompt token, the token among them), streamed in each choice's first chunk; chat puts
    them beside the choices."""
    prompt = live.engine.tokenizer.encode("The quick brown fox")

    def check(entries):
        assert entries[0] is None and len(entries) == len(prompt)
        for token, entry in zip(prompt[1:], entries[1:]):
            assert str(token) in entry and len(entry) in (2, 3)  # the top 2, and the token if not among them
            assert {"logprob", "rank", "decoded_token"} == set(entry[str(token)])
            assert entry[str(token)]["decoded_token"] == live.engine.tokenizer.token_text(token)

    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "prompt_logprobs": 2, "n": 2, "temperature": 0}
    whole = httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).json()
    for choice in whole["choices"]:
        check(choice["prompt_logprobs"])
    assert "prompt_logprobs" not in httpx.post(f"{live.url}/v1/completions", json={**body, "prompt_logprobs": None},
                                                timeout=60).json()["choices"][0]
    with httpx.stream("POST", f"{live.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    firsts = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            firsts.setdefault(choice["index"], choice)
    assert sorted(firsts) == [0, 1] and all(check(c["prompt_logprobs"]) is None for c in firsts.values())
    chat = httpx.post(f"{live.url}/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "prompt_logprobs": 1,
                                                               "messages": [{"role": "user", "content": "Hi"}],
                                                               "temperature": 0}, timeout=60).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    live.wait_idle()


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"jaxinfer:{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_follow_the_requests(live, client):
    before = httpx.get(f"{live.url}/metrics").text
    client.completions.create(model="tiny", prompt="Count me", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = httpx.get(f"{live.url}/metrics").text
    assert _metric(after, "generation_tokens_total") - _metric(before, "generation_tokens_total") == 5
    assert _metric(after, "request_success_total", finished_reason="length") - \
        _metric(before, "request_success_total", finished_reason="length") == 1
    assert _metric(after, "request_generation_tokens_sum") - _metric(before, "request_generation_tokens_sum") == 5
    for name in ("time_to_first_token_seconds_count", "request_time_per_output_token_seconds_count"):
        assert _metric(after, name) == _metric(before, name) + 1, name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_sum",
                 "request_queue_time_seconds_count", "request_prefill_time_seconds_sum",
                 "request_decode_time_seconds_bucket", "request_inference_time_seconds_count",
                 "request_time_per_output_token_seconds_count", "request_prompt_tokens_bucket",
                 "request_generation_tokens_sum"):
        assert f"jaxinfer:{name}{{" in after, name
    cfg = live.server.engine.cfg  # vLLM's cache_config_info: the KV cache's settings as labels of a gauge at 1
    info = f'block_size="{cfg.page_size}",cache_dtype="{cfg.kv_cache_dtype}",num_gpu_blocks="{cfg.num_pages}"'
    assert f'jaxinfer:cache_config_info{{model_name="tiny",{info},' in after and cfg.kv_cache_dtype == "float32"
    assert _metric(after, "cache_config_info", enable_prefix_caching="True") == 1.0


def test_a_client_that_leaves_while_sending_its_body_is_no_error(live, caplog):
    """A client gone mid-upload is routine, not a bug: no traceback in the server's log, nothing admitted, and the
    server goes on serving."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "')
        time.sleep(0.2)
    time.sleep(0.3)
    serves_normally(live.url)
    live.wait_idle()
    assert not [r for r in caplog.records if r.name.startswith("jaxinfer") and r.levelname == "ERROR"], caplog.text


def test_reset_prefix_cache_route(live, client):
    """vLLM's POST /reset_prefix_cache: 409 with an error body while a request streams, 200 when idle; after it a
    repeated prompt is computed again, and gives the same tokens."""
    prompt = "A prompt long enough to fill whole pages of the cache, " * 6

    def complete() -> tuple[str, float]:
        text = client.completions.create(model="tiny", prompt=prompt, **GREEDY).choices[0].text
        return text, _metric(httpx.get(f"{live.url}/metrics").text, "prefix_cache_hits_total")

    body = {"model": "tiny", "prompt": "Keep the engine busy", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: a closed line iterator would close the stream, and abort
        next(line for line in lines if line.startswith("data: {"))
        busy = httpx.post(f"{live.url}/reset_prefix_cache", timeout=30)
    assert busy.status_code == 409 and busy.json()["error"]["type"] == "ConflictError", busy.text
    live.wait_idle()
    first, hits = complete()
    second, cached_hits = complete()
    assert cached_hits > hits and second == first
    assert httpx.post(f"{live.url}/reset_prefix_cache", timeout=30).status_code == 200
    third, after_reset = complete()
    assert after_reset == cached_hits and third == first


# --- disconnects and overload ----------------------------------------------------------------


def _gauges(live) -> tuple[float, float]:
    text = httpx.get(f"{live.url}/metrics").text
    return _metric(text, "num_requests_running"), _metric(text, "num_requests_waiting")


def test_disconnect_mid_stream_aborts_and_frees(live):
    body = {"model": "tiny", "prompt": "Stream then vanish", "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 10
    while _gauges(live) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gauges(live) == (0, 0)
    live.wait_idle()
    assert live.engine.stats().finished_requests.get("abort", 0) >= 1
    serves_normally(live.url)


async def _until(condition, failure: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.01)


def test_disconnect_while_queued_and_while_waiting_for_a_whole_answer(live):
    async def scenario():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            hogs = [asyncio.create_task(http.post("/v1/completions", json={
                "prompt": f"Hog {i}", "max_tokens": 360, "temperature": 0, "ignore_eos": True}))
                for i in range(ENGINE.max_slots)]
            await _until(lambda: live.engine.stats().num_running == ENGINE.max_slots, "the hogs never all ran")
            queued = [asyncio.create_task(http.post("/v1/completions", json={
                "prompt": f"Queued {i}", "max_tokens": 50, "stream": i % 2 == 0})) for i in range(4)]
            await _until(lambda: live.engine.stats().num_waiting == 4, "the queued ones never waited for a slot")
            assert not any(hog.done() for hog in hogs)
            for task in hogs + queued:
                task.cancel()  # closes the connections: running and queued requests alike
            await asyncio.gather(*hogs, *queued, return_exceptions=True)

    asyncio.run(scenario())
    live.wait_idle(timeout=20)
    assert _gauges(live) == (0, 0)
    serves_normally(live.url)


def test_overload_gets_429_and_the_rest_complete():
    server = LiveServer(ServerConfig(max_queue=2))
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                calls = [http.post("/v1/completions", json={"prompt": f"Burst {i}", "max_tokens": 8,
                                                            "temperature": 0}) for i in range(40)]
                return await asyncio.gather(*calls)

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429} and codes.count(200) >= ENGINE.max_slots + 2
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "RateLimitError"
        assert all(len(r.json()["choices"][0]["text"]) > 0 for r in responses if r.status_code == 200)
        server.wait_idle()
        serves_normally(server.url)
    finally:
        server.close()


# --- scheduling seen through HTTP ------------------------------------------------------------


def test_kv_exhaustion_preempts_with_unchanged_greedy_outputs(live):
    prompts = [f"Preempt me {i}" for i in range(4)]
    body = dict(model="tiny", max_tokens=80, temperature=0, ignore_eos=True)
    alone = [httpx.post(f"{live.url}/v1/completions", json={**body, "prompt": p}, timeout=120).json()
             for p in prompts]
    tight = LiveServer(ServerConfig(served_model_name="tiny"), engine=dataclasses.replace(ENGINE, num_pages=16))
    try:
        async def together():
            async with httpx.AsyncClient(base_url=tight.url, timeout=300) as http:
                return await asyncio.gather(*[http.post("/v1/completions", json={**body, "prompt": p})
                                              for p in prompts])

        crowded = [r.json() for r in asyncio.run(together())]
        assert [c["choices"][0]["text"] for c in crowded] == [a["choices"][0]["text"] for a in alone]
        assert _metric(httpx.get(f"{tight.url}/metrics").text, "num_preemptions_total") > 0
        tight.wait_idle()
        serves_normally(tight.url)
    finally:
        tight.close()


def test_long_prefill_does_not_stall_running_streams(live):
    """Chunked prefill: while a 320-token prompt is prefilled in 64-token chunks, a running stream keeps
    receiving tokens."""
    async def scenario():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            arrivals = []

            async def stream():
                body = {"prompt": "Keep going", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.monotonic())

            running = asyncio.create_task(stream())
            while len(arrivals) < 2:
                await asyncio.sleep(0.01)
            sent = time.monotonic()
            long_prompt = list(np.random.default_rng(0).integers(10, 1000, 320))
            response = await http.post("/v1/completions", json={"prompt": [int(t) for t in long_prompt],
                                                                "max_tokens": 1, "stream": True})
            first_token = time.monotonic()
            await running
            return arrivals, sent, first_token, response

    arrivals, sent, first_token, response = asyncio.run(scenario())
    assert response.status_code == 200
    during = [t for t in arrivals if sent < t < first_token]
    assert len(during) >= 3, "the running stream stalled while the long prompt was prefilled"
    live.wait_idle()
    serves_normally(live.url)


# --- lm-evaluation-harness scoring against transformers ---------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama3")
    model = build("llama3", directory)
    engine = load_engine(directory, EngineConfig(max_slots=2, page_size=8, prefill_chunk=32, max_model_len=96))
    server = LiveServer(ServerConfig(served_model_name="scored"), engine_object=engine)
    yield server, model
    server.close()


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_loglikelihood_request_matches_transformers(scored, max_tokens):
    server, model = scored
    prompts = [[1, 17, 99, 4, 250, 31, 8, 64, 5, 77], [1, 200, 3]]
    body = {"model": "scored", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0}
    answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    for prompt, choice in zip(prompts, answer.json()["choices"]):
        lp = choice["logprobs"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0].double()
        expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].numpy()
        assert len(lp["token_logprobs"]) == len(prompt) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:len(prompt)], expected, rtol=1e-4, atol=1e-4)
        assert lp["tokens"][:len(prompt)] == [f"token_id:{t}" for t in prompt]  # no tokenizer files: ids
        assert all(len(top) >= 1 for top in lp["top_logprobs"][1:])
        assert answer.json()["usage"]["completion_tokens"] == 2 * max_tokens
    server.wait_idle()


def test_streamed_sse_format_is_exact(live):
    body = {"model": "tiny", "prompt": "Format", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    raw = httpx.post(f"{live.url}/v1/completions", json=body).text
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-2])


def test_return_token_ids_streamed_and_not(live):
    body = {"model": "tiny", "prompt": "Ids please", "max_tokens": 9, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(f"{live.url}/v1/completions", json=body).json()["choices"][0]
    assert len(whole["token_ids"]) == 9
    assert whole["prompt_token_ids"] == live.engine.tokenizer.encode("Ids please")
    assert live.engine.tokenizer.decode(whole["token_ids"]) == whole["text"]
    raw = httpx.post(f"{live.url}/v1/completions", json={**body, "stream": True}).text
    chunks = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e.startswith("data: {")]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == whole["token_ids"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == whole["prompt_token_ids"]
