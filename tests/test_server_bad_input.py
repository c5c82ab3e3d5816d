"""SERVING.md's "Bad input and faults" cases 1-11, 15, 20 and 21, sent over HTTP to a real server.

Each test sends the bad input to a `LiveServer` (uvicorn in a thread over the embedded 4-layer llama),
checks the status and the OpenAI-style error body, and then that a normal request still succeeds and
that every KV page and slot went back to the pool. Cases 12-14 and 16-19 live in another file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import time

import httpx
import pytest

from jaxinfer.llm import load_engine
from jaxinfer.model.checkpoint import DEFAULT_MODEL_DIR
from jaxinfer.server.app import ServerConfig
from live_server import ENGINE, LiveServer

CONCURRENT = 1000  # case 21: identical greedy requests sent at once (about 50 s here on 2 CPU cores)
MAX_MODEL_LEN = ENGINE.max_model_len
VOCAB = 4096  # the embedded default model's
COMPLETIONS, CHAT, RESPONSES = "/v1/completions", "/v1/chat/completions", "/v1/responses"
HI = [{"role": "user", "content": "Hi"}]


def serving(live: LiveServer):
    """A module fixture's body: the server until the module is done."""
    yield live
    live.close()


def client_of(live: LiveServer):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def server():
    yield from serving(LiveServer(ServerConfig(max_queue=CONCURRENT)))  # case 21's burst is admitted, not 429


@pytest.fixture(scope="module")
def client(server):
    yield from client_of(server)


# --- helpers -------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    """The OpenAI error body: status, the four fields, `param` naming the field (unless "any"), and a
    short message with no traceback and no echo of a large input."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["code"] == status and isinstance(error["type"], str) and error["type"]
    if param != "any":
        assert error["param"] == param, error
    message = error["message"]
    assert isinstance(message, str) and 0 < len(message) <= 500, message[:600]
    assert "Traceback" not in message and 'File "' not in message, message
    return error


def assert_serves(server: LiveServer) -> None:
    """After the bad input: the server is healthy, answers a normal request, and leaked nothing."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        r = c.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text[:500]
        assert r.json()["usage"]["completion_tokens"] == 3
    server.wait_idle()


def post_raw(client: httpx.Client, body: bytes | str, path: str = COMPLETIONS) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def stream_events(client: httpx.Client, body: dict, path: str = COMPLETIONS) -> list[dict]:
    """The SSE payloads of a streamed request, checking the framing and the final [DONE]."""
    events = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()[:500]
        data = [line for line in r.iter_lines() if line]
    assert data[-1] == "data: [DONE]", data[-3:]
    for line in data[:-1]:
        assert line.startswith("data: "), line
        event = json.loads(line[len("data: "):])
        assert "error" not in event, event
        events.append(event)
    return events


def streamed_text(events: list[dict], chat: bool = False) -> tuple[list[str], dict]:
    """(the text pieces of the (single) choice in order, its last chunk's choice)."""
    pieces, last = [], None
    for event in events:
        for choice in event["choices"]:
            pieces.append((choice["delta"].get("content") or "") if chat else choice["text"])
            last = choice
    return pieces, last


def body_with(extra: dict, path: str) -> dict:
    base = {"prompt": "Hello", "max_tokens": 2} if path == COMPLETIONS else {"messages": HI, "max_tokens": 2}
    return {**base, **extra}


# --- 1. malformed JSON, bad UTF-8, wrong types ----------------------------------------------------

MALFORMED = {
    "truncated": b'{"prompt": "Hello", "max_tokens": ',
    "not json": b"Hello there",
    "empty body": b"",
    "trailing garbage": b'{"prompt": "Hello"} x',
    "single quotes": b"{'prompt': 'Hello'}",
    "non-UTF-8 bytes": b'{"prompt": "caf\xe9 \xff\xfe"}',
    "UTF-16 body": '{"prompt": "Hello"}'.encode("utf-16"),
    "array body": b'["Hello"]',
    "string body": b'"Hello"',
    "null body": b"null",
    "integer of 5000 digits": b'{"prompt": "Hello", "max_tokens": ' + b"1" * 5000 + b"}",
}


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, RESPONSES])
@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_1_malformed_body_is_400(server, client, body, path):
    assert_error(post_raw(client, body, path), 400)


WRONG_TYPES = [
    (COMPLETIONS, {"max_tokens": "ten"}, "max_tokens"),
    (COMPLETIONS, {"n": 1.5}, "n"),
    (COMPLETIONS, {"n": "2"}, "n"),
    (COMPLETIONS, {"temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"temperature": True}, "temperature"),
    (COMPLETIONS, {"top_p": [0.5]}, "top_p"),
    (COMPLETIONS, {"stream": "yes"}, "stream"),
    (COMPLETIONS, {"echo": 1}, "echo"),
    (COMPLETIONS, {"ignore_eos": "false"}, "ignore_eos"),
    (COMPLETIONS, {"prompt": 5}, "prompt"),
    (COMPLETIONS, {"prompt": {"text": "Hello"}}, "prompt"),
    (COMPLETIONS, {"prompt": ["Hello", 5]}, "prompt"),
    (COMPLETIONS, {"prompt": [[5], "Hello"]}, "prompt"),
    (COMPLETIONS, {"prompt": "\ud800 lone surrogate"}, "prompt"),
    (COMPLETIONS, {"stop": 5}, "stop"),
    (COMPLETIONS, {"stop": ["ok", 5]}, "stop"),
    (COMPLETIONS, {"logprobs": "3"}, "logprobs"),
    (COMPLETIONS, {"seed": 1.5}, "seed"),
    (COMPLETIONS, {"model": 5}, "model"),
    (COMPLETIONS, {"model": "\ud800"}, "model"),
    (COMPLETIONS, {"stream": True, "stream_options": "usage"}, "stream_options"),
    (COMPLETIONS, {"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    (CHAT, {"max_tokens": "ten"}, "max_tokens"),
    (CHAT, {"n": 1.5}, "n"),
    (CHAT, {"messages": "Hi"}, "messages"),
    (CHAT, {"messages": [{"role": 5, "content": "Hi"}]}, "messages"),
    (CHAT, {"messages": [{"role": "", "content": "Hi"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "\udfff"}]}, "messages"),
    (CHAT, {"logprobs": "yes"}, "logprobs"),
    (CHAT, {"chat_template_kwargs": "x"}, "chat_template_kwargs"),
    (CHAT, {"chat_template_kwargs": ""}, "chat_template_kwargs"),  # falsy wrong types too
    (CHAT, {"chat_template_kwargs": []}, "chat_template_kwargs"),
    (CHAT, {"reasoning_effort": "max"}, "reasoning_effort"),
    (CHAT, {"reasoning_effort": 1}, "reasoning_effort"),
    (CHAT, {"continue_final_message": "yes"}, "continue_final_message"),
    (CHAT, {"tools": {"type": "function"}}, "tools"),
    (CHAT, {"tools": ["paint"]}, "tools"),
    (CHAT, {"chat_template": 5}, "chat_template"),
    (CHAT, {"chat_template_kwargs": {"add_generation_prompt": "no"}}, "add_generation_prompt"),
    (COMPLETIONS, {"stop_token_ids": 0}, "stop_token_ids"),
    (COMPLETIONS, {"stop_token_ids": ""}, "stop_token_ids"),
    (CHAT, {"stop_token_ids": {}}, "stop_token_ids"),
]


@pytest.mark.parametrize("path, extra, param", WRONG_TYPES, ids=[f"{p[4:]}-{next(iter(e))}={e[next(iter(e))]!r:.20}"
                                                                   for p, e, _ in WRONG_TYPES])
def test_1_wrong_type_is_400_naming_the_field(server, client, path, extra, param):
    body = json.dumps(body_with(extra, path))  # json escapes lone surrogates as \udXXX, as a client would
    error = assert_error(post_raw(client, body, path), 400, param)
    assert error["type"] == "BadRequestError"


def test_1_server_still_serves(server):
    assert_serves(server)


# --- 2. missing or empty prompt -------------------------------------------------------------------

EMPTY = {"missing": None, "empty string": "", "empty list": [], "list of empty string": [""],
         "list with an empty string": ["Hello", ""], "list of empty list": [[]], "null": "null"}


@pytest.mark.parametrize("prompt", EMPTY.values(), ids=EMPTY.keys())
def test_2_missing_or_empty_prompt_is_400(server, client, prompt):
    body = {"max_tokens": 2}
    if prompt is not None:
        body["prompt"] = None if prompt == "null" else prompt
    assert_error(client.post(COMPLETIONS, json=body), 400, "prompt")
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("messages", [None, [], [{"content": "Hi"}]], ids=["missing", "empty", "no role"])
def test_2_missing_or_empty_messages_is_400(server, client, messages):
    body = {"max_tokens": 2} if messages is None else {"max_tokens": 2, "messages": messages}
    assert_error(client.post(CHAT, json=body), 400, "messages")


def test_2_server_still_serves(server):
    assert_serves(server)


# --- 3. token ids outside the vocabulary ----------------------------------------------------------

BAD_IDS = {"negative": [5, -1], "vocab size": [5, VOCAB], "huge": [5, 10**30], "in second prompt": [[5, 6], [VOCAB]],
           "float": [5, 6.5], "bool": [5, True], "string in ids": [5, "6"]}


@pytest.mark.parametrize("prompt", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_3_token_ids_out_of_range_are_400(server, client, prompt):
    assert_error(client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 2}), 400, "prompt")


def test_3_edges_of_the_vocabulary_are_accepted_and_the_engine_survives(server, client):
    r = client.post(COMPLETIONS, json={"prompt": [0, VOCAB - 1], "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2
    assert_error(client.post("/detokenize", json={"tokens": [VOCAB]}), 400, "tokens")
    assert_serves(server)


# --- 4. context length ---------------------------------------------------------------------------


def test_4_prompt_plus_max_tokens_exactly_the_context_is_accepted(server, client):
    prompt = [7] * (MAX_MODEL_LEN - 4)
    r = client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 4, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"] == {"prompt_tokens": MAX_MODEL_LEN - 4, "completion_tokens": 4,
                                 "total_tokens": MAX_MODEL_LEN}
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert_serves(server)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_4_one_token_over_names_max_tokens(server, client, path):
    if path == COMPLETIONS:
        body = {"prompt": [7] * (MAX_MODEL_LEN - 4), "max_tokens": 5}
    else:
        ids = client.post("/tokenize", json={"messages": HI}).json()["count"]
        body = {"messages": HI, "max_tokens": MAX_MODEL_LEN - ids + 1}
    error = assert_error(client.post(path, json=body), 400, "max_tokens")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]


@pytest.mark.parametrize("length", [MAX_MODEL_LEN, MAX_MODEL_LEN + 1, 5000])
def test_4_prompt_at_or_over_the_context_is_400(server, client, length):
    error = assert_error(client.post(COMPLETIONS, json={"prompt": [7] * length, "max_tokens": 1}), 400, "prompt")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens, your request has {length} input tokens" \
        in error["message"]


def test_4_long_text_prompt_and_long_chat_are_400(server, client):
    text = "hello world " * 400
    error = assert_error(client.post(COMPLETIONS, json={"prompt": text, "max_tokens": 1}), 400, "prompt")
    assert "maximum context length" in error["message"]
    messages = [{"role": "user", "content": text}]
    error = assert_error(client.post(CHAT, json={"messages": messages, "max_tokens": 1}), 400, "messages")
    assert "maximum context length" in error["message"]
    assert_serves(server)


def test_4_truncate_prompt_tokens_keeps_the_last_tokens_or_names_itself(server, client):
    """vLLM's truncate_prompt_tokens: a prompt over the context is served as its last k tokens; k over the
    context is 400 naming the field; the text of a truncated chat or completion is the kept tokens'."""
    ids = list(range(10, 10 + MAX_MODEL_LEN + 50))
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0, "return_token_ids": True}
    cut = client.post(COMPLETIONS, json={**body, "truncate_prompt_tokens": 20})
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == 20 and cut.json()["choices"][0]["prompt_token_ids"] == ids[-20:]
    alone = client.post(COMPLETIONS, json={**body, "prompt": ids[-20:]}).json()
    assert cut.json()["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"]
    error = assert_error(client.post(COMPLETIONS, json={**body, "truncate_prompt_tokens": MAX_MODEL_LEN + 1}), 400,
                         "truncate_prompt_tokens")
    assert "greater than the maximum context length" in error["message"]
    echo = client.post(COMPLETIONS, json={"prompt": "hello world<|im_end|> again", "max_tokens": 1, "echo": True,
                                          "truncate_prompt_tokens": 3, "return_token_ids": True}).json()["choices"][0]
    assert echo["text"].startswith(server.engine.tokenizer.decode(echo["prompt_token_ids"], skip_special_tokens=False))
    assert "<|im_end|>" in echo["text"]  # the kept tokens' text, special tokens included, as the uncut prompt's
    messages = [{"role": "user", "content": "hello world " * 400}]
    chat = client.post(CHAT, json={"messages": messages, "max_tokens": 1, "truncate_prompt_tokens": 30})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 30
    assert_serves(server)


def test_4_priority_reaches_the_engine(server, client, monkeypatch):
    """vLLM's request priority (lower first) is the scheduler's; the engine receives it with each prompt."""
    seen = []
    add = server.server.engine.add_request
    monkeypatch.setattr(server.server.engine, "add_request",
                        lambda *a, **k: seen.append(k.get("priority")) or add(*a, **k))
    for path in (COMPLETIONS, CHAT):
        assert client.post(path, json=body_with({"priority": -3, "n": 2}, path)).status_code == 200
    assert client.post(COMPLETIONS, json=body_with({}, COMPLETIONS)).status_code == 200
    assert seen == [-3, -3, 0]


# --- 5. max_tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [0, -1, -(10**20), 10**6, 10**20, 1e300])
def test_5_bad_max_tokens_is_400(server, client, max_tokens):
    assert_error(client.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": max_tokens}), 400, "max_tokens")


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, 10**20])
def test_5_bad_max_tokens_in_chat_is_400(server, client, name, value):
    assert_error(client.post(CHAT, json={"messages": HI, name: value}), 400, name)


def test_5_max_tokens_zero_with_echo_scores_the_prompt(server, client):
    r = client.post(COMPLETIONS, json={"prompt": "Hello world", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == "Hello world" and body["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert len(choice["logprobs"]["token_logprobs"]) == body["usage"]["prompt_tokens"]


def test_5_null_max_tokens_is_the_default_16(server, client):
    r = client.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": None, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    r = client.post(COMPLETIONS, json={"prompt": "Hello", "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    assert_serves(server)


# --- 6. sampling parameters -----------------------------------------------------------------------

BAD_SAMPLING = [
    ("temperature", "-1"), ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"),
    ("temperature", "2.5"), ("temperature", "1e400"), ("temperature", "1" + "0" * 400),
    ("top_p", "0"), ("top_p", "1.5"), ("top_p", "-0.5"), ("top_p", "NaN"),
    ("top_k", "-2"), ("top_k", "1.5"), ("top_k", '"5"'),
    ("min_p", "-0.1"), ("min_p", "1.1"), ("min_p", "NaN"),
    ("presence_penalty", "2.5"), ("presence_penalty", "-2.5"),
    ("frequency_penalty", "2.5"), ("frequency_penalty", "-2.5"), ("frequency_penalty", "Infinity"),
    ("repetition_penalty", "0"), ("repetition_penalty", "-1"), ("repetition_penalty", "NaN"),
]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("name, raw", BAD_SAMPLING, ids=[f"{n}={v[:12]}" for n, v in BAD_SAMPLING])
def test_6_bad_sampling_parameter_is_400(server, client, name, raw, path):
    base = json.dumps(body_with({}, path))[:-1]
    body = f'{base}, "{name}": {raw}}}'  # raw JSON text: NaN and Infinity literals as clients send them
    assert_error(post_raw(client, body, path), 400, name)


# Values at or just inside the bounds. A top_k beyond the vocabulary keeps every token; it must never reach
# the device's int32 sampling row as it is (10**12 would overflow it in the engine thread and kill the engine).
EDGE_SAMPLING = [{"temperature": 2.0}, {"temperature": 1e-300}, {"top_p": 1.0}, {"top_p": 1e-6}, {"top_k": -1},
                 {"top_k": 0}, {"top_k": 1}, {"top_k": VOCAB}, {"top_k": 10**12}, {"min_p": 0.0}, {"min_p": 1.0},
                 {"presence_penalty": -2.0, "frequency_penalty": 2.0}, {"repetition_penalty": 2.0},
                 {"repetition_penalty": 1e-3}]


@pytest.mark.parametrize("extra", EDGE_SAMPLING, ids=[json.dumps(e) for e in EDGE_SAMPLING])
def test_6_edge_sampling_parameters_are_accepted(server, client, extra):
    r = client.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True, "seed": 1, **extra})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").status_code == 200


def test_6_temperature_zero_is_greedy_and_deterministic(server, client):
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    texts = [client.post(COMPLETIONS, json={**body, **extra}).json()["choices"][0]["text"]
             for extra in ({}, {}, {"seed": 7}, {"top_p": 0.5, "top_k": 3})]
    assert len(set(texts)) == 1 and texts[0], texts
    # greedy: each generated token is the model's top choice
    r = client.post(COMPLETIONS, json={**body, "logprobs": 1}).json()["choices"][0]
    assert r["text"] == texts[0]
    for token, logprob, top in zip(r["logprobs"]["tokens"], r["logprobs"]["token_logprobs"],
                                   r["logprobs"]["top_logprobs"]):
        assert logprob == pytest.approx(max(top.values()), abs=1e-5), (token, top)
    assert_serves(server)


# --- 7. n ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, 17, 10**9])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_7_n_outside_1_to_the_cap_is_400(server, client, n, path):
    error = assert_error(client.post(path, json=body_with({"n": n}, path)), 400, "n")
    assert "16" in error["message"]  # says what would be right


def test_7_n_times_prompts_beyond_what_the_server_ever_runs_is_400(server, client):
    body = {"prompt": ["Hello"] * (CONCURRENT // 16 + 1), "n": 16, "max_tokens": 2}
    assert_error(client.post(COMPLETIONS, json=body), 400, "prompt")


def test_7_n_at_the_cap_is_served(server, client):
    r = client.post(COMPLETIONS, json={"prompt": "Hello", "n": 16, "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text[:500]
    assert sorted(c["index"] for c in r.json()["choices"]) == list(range(16))
    assert_serves(server)


# --- 8. the other bounded fields -----------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "paint", "parameters": {"type": "object", "properties": {}}}}
BAD_FIELDS = [
    (COMPLETIONS, {"logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"logprobs": -1}, "logprobs"),
    (COMPLETIONS, {"prompt_logprobs": 21}, "prompt_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    (COMPLETIONS, {"stop": ""}, "stop"),
    (COMPLETIONS, {"stop": ["ok", ""]}, "stop"),
    (CHAT, {"stop": [""]}, "stop"),
    (COMPLETIONS, {"stop_token_ids": [-1]}, "stop_token_ids"),
    (COMPLETIONS, {"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    (COMPLETIONS, {"stop_token_ids": [5, "6"]}, "stop_token_ids"),
    (COMPLETIONS, {"stop_token_ids": 5}, "stop_token_ids"),
    (CHAT, {"stop_token_ids": [10**20]}, "stop_token_ids"),
    (COMPLETIONS, {"min_tokens": 3}, "min_tokens"),  # max_tokens is 2
    (COMPLETIONS, {"min_tokens": -1}, "min_tokens"),
    (CHAT, {"max_tokens": None, "min_tokens": 10**12}, "min_tokens"),  # no max_tokens: bounded by the context
    (COMPLETIONS, {"stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"seed": 2**63}, "seed"),
    (COMPLETIONS, {"seed": -(2**63) - 1}, "seed"),
    (CHAT, {"seed": 10**30}, "seed"),
    (COMPLETIONS, {"min_tokens": 1, "stop_token_ids": list(range(30, 50))}, "min_tokens"),  # > 16 held back
    (CHAT, {"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    (CHAT, {"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt defaults to true
    (CHAT, {"chat_template_kwargs": {"continue_final_message": True}}, "continue_final_message"),  # as if a field
    (CHAT, {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "draw"}}}, "tool_choice"),
    (CHAT, {"tools": [TOOL], "tool_choice": {"type": "function", "name": "paint"}}, "tool_choice"),
    (CHAT, {"tools": [TOOL], "tool_choice": {"function": {"name": "paint"}}}, "tool_choice"),
    (CHAT, {"tools": [{"type": "function", "function": {"parameters": {}}}], "tool_choice": "required"}, "tools"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "foo"}}}],
            "tool_choice": "required"}, "tools"),  # a schema the grammar engine refuses
    (CHAT, {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    (CHAT, {"chat_template": "{{ messages }}"}, "chat_template"),  # this server does not trust request templates
    (CHAT, {"chat_template_kwargs": {"chat_template": "{{ messages }}"}}, "chat_template"),
    (COMPLETIONS, {"cache_salt": ""}, "cache_salt"),
    (CHAT, {"cache_salt": 5}, "cache_salt"),
    (COMPLETIONS, {"bad_words": "the"}, "bad_words"),  # a list, as vLLM's pydantic model takes it
    (COMPLETIONS, {"bad_words": ["the", 5]}, "bad_words"),
    (CHAT, {"bad_words": ["  "]}, "bad_words"),
    (COMPLETIONS, {"bad_words": ["word " * 40]}, "bad_words"),  # 40 tokens: more than a word may have
    (COMPLETIONS, {"logit_bias": [5, 1]}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {"x": 1}}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {"5.5": 1}}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
    (CHAT, {"logit_bias": {"-1": 1}}, "logit_bias"),
    (CHAT, {"logit_bias": {"5": "high"}}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {"5": None}}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {str(t): 1 for t in range(1025)}}, "logit_bias"),  # over 1,024 ids
    (COMPLETIONS, {"allowed_token_ids": 5}, "allowed_token_ids"),
    (COMPLETIONS, {"allowed_token_ids": []}, "allowed_token_ids"),
    (CHAT, {"allowed_token_ids": [VOCAB]}, "allowed_token_ids"),
    (CHAT, {"allowed_token_ids": ["5"]}, "allowed_token_ids"),
    # Structured outputs that cannot be read, or more than one kind at once:
    (CHAT, {"response_format": {"type": "json_schema"}}, "response_format"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    (CHAT, {"response_format": {"type": "xml"}}, "response_format"),
    (COMPLETIONS, {"response_format": "json"}, "response_format"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    (COMPLETIONS, {"guided_json": "{not json"}, "guided_json"),
    (COMPLETIONS, {"guided_choice": []}, "guided_choice"),
    (COMPLETIONS, {"guided_choice": "yes"}, "guided_choice"),
    (CHAT, {"guided_regex": "[0-9"}, "guided_regex"),
    (CHAT, {"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    (CHAT, {"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
    (CHAT, {"structured_outputs": {"choices": ["a"]}}, "structured_outputs"),
    (CHAT, {"structured_outputs": ["a"]}, "structured_outputs"),
    (CHAT, {"structured_outputs": {"json": {}, "whitespace_pattern": " "}}, "structured_outputs"),
    (CHAT, {"structured_outputs": {"json": {}, "disable_additional_properties": "yes"}}, "structured_outputs"),
    (COMPLETIONS, {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    (CHAT, {"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
    (COMPLETIONS, {"suffix": "\n    return x"}, "suffix"),  # fill-in-the-middle would need the model's FIM tokens
    (COMPLETIONS, {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    (CHAT, {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    (COMPLETIONS, {"truncate_prompt_tokens": "5"}, "truncate_prompt_tokens"),
    (COMPLETIONS, {"priority": 1.5}, "priority"),
    (CHAT, {"priority": 2**63}, "priority"),
]


@pytest.mark.parametrize("path, extra, param", BAD_FIELDS, ids=[f"{p[4:]}-{json.dumps(e)[:40]}"
                                                                 for p, e, _ in BAD_FIELDS])
def test_8_out_of_bounds_field_is_400(server, client, path, extra, param):
    assert_error(client.post(path, json=body_with(extra, path)), 400, param)


EDGE_FIELDS = [
    (COMPLETIONS, {"logprobs": 20}), (CHAT, {"logprobs": True, "top_logprobs": 20}),
    (COMPLETIONS, {"stop_token_ids": [0, VOCAB - 1]}), (COMPLETIONS, {"min_tokens": 2}),
    (CHAT, {"max_tokens": None, "min_tokens": 2, "stop": ["\n"]}),
    (CHAT, {"messages": [*HI, {"role": "ipython", "content": "42"}]}),  # a role beyond OpenAI's, as vLLM takes
    (COMPLETIONS, {"seed": 2**63 - 1}), (COMPLETIONS, {"seed": -(2**63)}),
    # Integral floats, as pydantic's lax mode takes them for vLLM's int fields:
    (COMPLETIONS, {"logprobs": 2.0, "n": 2.0, "stop_token_ids": [3.0], "prompt_logprobs": 1.0}),
    (CHAT, {"logprobs": True, "top_logprobs": 2.0}),
    (COMPLETIONS, {"stream": True, "stream_options": {"include_usage": True}}),
    (COMPLETIONS, {"logit_bias": {"0": -100, str(VOCAB - 1): 1e30}}),  # clamped to [-100, 100], as vLLM does
    (CHAT, {"allowed_token_ids": [0, VOCAB - 1], "logit_bias": {}}),
    (CHAT, {"response_format": {"type": "text"}, "guided_json": None}),  # no constraint
    (CHAT, {"response_format": {"type": "json_object"}}), (COMPLETIONS, {"guided_choice": ["yes", "no"]}),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}),
    (COMPLETIONS, {"structured_outputs": {"regex": "[0-9]+", "disable_any_whitespace": True}}),
    (CHAT, {"structured_outputs": {"json": {"type": "object"}, "disable_additional_properties": True}}),
    (COMPLETIONS, {"structured_outputs": {  # vLLM's whole object, as a client that serializes it sends it
        "json": None, "regex": "[0-9]+", "choice": None, "grammar": None, "json_object": None, "disable_fallback": False,
        "disable_any_whitespace": False, "disable_additional_properties": False, "whitespace_pattern": None,
        "structural_tag": None}}),
    (CHAT, {"guided_grammar": 'start: "a"+', "guided_decoding_backend": "xgrammar"}),  # the backend is ours to pick
    (CHAT, {"tools": [TOOL], "tool_choice": "required"}),
    (CHAT, {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "paint"}}}),
    (COMPLETIONS, {"suffix": ""}), (COMPLETIONS, {"suffix": None}), (CHAT, {"suffix": "x"}),
    (COMPLETIONS, {"priority": -5, "truncate_prompt_tokens": -1}), (CHAT, {"priority": 2**63 - 1}),
]


@pytest.mark.parametrize("path, extra", EDGE_FIELDS, ids=[f"{p[4:]}-{json.dumps(e)[:40]}" for p, e in EDGE_FIELDS])
def test_8_values_at_the_bounds_are_accepted(server, client, path, extra):
    body = body_with(extra, path)
    if body.get("stream"):
        events = stream_events(client, body, path)
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 2
    else:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text[:500]
    assert client.get("/health").status_code == 200


BAD_TEMPLATES = {
    "syntax error": ({"chat_template": "{% for m in messages %}{{ m.content }"}, "chat_template", "not valid Jinja"),
    "raises": ({"chat_template": "{{ raise_exception('no system role here') }}"}, "messages", "no system role here"),
    "drops the message to continue": ({"chat_template": "{% for m in messages %}{{ m.content | upper }}{% endfor %}",
                                       "messages": [*HI, {"role": "assistant", "content": "Hello"}],
                                       "add_generation_prompt": False, "continue_final_message": True},
                                      "messages", "final message does not appear"),
    "recurses forever": ({"chat_template": "{% macro r() %}{{ r() }}{% endmacro %}{{ r() }}"}, "messages",
                         "recursion"),
    "divides by zero": ({"chat_template": "{{ 1 / (messages | length - 1) }}"}, "messages", "division by zero"),
}


@pytest.mark.parametrize("extra, param, message", BAD_TEMPLATES.values(), ids=BAD_TEMPLATES.keys())
def test_8_request_template_that_cannot_render_is_400(server, client, monkeypatch, extra, param, message):
    """On a server that trusts request templates: a template that fails to compile or to render is the
    request's fault; the engine goes on."""
    monkeypatch.setattr(server.server, "config",
                        dataclasses.replace(server.server.config, trust_request_chat_template=True))
    for path in (CHAT, "/tokenize"):
        error = assert_error(client.post(path, json=body_with(extra, CHAT)), 400, param)
        assert message in error["message"], error
    assert_serves(server)


def test_8_server_still_serves(server):
    assert_serves(server)


# --- 9. huge and deeply nested bodies ------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_9_many_megabytes_is_413_fast(server, client, chunked):
    big = b'{"prompt": "' + b"a" * (64 * 2**20) + b'"}'
    content = (big[i:i + 2**16] for i in range(0, len(big), 2**16)) if chunked else big
    start = time.monotonic()
    r = client.post(COMPLETIONS, content=content, headers={"content-type": "application/json"})
    assert time.monotonic() - start < 10
    error = assert_error(r, 413, None)
    assert "a" * 100 not in error["message"]


NESTED = {"100000 [": b"[" * 100_000, "100000 [ closed": b"[" * 100_000 + b"]" * 100_000,
          "prompt 100000 deep": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
          "prompt 900 deep": b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}",
          "object 50000 deep": b'{"a":' * 50_000 + b"1" + b"}" * 50_000}


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, RESPONSES])
@pytest.mark.parametrize("body", NESTED.values(), ids=NESTED.keys())
def test_9_deeply_nested_json_is_400_fast(server, client, body, path):
    start = time.monotonic()
    assert_error(post_raw(client, body, path), 400)
    assert time.monotonic() - start < 5


LARGE = "a" * 2**20
LARGE_VALUES = [
    (COMPLETIONS, {"model": LARGE}, 404, "model"),
    (COMPLETIONS, {"max_tokens": LARGE}, 400, "max_tokens"),
    (COMPLETIONS, {"stop": [LARGE, ""]}, 400, "stop"),
    (COMPLETIONS, {"prompt": [5] * 500_000 + [-1]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hello world " * 40_000}, 400, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "hello world " * 40_000}]}, 400, "messages"),
]


@pytest.mark.parametrize("path, extra, status, param", LARGE_VALUES,
                         ids=[f"{p[4:]}-{next(iter(e))}" for p, e, _, _ in LARGE_VALUES])
def test_9_large_bad_values_are_not_echoed(server, client, path, extra, status, param):
    start = time.monotonic()
    error = assert_error(client.post(path, json=body_with(extra, path)), status, param)
    assert time.monotonic() - start < 5
    assert "a" * 200 not in error["message"] and "hello world " * 20 not in error["message"]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_9_nesting_at_the_recursion_limit_is_never_a_500(server, client, path):
    """Depths around where json.loads gives up: whatever parses must not recurse too deeply later on."""
    for depth in range(950, 1000):
        nested = "[" * depth + "]" * depth
        for field in ("prompt" if path == COMPLETIONS else "messages", "stop", "user"):
            body = json.dumps(body_with({"max_tokens": 1}, path))[:-1] + f', "{field}": {nested}}}'
            r = post_raw(client, body, path)
            if field == "user":  # an unknown field, ignored
                assert r.status_code in (200, 400), r.text[:300]
            else:
                assert_error(r, 400)


def test_9_server_still_serves(server):
    assert_serves(server)


@pytest.fixture(scope="module")
def noisy_server(tmp_path_factory):
    """Random weights of the embedded model's shape, with its tokenizer: unlike the trained model (which
    never saw a non-ASCII byte), its samples are full of byte-fallback pieces of multi-byte characters."""
    directory = tmp_path_factory.mktemp("noisy")
    for path in DEFAULT_MODEL_DIR.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, directory / path.name)
    yield from serving(LiveServer(ServerConfig(), engine_object=load_engine(directory / "config.json", ENGINE)))


@pytest.fixture(scope="module")
def noisy_client(noisy_server):
    yield from client_of(noisy_server)


# --- 10. stop strings spanning token boundaries --------------------------------------------------


def straddling_stop(tokens: list[str], text: str) -> tuple[str, int]:
    """A stop string made of the end of one generated token and the start of the next, whose first
    occurrence in `text` is at that boundary, at least 8 tokens in (so several chunks stream before it)
    -> (stop, where it starts in text)."""
    offset = 0
    for k in range(1, len(tokens)):
        offset += len(tokens[k - 1])
        head, tail = tokens[k - 1][-2:], tokens[k][:2]
        stop = head + tail
        if k >= 8 and len(tokens[k - 1]) > 0 and tail and "\ufffd" not in stop and stop.strip() \
                and text.find(stop) == offset - len(head):
            return stop, offset - len(head)
    raise AssertionError(f"no token boundary of {tokens} makes a unique stop string")


def text_and_tokens(client: httpx.Client, path: str, body: dict) -> tuple[str, list[str]]:
    """The first choice's text and its tokens' texts, with logprobs asked for as each route spells it."""
    logprobs = {"logprobs": 0} if path == COMPLETIONS else {"logprobs": True}
    full = client.post(path, json={**body, **logprobs}).json()["choices"][0]
    if path == COMPLETIONS:
        return full["text"], full["logprobs"]["tokens"]
    return full["message"]["content"], [t["token"] for t in full["logprobs"]["content"]]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_10_stop_string_across_tokens_is_found_and_trimmed(noisy_server, noisy_client, path):
    server, client = noisy_server, noisy_client  # varied greedy text: the trained model repeats phrases
    body = body_with({"max_tokens": 24, "temperature": 0, "ignore_eos": True}, path)
    body = {**body, "prompt": "Once upon a time"} if path == COMPLETIONS else body
    text, tokens = text_and_tokens(client, path, body)
    assert "".join(tokens) == text  # byte-level BPE: each token decodes alone to its own piece
    stop, at = straddling_stop(tokens, text)

    stops = ["never appears \u2603", stop]  # stop_reason says which one matched
    r = client.post(path, json={**body, "stop": stops}).json()["choices"][0]
    got = r["text"] if path == COMPLETIONS else r["message"]["content"]
    assert (got, r["finish_reason"], r["stop_reason"]) == (text[:at], "stop", stop)

    pieces, last = streamed_text(stream_events(client, {**body, "stop": stops}, path), chat=path == CHAT)
    assert "".join(pieces) == text[:at], pieces  # nothing of the stop string leaked into an earlier chunk
    assert len([p for p in pieces if p]) > 1, pieces
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)

    included = client.post(path, json={**body, "stop": stop, "include_stop_str_in_output": True}).json()
    choice = included["choices"][0]
    assert (choice["text"] if path == COMPLETIONS else choice["message"]["content"]) == text[:at + len(stop)]
    assert_serves(server)


# --- 11. emoji, CJK and byte tokens while streaming ----------------------------------------------

UNICODE_PROMPTS = ["你好，世界！今天天气很好。", "🚀🌍👩‍👩‍👧‍👦 emoji 😀😃", "日本語のテキスト と 한국어 텍스트 🎉"]


def has_byte_pieces(tokens: list[str]) -> bool:
    """A token that is part of a multi-byte character decodes alone to U+FFFD."""
    return any("\ufffd" in t for t in tokens)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_11_streamed_unicode_has_no_broken_characters(noisy_server, noisy_client, path):
    server, client = noisy_server, noisy_client
    seen_byte_tokens = False
    for i, prompt in enumerate(UNICODE_PROMPTS):
        for seed in range(2):
            base = {"prompt": prompt} if path == COMPLETIONS else {"messages": [{"role": "user", "content": prompt}]}
            # sampled, not greedy: a random model's samples are full of byte tokens; the seed makes them repeatable
            body = {**base, "max_tokens": 32, "temperature": 1.0, "seed": 1000 * i + seed, "ignore_eos": True}
            text, tokens = text_and_tokens(client, path, body)
            seen_byte_tokens |= has_byte_pieces(tokens)
            pieces, _ = streamed_text(stream_events(client, body, path), chat=path == CHAT)
            assert "".join(pieces) == text, (pieces, text)
            assert len([p for p in pieces if p]) > 1, pieces  # really streamed in pieces
            if "\ufffd" not in text:
                assert not any("\ufffd" in p for p in pieces), pieces
    assert seen_byte_tokens, "no generated token was part of a multi-byte character: the test proves nothing"
    assert_serves(server)


def test_11_unicode_echo_and_stop_string_stream_cleanly(server, client):
    prompt = "中文 🚀 test"
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "echo": True, "ignore_eos": True}
    full = client.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
    assert full.startswith(prompt)
    pieces, _ = streamed_text(stream_events(client, body))
    assert "".join(pieces) == full


# --- 15. a request that could never fit in the KV pool ------------------------------------------


@pytest.fixture(scope="module")
def tiny_pool_server():
    yield from serving(LiveServer(ServerConfig(), engine=dataclasses.replace(ENGINE, num_pages=5)))


@pytest.mark.parametrize("body", [
    {"prompt": "Hello", "max_tokens": 100},  # 4 usable pages of 16 tokens hold 64
    {"prompt": [7] * 70, "max_tokens": 1},
    {"prompt": "Hello", "max_tokens": 100, "stream": True},
    {"prompt": "Hello", "max_tokens": 100, "n": 2},
], ids=["long generation", "long prompt", "streamed", "n=2"])
def test_15_request_that_can_never_fit_is_400_not_a_wait(tiny_pool_server, body):
    start = time.monotonic()
    with httpx.Client(base_url=tiny_pool_server.url, timeout=30) as c:
        error = assert_error(c.post(COMPLETIONS, json=body), 400)
    assert time.monotonic() - start < 10
    assert re.search(r"needs \d+ KV pages of 16 tokens; the whole pool has 4", error["message"]), error
    assert_serves(tiny_pool_server)


def test_15_requests_that_fit_alone_but_not_together_all_finish(tiny_pool_server):
    with httpx.Client(base_url=tiny_pool_server.url, timeout=60) as c:
        r = c.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 40, "n": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] == 3 * 40
    assert_serves(tiny_pool_server)


# --- 20. API key ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    yield from serving(LiveServer(ServerConfig(api_key="sekrit")))


GUARDED = [("POST", COMPLETIONS, {"prompt": "Hello", "max_tokens": 2}),
           ("POST", CHAT, {"messages": HI, "max_tokens": 2}),
           ("POST", RESPONSES, {"input": "Hi", "max_output_tokens": 2}), ("GET", "/v1/models", None),
           ("POST", "/reset_prefix_cache", None)]
WRONG_KEYS = {"missing": None, "wrong": "Bearer sekrit2", "prefix": "Bearer sekri", "empty": "Bearer",
              "no scheme": "sekrit", "basic scheme": "Basic sekrit", "case": "Bearer SEKRIT"}


@pytest.mark.parametrize("method, path, body", GUARDED, ids=[p for _, p, _ in GUARDED])
def test_20_v1_routes_need_the_key(keyed_server, method, path, body):
    with httpx.Client(base_url=keyed_server.url, timeout=60) as c:
        for name, header in WRONG_KEYS.items():
            headers = {} if header is None else {"Authorization": header}
            error = assert_error(c.request(method, path, json=body, headers=headers), 401, None)
            assert "sekrit" not in error["message"], name
        if method == "POST":  # the key is checked before the body is read
            assert_error(c.post(path, content=b"{not json", headers={"Authorization": "Bearer x"}), 401)
        r = c.request(method, path, json=body, headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200, r.text[:500]
        r = c.request(method, path, json=body, headers={"authorization": "bearer sekrit"})
        assert r.status_code == 200, r.text[:500]


def test_20_health_and_metrics_stay_open(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/metrics")
        assert r.status_code == 200 and "jaxinfer:num_requests_running" in r.text
    keyed_server.wait_idle()


# --- 21. many identical concurrent greedy requests -----------------------------------------------


def finished_counts(client: httpx.Client) -> dict[str, float]:
    counts = {}
    for line in client.get("/metrics").text.splitlines():
        match = re.match(r'jaxinfer:request_success_total\{.*finished_reason="(\w+)".*\} (\S+)$', line)
        if match:
            counts[match.group(1)] = float(match.group(2))
    return counts


async def send_all(url: str, body: dict, count: int) -> list[httpx.Response | BaseException]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        return await asyncio.gather(*(c.post(COMPLETIONS, json=body) for _ in range(count)), return_exceptions=True)


def test_21_identical_concurrent_greedy_requests(server, client):
    body = {"prompt": "The same question, asked again and again:", "max_tokens": 3, "temperature": 0,
            "ignore_eos": True}
    alone = client.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
    server.wait_idle()
    before = finished_counts(client)
    responses = asyncio.run(send_all(server.url, body, CONCURRENT))
    failures = [r for r in responses if not isinstance(r, httpx.Response)]
    assert not failures, failures[:3]
    statuses = [r.status_code for r in responses]
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == CONCURRENT, sorted(set(statuses))
    assert not refused  # max_queue admits the whole burst
    assert {r.json()["choices"][0]["text"] for r in ok} == {alone}
    assert {r.json()["choices"][0]["finish_reason"] for r in ok} == {"length"}
    server.wait_idle(timeout=30)
    after = finished_counts(client)
    delta = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    assert delta.get("length", 0) + delta.get("stop", 0) == len(ok), delta
    assert sum(delta.values()) == CONCURRENT - len(refused), delta  # success + aborted = sent
    assert_serves(server)
