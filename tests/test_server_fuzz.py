"""Random request bodies against a real server: whatever a client sends to /v1/completions, /v1/chat/completions
or /v1/responses, the answer is a result or an OpenAI-style 4xx error, never a 500 or a broken stream, and the
server keeps serving with every page and slot back in the pool.

Each body starts from a valid request and sets a few fields, drawn from the server's own lists of fields it
knows (and a few it does not), to a value drawn either from values a client would plausibly send there or from
any JSON at all (NaN and Infinity too, which Python's JSON reader takes). Derandomized in the suite (the same examples every run); `HYPOTHESIS_SERVER_FUZZ=N` runs N
fresh ones.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinfer.server import protocol, responses
from live_server import LiveServer
from test_server_bad_input import assert_error, assert_serves, serving

COMPLETIONS, CHAT, RESPONSES = "/v1/completions", "/v1/chat/completions", "/v1/responses"
BASES = {COMPLETIONS: {"prompt": "In the beginning", "max_tokens": 4},
         CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
         RESPONSES: {"input": "Hi", "max_output_tokens": 4}}
FIELDS = {COMPLETIONS: sorted(protocol._COMPLETION_FIELDS) + ["not_a_field"],
          CHAT: sorted(protocol._CHAT_FIELDS) + ["not_a_field"],
          RESPONSES: sorted({*responses._PASSED, *responses._REFUSED, "input", "instructions", "max_output_tokens",
                             "text", "tools", "tool_choice", "reasoning", "include", "store", "metadata",
                             "truncation", "top_logprobs", "user", "not_a_field"})}
SMALL = st.integers(-2, 6)
TOKENS = st.lists(st.integers(-1, 4100), max_size=4)
PLAUSIBLE = {  # values a client might mean, right or wrong, to reach past the first type check
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": SMALL, "min_p": st.floats(-0.5, 1.5),
    "n": SMALL, "max_tokens": SMALL, "max_completion_tokens": SMALL, "max_output_tokens": SMALL,
    "min_tokens": SMALL, "logprobs": st.one_of(st.booleans(), SMALL), "top_logprobs": SMALL,
    "prompt_logprobs": SMALL, "seed": st.integers(-1, 2**64), "stop": st.one_of(st.text(max_size=3),
                                                                                 st.lists(st.text(max_size=3))),
    "stop_token_ids": TOKENS, "allowed_token_ids": TOKENS, "bad_words": st.lists(st.text(max_size=5), max_size=3),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "5", "-1", "x", "99999"]), st.floats(-200, 200),
                                  max_size=3),
    "stream": st.booleans(), "echo": st.booleans(), "ignore_eos": st.booleans(), "use_beam_search": st.booleans(),
    "length_penalty": st.floats(-2, 2), "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "json_schema"},
                                        {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}]),
    "structured_outputs": st.sampled_from([{"regex": "[a-z]+"}, {"choice": ["yes", "no"]}, {"json": {}},
                                           {"grammar": "root ::= \"a\""}, {"regex": "("}]),
    "guided_choice": st.lists(st.text(max_size=3), max_size=3), "guided_regex": st.sampled_from(["a|b", "[", ""]),
    "truncate_prompt_tokens": st.integers(-2, 5), "priority": st.integers(-3, 3),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3), "cache_salt": st.text(max_size=4),
    "prompt": st.one_of(st.text(max_size=8), TOKENS, st.lists(TOKENS, max_size=3), st.lists(st.text(max_size=4))),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool",
                                                                         "robot"])},
                                               optional={"content": st.one_of(st.text(max_size=5), st.none())}),
                         max_size=3),
    "input": st.one_of(st.text(max_size=5), st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=5)}), max_size=2)),
    "tools": st.sampled_from([[], [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                              [{"type": "function"}], [{"type": "web_search"}]]),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "f"}}]),
}
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),  # NaN, Infinity too
                              st.text(max_size=6)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3)),
                    max_leaves=6)


@st.composite
def requests(draw):
    path = draw(st.sampled_from(list(BASES)))
    body = dict(BASES[path])
    for name in draw(st.lists(st.sampled_from(FIELDS[path]), min_size=1, max_size=4, unique=True)):
        plausible = PLAUSIBLE.get(name)
        body[name] = draw(plausible if plausible is not None and draw(st.booleans()) else JSON)
    return path, body


@pytest.fixture(scope="module")
def server():
    yield from serving(LiveServer())


FRESH = int(os.environ.get("HYPOTHESIS_SERVER_FUZZ", "0"))


def _check(client: httpx.Client, path: str, body: dict) -> None:
    # Python's encoder writes NaN and Infinity, which Python's decoder (the server's) reads back.
    raw = {"content": json.dumps(body), "headers": {"content-type": "application/json"}}
    if body.get("stream") is True:
        with client.stream("POST", path, **raw) as r:
            if r.status_code != 200:
                r.read()
                assert_error(r, r.status_code)
                assert r.status_code in (400, 404), (r.status_code, body)
                return
            lines = [line for line in r.iter_lines() if line]
        assert lines and lines[-1] == "data: [DONE]" if path != RESPONSES else lines, (body, lines[-3:])
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: "):])
                assert "error" not in event or path == RESPONSES, (body, event)
        return
    r = client.post(path, **raw)
    if r.status_code == 200:
        answer = r.json()
        assert "choices" in answer or "output" in answer, (body, answer)
        return
    assert r.status_code in (400, 404), (r.status_code, body, r.text[:300])
    assert_error(r, r.status_code)


@settings(max_examples=FRESH or 120, deadline=None, database=None, derandomize=not FRESH,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_random_bodies_get_a_result_or_a_4xx(server, request):
    path, body = request
    with httpx.Client(base_url=server.url, timeout=120) as client:
        _check(client, path, body)


def test_the_server_serves_after_the_random_bodies(server):
    assert_serves(server)
