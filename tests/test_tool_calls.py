"""Tool calls parsed out of chat answers, as vLLM's --enable-auto-tool-choice --tool-call-parser NAME does.

The parsers on strings (non-streaming, and streaming fed the same text in every kind of split); then the
server through the official `openai` client. The tiny test model cannot be made to write a tool call, so the
server's engine here runs a scripted executor (the seam between scheduling and execution): each sequence
"samples" the token ids of a script the test chose, then EOS. Everything else is the real code path: the
request's parsing and chat template, the engine's scheduler and incremental detokenizer (with the
skip_special_tokens the parser asks for), the server's streaming and JSON, HTTP.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import types

import httpx
import numpy as np
import openai
import pytest

from jaxinfer import cli
from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.scheduler import StepResult
from jaxinfer.engine.structured import GrammarCompiler
from jaxinfer.model.checkpoint import DEFAULT_MODEL_DIR
from jaxinfer.server.app import Server, ServerConfig
from jaxinfer.server.reasoning import PARSERS as REASONING_PARSERS
from jaxinfer.server.reasoning import ReasoningStream, reasoning_tokens
from jaxinfer.server.tool_calls import PARSERS, ToolCall, ToolCallStream
from jaxinfer.tokenizer import Tokenizer
from live_server import LiveServer

WEATHER = {"city": "Zürich", "days": [1, 2], "options": {"unit": "°C", "note": "rain 🌧", "nested": {"deep": [{}]}}}
CALL = json.dumps({"name": "get_weather", "arguments": WEATHER}, ensure_ascii=False)
HERMES_ANSWER = f"Let me check.\n<tool_call>\n{CALL}\n</tool_call>"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "the forecast",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What's the weather in Zürich?"}]


def call(name: str, arguments) -> ToolCall:
    """A call as vLLM reports it: the arguments re-serialized by json.dumps(ensure_ascii=False)."""
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


# (parser, model output, content, calls)
CASES = [
    ("hermes", f"<tool_call>{CALL}</tool_call>", None, [call("get_weather", WEATHER)]),
    ("hermes", HERMES_ANSWER, "Let me check.\n", [call("get_weather", WEATHER)]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
               '{"x": [1, {"y": null}]}}\n</tool_call>', None, [call("a", {}), call("b", {"x": [1, {"y": None}]})]),
    ("hermes", 'Two: <tool_call>{"name": "a", "arguments": {"q": "\\u00e9\\"<tool_call>"}}</tool_call> and <tool_call>'
               '{"name": "b", "arguments": {}}', "Two: ", [call("a", {"q": 'é"<tool_call>'}), call("b", {})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": 1}</tool_call>', None, []),  # malformed: all content
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b"}</tool_call>', None, []),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": 1', None, []),  # cut off mid-call
    ("hermes", "Use <tool_call> tags, like <tool_call>this</tool_call>.", None, []),
    ("hermes", "No calls here, just a < and a <tool", None, []),
    ("hermes", "", None, []),
    ("llama3_json", '{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + "}", None,
     [call("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "arguments": {"x": 1}}; {"name": "b", "parameters": {}}', None,
     [call("a", {"x": 1}), call("b", {})]),
    ("llama3_json", '\n {"name": "a", "parameters": {"s": "日本"}} ;{"name": "b", "parameters": []}', None,
     [call("a", {"s": "日本"}), call("b", [])]),
    ("llama3_json", '{"name": "a", "parameters": {}}\n{"name": "b", "parameters": {"x": 1}}, {"name": "c", '
                    '"arguments": {}}', None, [call("a", {}), call("b", {"x": 1}), call("c", {})]),  # as vLLM reads
    ("llama3_json", '[{"name": "a", "parameters": {}}, {"name": "b", "arguments": {"y": "ü"}}] thanks', None,
     [call("a", {}), call("b", {"y": "ü"})]),  # a list of calls; text after the calls is dropped
    ("llama3_json", "[]", None, []),
    ("llama3_json", "[1, 2] are numbers", None, []),
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}', None, []),  # malformed
    ("llama3_json", '{"name": "a"}', None, []),  # no parameters
    ("llama3_json", '{"function": "a", "parameters": {}}', None, []),  # no name
    ("llama3_json", 'I would call {"name": "a", "parameters": {}}', None, []),  # not an answer made of calls
    ("llama3_json", "<|python_tag|>print('hi')", None, []),  # Llama's code-interpreter form is no JSON call
    ("llama3_json", "  <|python_", None, []),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"x": "ü"}}, {"name": "b", "arguments": {}}]', None,
     [call("a", {"x": "ü"}), call("b", {})]),
    ("mistral", 'Sure [TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}] [/TOOL]', "Sure ", [call("a", {"x": 1})]),
    ("mistral", 'So [TOOL_CALLS][{"name": "a", "arguments": {"x": 1}', 'So [{"name": "a", "arguments": {"x": 1}', []),
    ("mistral", "[TOOL_CALLS][]", "[]", []),  # as vLLM: content without the control token
    ("mistral", "Plain [TOOL_ answer", None, []),
    ("pythonic", f"[get_weather(city={WEATHER['city']!r}, days={WEATHER['days']!r}, options={WEATHER['options']!r}), "
                 "now()]", None, [call("get_weather", WEATHER), call("now", {})]),
    ("pythonic", "[a(x=-1.5, y=None, z=True, s='it\\'s [a(x=1)]', k={1: 'one'})]", None,
     [call("a", {"x": -1.5, "y": None, "z": True, "s": "it's [a(x=1)]", "k": {"1": "one"}})]),
    ("pythonic", "[a(1)]", None, []),  # a positional argument
    ("pythonic", "[a(x=b)]", None, []),  # not a literal
    ("pythonic", "[a(x=1 + 2)]", None, []),
    ("pythonic", "[os.system(cmd='ls')]", None, []),  # not a plain name
    ("pythonic", "[a(**{'x': 1})]", None, []),
    ("pythonic", "[a(x=1)] is what I would call", None, []),
    ("pythonic", " [a(x=1)]", None, []),  # not from the first character
    ("pythonic", "[]", None, []),
    ("pythonic", "[a(x=1", None, []),  # cut off
    ("pythonic", "[a(x=b'1')]", None, []),  # bytes: no JSON
    ("pythonic", "The answer is [4].", None, []),
    ("llama4_pythonic", "<|python_start|>[a(x='ü'), b()]<|python_end|>", None, [call("a", {"x": "ü"}), call("b", {})]),
    ("llama4_pythonic", "[b(y=[])]", None, [call("b", {"y": []})]),
    ("llama4_pythonic", "<|python_start|>print('hi')<|python_end|>", None, []),
    # Qwen3-Coder's XML calls; without the tools' schemas every value is text (typed: test_xml_calls_typed...)
    ("qwen3_coder", "Let me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>", "Let me look.\n",
     [call("get_weather", {"city": "Zürich", "days": "3"})]),
    ("qwen3_coder", "<tool_call><function=a><parameter=x>1 < 2</parameter></function></tool_call><tool_call>"
                    "<function=b></function>", None, [call("a", {"x": "1 < 2"}), call("b", {})]),  # last unclosed
    ("qwen3_coder", "<tool_call><function=a><parameter=x>one<parameter=y>two", None,
     [call("a", {"x": "one", "y": "two"})]),  # cut off: parameters closed by the next or by the end
    ("qwen3_coder", "<tool_call>{\"name\": \"a\"}</tool_call>", None, []),  # no <function=...>: content
    ("qwen3_coder", "Plain <tool_ answer", None, []),
    ("seed_oss", "<seed:tool_call>\n<function=get_weather>\n<parameter=city>Zürich</parameter>\n</function>\n"
                 "</seed:tool_call>", None, [call("get_weather", {"city": "Zürich"})]),
    ("seed_oss", "<tool_call><function=a></function></tool_call>", None, []),  # another model's tags
    # GLM-4.5 to 4.7's: without the tools' schemas every value is read as JSON or a literal, else kept as text
    ("glm45", "Let me look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Zürich</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>", "Let me look.\n",
     [call("get_weather", {"city": "Zürich", "days": [1, 2]})]),
    ("glm47", "<tool_call>a<arg_key>x</arg_key><arg_value>{'k': None, 'v': 1.5}</arg_value></tool_call>"
              "<tool_call>b</tool_call>", None, [call("a", {"x": {"k": None, "v": 1.5}}), call("b", {})]),
    ("glm45", " \n<tool_call>a\n<arg_key>q</arg_key><arg_value>1 < 2</arg_value></tool_call>", None,
     [call("a", {"q": "1 < 2"})]),  # whitespace before the call is no content, as vLLM's
    ("glm45", "<tool_call>a\n<arg_key>x</arg_key>\n<arg_value>1", None, []),  # cut off: no call, all content
    ("glm45", "<tool_call>\n</tool_call>", None, []),  # no name
    ("glm45", " \n", None, []),
    # ERNIE 4.5's: JSON in closed tags, the newlines before the first call dropped from the content
    ("ernie45", f"Checking.\n\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>{{\"name\": \"b\"}}</tool_call>",
     "Checking.", [call("get_weather", WEATHER), call("b", {})]),
    ("ernie45", f"\n<tool_call>\n{CALL}\n</tool_call>\n", None, [call("get_weather", WEATHER)]),
    ("ernie45", f"<tool_call>\n{CALL}\n", None, []),  # unclosed: content
    ("ernie45", "<tool_call>{\"name\": \"a\", \"arguments\": {</tool_call>", None, []),  # not JSON: content
    ("ernie45", "Line one.\n\nLine two.\n", None, []),
    # DeepSeek-V3/R1, V3.1 and Kimi K2: the arguments' text passed on as it is, content before the section
    ("deepseek_v3", f"Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                    f"{json.dumps(WEATHER, indent=1, ensure_ascii=False)}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>"
                    "function<｜tool▁sep｜>b\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "Checking.",
     [ToolCall("get_weather", json.dumps(WEATHER, indent=1, ensure_ascii=False)), ToolCall("b", "{}")]),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>a\n```json\n{\"x\"", None, []),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Zürich\"}"
                     "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", None, [ToolCall("get_weather", '{"city": "Zürich"}')]),
    ("kimi_k2", "Let me see.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                "<|tool_call_argument_begin|>{\"city\": \"Zürich\"}<|tool_call_end|><|tool_call_begin|>functions.b:1"
                "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>", "Let me see.",
     [ToolCall("get_weather", '{"city": "Zürich"}'), ToolCall("b", "{}")]),
    ("kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>functions.a<|tool_call_argument_begin|>{}", None, []),
]


SCHEMA_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
    "o": {"type": "object"}, "a": {"type": "array"}, "maybe": {"type": ["integer", "null"]}}}}}


@pytest.mark.parametrize("values, arguments", [
    ({"s": "007", "i": "7", "n": "2.5", "b": "True", "maybe": "null"},
     {"s": "007", "i": 7, "n": 2.5, "b": True, "maybe": None}),
    ({"n": "4", "o": '{"k": [1, 2]}', "a": "[1, 'two', None]", "unknown": "5"},
     {"n": 4, "o": {"k": [1, 2]}, "a": [1, "two", None], "unknown": "5"}),
    ({"i": "seven", "b": "yes", "o": "{broken", "a": "[b'x']", "s": "null"},  # no such values: the text stays
     {"i": "seven", "b": "yes", "o": "{broken", "a": "[b'x']", "s": "null"}),
])
def test_xml_calls_typed_by_the_tools_schemas(values, arguments):
    """As vLLM's qwen3_coder parser: each value as its parameter's schema types it, the text where it names none
    or the value is no such thing."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
    text = f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>"
    assert PARSERS["qwen3_coder"].for_tools([SCHEMA_TOOL]).parse(text).calls == [call("f", arguments)]


@pytest.mark.parametrize("parser", ["glm45", "glm47"])
def test_glm_calls_typed_by_the_tools_schemas(parser):
    """As vLLM's glm45 parser: a string parameter's value as it is (spaces kept); any other read as JSON, else as a
    Python literal, else its stripped text; a tool the request does not name reads every value so."""
    values = {"s": " 007 ", "i": "7", "o": ' {"k": [1]}', "a": "[1, 'two', None]", "t": " plain ", "b": "true"}
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in values.items())
    want = {"s": " 007 ", "i": 7, "o": {"k": [1]}, "a": [1, "two", None], "t": "plain", "b": True}
    tools = [SCHEMA_TOOL]
    assert PARSERS[parser].for_tools(tools).parse(f"<tool_call>f\n{body}</tool_call>").calls == [call("f", want)]
    assert PARSERS[parser].for_tools(tools).parse(f"<tool_call>g\n{body}</tool_call>").calls == \
        [call("g", {**want, "s": "007"})]


def test_kimi_k2_calls_keep_their_own_ids():
    """Kimi K2's templates give each call's id back to the model (functions.NAME:INDEX): the response carries it."""
    text = ("<|tool_calls_section_begin|><|tool_call_begin|> functions.get_weather:3 <|tool_call_argument_begin|>{}"
            "<|tool_call_end|><|tool_calls_section_end|>")
    (found,) = PARSERS["kimi_k2"].parse(text).calls
    assert found.json("chatcmpl-tool-x") == {"id": "functions.get_weather:3", "type": "function",
                                             "function": {"name": "get_weather", "arguments": "{}"}}
    assert PARSERS["deepseek_v31"].parse(text.replace("<|", "<").replace("|>", ">")).calls == []


def expected(case) -> tuple[str | None, list[ToolCall]]:
    _, text, content, calls = case
    if calls:
        return content, calls
    return (text if content is None else content), []  # without calls the text is content (all, unless given)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}:{c[1][:30]}")
def test_parse(case):
    parser, text = PARSERS[case[0]], case[1]
    parsed = parser.parse(text)
    assert (parsed.content, parsed.calls) == expected(case)


def splits(text: str, rng: random.Random):
    """The text cut into pieces: one character at a time, whole, and random cuts."""
    yield list(text)
    yield [text]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def stream(parser, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    """Content and calls as a stream gives them for the text arriving in these pieces."""
    tool_stream, text, content = ToolCallStream(parser), "", ""
    for piece in pieces:
        text += piece
        content += tool_stream.advance(text)
    rest, calls = tool_stream.finish(text)
    return content + rest, calls


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}:{c[1][:30]}")
def test_streaming_gives_the_non_streamed_answer_in_every_split(case):
    parser, text = PARSERS[case[0]], case[1]
    content, calls = expected(case)
    rng = random.Random(text)
    for pieces in splits(text, rng):
        assert stream(parser, pieces) == (content or "", calls), pieces


@pytest.mark.parametrize("name, text, sent", [
    ("hermes", "Let me check.\n<tool", "Let me check.\n"),  # a marker that may be arriving is held back
    ("hermes", "Let me check.\n<tool_call>\n{", "Let me check.\n"),
    ("hermes", "Plain text, no call", "Plain text, no call"),
    ("mistral", "Plain [TOOL_CALL", "Plain "),
    ("llama3_json", "\n <|pyth", ""),
    ("llama3_json", '{"name": "a"', ""),
    ("llama3_json", "Hello {", "Hello {"),
    ("pythonic", "[a(x=", ""),
    ("pythonic", "Hello [", "Hello ["),
    ("llama4_pythonic", "<|python_st", ""),
    ("llama4_pythonic", "<|python_start|>", ""),
    ("llama4_pythonic", "<|python_start|>[a(", ""),
    ("llama4_pythonic", "<|pyt then text", "<|pyt then text"),
    ("glm45", "Sure.\n<tool_", "Sure.\n"),
    ("glm45", " \n", ""),  # whitespace alone waits: it is no content if a call follows
    ("glm45", " \nSure <tool_call>a\n", " \nSure "),
    ("ernie45", "Checking.\n\n", "Checking."),  # newlines wait: a call may follow
    ("ernie45", "Checking.\n\nMore", "Checking.\n\nMore"),
])
def test_streaming_sends_content_as_soon_as_it_cannot_be_a_call(name, text, sent):
    tool_stream = ToolCallStream(PARSERS[name])
    assert "".join(tool_stream.advance(text[:k]) for k in range(1, len(text) + 1)) == sent


# --- through the server ----------------------------------------------------------------------------------------


class ScriptedExecutor:
    """The model replaced by a script: sequence i of each request "samples" the ids of scripts[i % len(scripts)]
    one by one, then EOS. The engine around it runs as ever."""

    def __init__(self, eos: int):
        self.eos, self.scripts = eos, [[]]

    def _token(self, seq, known: int) -> int:
        """The token after `known` tokens of the sequence (prompt and generated)."""
        script = self.scripts[seq.index % len(self.scripts)]
        k = known - len(seq.prompt_ids)
        return script[k] if k < len(script) else self.eos

    def dispatch(self, plan) -> StepResult:
        tokens = np.full((max(plan.num_steps, 1), len(plan.positions)), -1, np.int32)
        for chunk in plan.prefills:
            if chunk.sample:
                tokens[0, chunk.slot] = self._token(plan.seqs[chunk.slot], chunk.start + len(chunk.tokens))
        for slot in np.flatnonzero(plan.steps):
            for i in range(plan.steps[slot]):
                tokens[i, slot] = self._token(plan.seqs[slot], int(plan.positions[slot]) + i + 1)
        return StepResult(tokens)

    def collect(self, handle: StepResult) -> StepResult:
        return handle


@pytest.fixture(scope="module")
def live():
    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    cfg = EngineConfig(max_slots=4, page_size=16, num_pages=128, max_model_len=1024, prefill_chunk=64,
                       decode_steps=4, dtype="float32", attention_backend="reference")
    executor = ScriptedExecutor(tokenizer.eos_id)
    engine = Engine(cfg, executor, tokenizer.vocab_size, tokenizer, tokenizer.eos_ids)
    server = LiveServer(ServerConfig(served_model_name="tiny", tool_call_parser="hermes"), engine_object=engine)
    server.executor = executor
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def script(live, *answers: str | list[int]) -> None:
    """What the model answers next: choice i of a request gets answers[i % len(answers)] (text or token ids)."""
    live.executor.scripts = [a if isinstance(a, list) else ids(live.engine.tokenizer, a) for a in answers]


def ids(tokenizer, text: str) -> list[int]:
    """Token ids that continue a prompt ending in a newline (as the chat template's does) with exactly `text`:
    encoded after a newline, so sentencepiece adds no word-start space."""
    newline = tokenizer.encode("\n", add_special_tokens=False)
    return tokenizer.encode("\n" + text, add_special_tokens=False)[len(newline):]


def assembled(chunks) -> dict[int, dict]:
    """Per choice: the content, tool calls and finish reason the openai client's deltas add up to, with every
    call's id, type and name checked to come once, in its first fragment."""
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"content": "", "calls": {}, "finish_reason": None})
            got["content"] += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                if tc.index not in got["calls"]:
                    assert tc.id and tc.type == "function" and tc.function.name
                    got["calls"][tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and not tc.function.name
                got["calls"][tc.index]["arguments"] += tc.function.arguments or ""
            if c.finish_reason is not None:
                got["finish_reason"] = c.finish_reason
    return choices


def message_calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_a_call_through_the_openai_client(live, client):
    script(live, HERMES_ANSWER)
    answer = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.id.startswith("chatcmpl-tool-") and len(tool_call.id) > 20
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == WEATHER
    assert tool_call.function.arguments == json.dumps(WEATHER, ensure_ascii=False)
    assert answer.usage.completion_tokens == len(live.executor.scripts[0]) + 1  # the script and its EOS
    live.wait_idle()


def test_the_streamed_call_adds_up_to_the_non_streamed_one(live, client):
    script(live, HERMES_ANSWER)
    full = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300).choices[0]
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    (got,) = assembled(chunks).values()
    assert got["content"] == full.message.content and "<tool_call>" not in got["content"]
    assert [(c["name"], c["arguments"]) for c in got["calls"].values()] == message_calls(full.message)
    assert got["finish_reason"] == full.finish_reason == "tool_calls"
    live.wait_idle()


def test_each_of_n_choices_is_parsed_on_its_own(live, client):
    """n=3: choices 0 and 2 call tools (two calls in 2, no content), choice 1 answers in text, which streams as
    it comes and ends with "stop"."""
    two = '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": ' \
          '{}}\n</tool_call>'
    script(live, HERMES_ANSWER, "It is sunny, no <tool> needed.", two)
    full = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], n=3, max_tokens=300)
    by_index = {c.index: c for c in full.choices}
    assert [by_index[i].finish_reason for i in range(3)] == ["tool_calls", "stop", "tool_calls"]
    assert by_index[1].message.content == "It is sunny, no <tool> needed." and not by_index[1].message.tool_calls
    assert by_index[2].message.content is None
    assert message_calls(by_index[2].message) == [("a", '{"x": 1}'), ("b", "{}")]
    streamed = assembled(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], n=3,
                                                        max_tokens=300, stream=True))
    for i, choice in by_index.items():
        assert streamed[i]["content"] == (choice.message.content or "")
        assert [(c["name"], c["arguments"]) for c in streamed[i]["calls"].values()] == message_calls(choice.message)
        assert streamed[i]["finish_reason"] == choice.finish_reason
    live.wait_idle()


def test_a_call_cut_by_max_tokens_keeps_finish_reason_length(live, client):
    """As vLLM's streaming: only an answer that stopped by itself says "tool_calls"; a complete call before the
    cut is still parsed."""
    whole = '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
    script(live, whole + " and then more text")
    cut = len(ids(live.engine.tokenizer, whole))
    for stream in (False, True):
        answer = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=cut,
                                                stream=stream)
        if stream:
            (got,) = assembled(answer).values()
            assert got["finish_reason"] == "length" and [c["name"] for c in got["calls"].values()] == ["a"]
        else:
            assert answer.choices[0].finish_reason == "length"
            assert message_calls(answer.choices[0].message) == [("a", "{}")]
    live.wait_idle()


def test_malformed_calls_stay_content(live, client):
    broken = 'Here: <tool_call>{"name": "a", "arguments": {"x": </tool_call>'
    script(live, broken)
    full = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300).choices[0]
    assert full.message.content == broken and not full.message.tool_calls and full.finish_reason == "stop"
    (got,) = assembled(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300,
                                                      stream=True)).values()
    assert got == {"content": broken, "calls": {}, "finish_reason": "stop"}
    live.wait_idle()


def test_tool_choice_none_renders_the_tools_and_parses_nothing(live, client):
    """As vLLM: with a tool-call parser, "auto" decodes the answer with special tokens kept (hermes' markers are
    special tokens in some models); "none" leaves the answer alone."""
    tokenizer = live.engine.tokenizer
    special = min(tokenizer.special_ids - set(tokenizer.eos_ids))
    marked = ids(tokenizer, "A") + [special] + ids(tokenizer, HERMES_ANSWER)
    script(live, marked)
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], tool_choice="none",
                                          max_tokens=300).choices[0]
    assert none.message.content == "A" + HERMES_ANSWER and not none.message.tool_calls
    assert none.finish_reason == "stop"
    auto = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], tool_choice="auto",
                                          max_tokens=300).choices[0]
    special_text = tokenizer.decode([special], skip_special_tokens=False)
    assert auto.message.content == f"A{special_text}Let me check.\n" and auto.finish_reason == "tool_calls"
    live.wait_idle()


@pytest.mark.parametrize("parser, answer", [
    ("qwen3_coder", "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"),
    ("glm45", "Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Zürich</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"),
])
def test_xml_calls_through_the_openai_client_typed_by_the_request_tools(live, client, monkeypatch, parser, answer):
    """`--tool-call-parser qwen3_coder` or `glm45`: the request's tools type the arguments, streamed or not."""
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, tool_call_parser=parser))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}}
    script(live, answer)
    full = client.chat.completions.create(model="tiny", messages=ASK, tools=[tool], max_tokens=300).choices[0]
    assert full.message.content == "Checking.\n" and full.finish_reason == "tool_calls"
    assert message_calls(full.message) == [("get_weather", '{"city": "Zürich", "days": 3}')]
    (got,) = assembled(client.chat.completions.create(model="tiny", messages=ASK, tools=[tool], max_tokens=300,
                                                      stream=True)).values()
    assert got["content"] == "Checking.\n" and got["finish_reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in got["calls"].values()] == message_calls(full.message)
    live.wait_idle()


@pytest.mark.parametrize("parser, answer, calls", [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Zürich"}}; {"name": "b", "parameters": {}}',
     [("get_weather", '{"city": "Zürich"}'), ("b", "{}")]),
    ("pythonic", "[get_weather(city='Zürich', days=[1, -2]), b()]",
     [("get_weather", '{"city": "Zürich", "days": [1, -2]}'), ("b", "{}")]),
])
def test_answers_made_of_calls(live, client, monkeypatch, parser, answer, calls):
    """Parsers whose calls are the whole answer: no content, streamed or not."""
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, tool_call_parser=parser))
    script(live, answer)
    full = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300).choices[0]
    assert full.message.content is None and full.finish_reason == "tool_calls"
    assert message_calls(full.message) == calls
    (got,) = assembled(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300,
                                                      stream=True)).values()
    assert got["content"] == "" and got["finish_reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in got["calls"].values()] == calls
    live.wait_idle()


def test_parallel_tool_calls_false_keeps_the_first_call(live, client):
    """As vLLM (maybe_filter_parallel_tool_calls): parallel_tool_calls=false keeps only an answer's first call."""
    one = '<tool_call>{"name": "%s", "arguments": {}}</tool_call>'
    script(live, one % "a" + one % "b")
    for parallel, names in ((False, ["a"]), (True, ["a", "b"])):
        full = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300,
                                              parallel_tool_calls=parallel).choices[0]
        assert [name for name, _ in message_calls(full.message)] == names
        (got,) = assembled(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300,
                                                          stream=True, parallel_tool_calls=parallel)).values()
        assert [c["name"] for c in got["calls"].values()] == names
    live.wait_idle()


def test_mistral_calls_have_mistral_ids(live, client, monkeypatch):
    """vLLM's Mistral parser gives 9-character alphanumeric ids, which Mistral's chat templates require of the ids
    a client sends back with the tool results (others make the next turn fail); the others chatcmpl-tool-<hex>."""
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, tool_call_parser="mistral"))
    script(live, '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]')
    full = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300).choices[0]
    streamed = assembled(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300,
                                                        stream=True))[0]["calls"].values()
    found = [c.id for c in full.message.tool_calls] + [c["id"] for c in streamed]
    assert len(found) == 4 and len(set(found)) == 4 and all(len(i) == 9 and i.isalnum() for i in found)
    live.wait_idle()


def test_forced_calls_named_and_required(live, client, monkeypatch):
    """tool_choice naming a tool, and "required", as vLLM serves them, on a server without a parser: structured
    outputs hold the answer to a JSON schema (the tool's parameters; a list of {"name", "parameters"}), which is
    read back as the calls. A named call keeps finish_reason "stop" (OpenAI's), "required" gives "tool_calls".
    The script follows the schema here; tests/test_server.py has a model held to it."""
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, tool_call_parser=None))
    named = {"type": "function", "function": {"name": "get_weather"}}
    cases = [(named, json.dumps({"city": "Bern"}), "stop"),
             ("required", json.dumps([{"name": "get_weather", "parameters": {"city": "Bern"}}]), "tool_calls")]
    for choice, answer, reason in cases:
        script(live, answer)
        whole = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], tool_choice=choice,
                                               max_tokens=300).choices[0]
        assert whole.finish_reason == reason and not whole.message.content
        assert message_calls(whole.message) == [("get_weather", json.dumps({"city": "Bern"}))]
        streamed = assembled(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL],
                                                            tool_choice=choice, max_tokens=300, stream=True))[0]
        assert streamed["finish_reason"] == reason and streamed["content"] == ""
        assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == message_calls(whole.message)
    live.wait_idle()


# --- what is refused ---------------------------------------------------------------------------------------------


def refused(live, body: dict) -> dict:
    answer = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **body}, timeout=60)
    assert answer.status_code == 400, answer.text
    return answer.json()["error"]


def test_auto_needs_a_server_started_with_a_parser(live, monkeypatch):
    """As vLLM: tool_choice "auto", sent or implied by tools, is 400 on a server without
    --enable-auto-tool-choice --tool-call-parser; "none" still renders the tools and answers."""
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, tool_call_parser=None))
    script(live, HERMES_ANSWER)
    for body in ({"tools": [TOOL], "tool_choice": "auto"}, {"tools": [TOOL]}):
        error = refused(live, body)
        assert error["param"] == "tool_choice"
        assert '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser' in error["message"]
    answer = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": ASK, "tools": [TOOL],
                                                                  "tool_choice": "none", "max_tokens": 300})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == HERMES_ANSWER
    live.wait_idle()


@pytest.mark.parametrize("body, words", [
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "not in tools"),
    ({"tool_choice": "auto"}, "needs tools"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "must be 'none', 'auto', 'required' or a named tool"),
    ({"tools": [], "tool_choice": "auto"}, "tools must not be an empty array"),  # vLLM's check_tool_usage
    ({"tools": []}, "tools must not be an empty array"),
])
def test_forced_and_invalid_tool_choices_are_400(live, body, words):
    error = refused(live, body)
    assert error["param"] == ("tools" if body.get("tools") == [] else "tool_choice") and words in error["message"]


def test_auto_tool_choice_without_a_parser_is_a_start_up_error(capsys, monkeypatch):
    from jaxinfer.server import run
    monkeypatch.setattr(run, "serve", lambda *args, **kwargs: pytest.fail("the server started"))
    assert cli.main(["serve", "--enable-auto-tool-choice", "--skip-warmup"]) == 2
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "nope"])
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'"):
        ServerConfig(tool_call_parser="nope")


# --- reasoning (vLLM's --reasoning-parser) ----------------------------------------------------------------------

THINKING = [  # (parser, answer, thinking, content)
    ("deepseek_r1", "Nine is more.\n</think>\n\n9.8 is greater.", "Nine is more.\n", "\n\n9.8 is greater."),
    ("deepseek_r1", "<think>Nine.</think>9.8", "Nine.", "9.8"),
    ("deepseek_r1", "Still thinking when cut off", "Still thinking when cut off", ""),
    ("qwen3", "<think>\nCompare.\n</think>\n\n9.8", "\nCompare.\n", "\n\n9.8"),
    ("qwen3", "\n<think>a < b</think>", "a < b", ""),
    ("qwen3", "9.8 is greater.", None, "9.8 is greater."),
    ("qwen3", "Not </think> thinking", None, "Not </think> thinking"),
    ("qwen3", "<thinking> is a word", None, "<thinking> is a word"),
    ("seed_oss", "<seed:think>Budget left.</seed:think>9.8", "Budget left.", "9.8"),
    ("seed_oss", "Opened by the prompt.</seed:think>\n9.8", "Opened by the prompt.", "\n9.8"),
    ("seed_oss", "<think>not its tag</think> at all", "<think>not its tag</think> at all", ""),
    ("glm45", "<think>Plan.</think>\nAnswer", "Plan.", "\nAnswer"),
    ("glm45", "Answer only", None, "Answer only"),
    ("ernie45", "Weigh them.\n</think>\n\n<response>\n9.8 is greater.\n</response>\n", "Weigh them.\n",
     "\n9.8 is greater.\n"),
    ("ernie45", "Weigh.\n</think>\n9.8", "Weigh.\n", "\n9.8"),  # no <response>: the content as it is
    ("ernie45", "W.</think><response>a</response>b</response>", "W.", "a</response>b"),  # to the last closing tag
    ("ernie45", "W.</think>\n<response>cut off", "W.", "cut off"),
    ("ernie45", "W.</think> <respond>", "W.", " <respond>"),
]


@pytest.mark.parametrize("name, text, thinking, content", THINKING, ids=lambda v: str(v)[:24])
def test_reasoning_is_split_as_vllm_splits_it_streamed_or_not(name, text, thinking, content):
    parser = REASONING_PARSERS[name]
    assert parser.split(text) == (thinking, content)
    for pieces in splits(text, random.Random(text)):
        reasoning_stream, got, so_far = ReasoningStream(parser), None, ""
        for k, piece in enumerate(pieces):
            so_far += piece
            delta, now = reasoning_stream.advance(so_far, done=k == len(pieces) - 1)
            got = got if delta is None else (got or "") + delta
            assert content.startswith(now)  # content only once settled, never taken back
        assert (got, now) == (thinking, content), pieces


@pytest.mark.parametrize("name, pieces, expected", [
    ("qwen3", ["<think>", "a", "b", "</think>", "c"], 4),  # </think> one token
    ("qwen3", ["<think>a", "b</", "thi", "nk>", "\n", "c"], 4),  # spelt in pieces: up to the piece that ends it
    ("deepseek_r1", ["a", "b"], 2),  # never closed: all thinking
    ("qwen3", ["9.8", " is", " more"], 0),  # no thinking
    ("seed_oss", ["<seed:think>", "a", "</seed:", "think>", "b"], 4),  # its own tag, spelt in pieces
    ("openai_gptoss", ["<|channel|>", "analysis", "<|message|>", "a", "<|end|>", "<|start|>", "assistant",
                       "<|channel|>", "final", "<|message|>", "b"], 9),  # up to the final channel's name
])
def test_reasoning_tokens_count_up_to_the_token_that_closes_the_thinking(name, pieces, expected):
    decode = lambda token_ids: "".join(pieces[i] for i in token_ids)  # token i is pieces[i]
    assert reasoning_tokens(REASONING_PARSERS[name], list(range(len(pieces))), decode) == expected


def test_reasoning_through_the_openai_client(live, client, monkeypatch):
    """`--reasoning-parser qwen3`: the thinking comes back as the message's reasoning (and reasoning_content),
    streamed as it comes, and tool calls are parsed from what follows it."""
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, reasoning_parser="qwen3"))
    for answer, thinking, content, calls in [
            ("<think>\nCompare.\n</think>\n\nIt rains.", "\nCompare.\n", "\n\nIt rains.", []),
            ("No thinking here.", None, "No thinking here.", []),
            (f"<think>A call.</think>\n{HERMES_ANSWER}", "A call.", "\nLet me check.\n", [("get_weather", CALL)])]:
        script(live, answer)
        whole = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300).choices[0]
        extra = whole.message.model_extra or {}
        assert (extra.get("reasoning"), extra.get("reasoning_content")) == (thinking, thinking)
        assert whole.message.content == content
        assert [(n, json.loads(a)) for n, a in message_calls(whole.message)] == \
            [(n, json.loads(c)["arguments"]) for n, c in calls]
        chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300,
                                                     stream=True))
        streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks if c.choices)
        assert streamed == (thinking or "") and assembled(chunks)[0]["content"] == content
    live.wait_idle()


def test_an_unknown_reasoning_parser_is_refused():
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'"):
        ServerConfig(reasoning_parser="r2")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--reasoning-parser", "r2"])


@pytest.mark.parametrize("parser, vocabulary, expected", [
    ("qwen3", {"<think>": 7, "</think>": 8}, ((7,), (8,))),
    # gpt-oss: from the assistant's message to its final channel's (ids of the tags; each word one token here)
    ("openai_gptoss", {"<|start|>": 1, "<|channel|>": 2, "<|message|>": 3, "assistant": 4, "final": 5},
     ((1, 4), (2, 5, 3))),
    ("openai_gptoss", {"<|start|>": 1, "assistant": 4, "final": 5}, None),  # no such tags
    (None, {"<think>": 7, "</think>": 8}, None),  # no reasoning parser: held from the first token
    ("deepseek_r1", {"<think>": 7}, None),  # no such tokens: the same
])
def test_a_reasoning_server_holds_structured_outputs_after_the_thinking(parser, vocabulary, expected):
    tokenizer = types.SimpleNamespace(token_to_id=vocabulary.get, encode=lambda text, add_special_tokens: [
        vocabulary[piece] for piece in re.findall(r"<\|[a-z]+\|>|\w+", text)])  # each tag and word one token
    engine = types.SimpleNamespace(tokenizer=tokenizer, vocab_size=10, cfg=types.SimpleNamespace(max_model_len=8),
                                   grammars=types.SimpleNamespace(thinking_tokens=None, defaults={}), model_config=None)
    Server(ServerConfig(reasoning_parser=parser)).ready(engine)
    assert engine.grammars.thinking_tokens == expected


def test_a_servers_structured_outputs_config_is_checked_and_applied():
    engine = types.SimpleNamespace(tokenizer=None, vocab_size=10, cfg=types.SimpleNamespace(max_model_len=8),
                                   grammars=types.SimpleNamespace(defaults={"disable_any_whitespace": False,
                                                                            "disable_additional_properties": False}),
                                   model_config=None)
    Server(ServerConfig(structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True})).ready(engine)
    assert engine.grammars.defaults == {"disable_any_whitespace": True, "disable_additional_properties": False}
    for config, words in [({"backend": "xgrammar"}, "the guidance backend"), ({"whitespace": True}, "unknown"),
                          ({"disable_any_whitespace": 1}, "must be one of"), ([], "a JSON object")]:
        with pytest.raises(ValueError, match=words):
            ServerConfig(structured_outputs_config=config)
    assert cli.main(["serve", "--structured-outputs-config", '{"backend": "outlines"}', "--skip-warmup"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["serve", "--structured-outputs-config", "not json"])


# --- gpt-oss's harmony channels (--reasoning-parser openai_gptoss, --tool-call-parser openai) ---------------------

ARGS = json.dumps(WEATHER, ensure_ascii=False)
HARMONY = [  # (answer, thinking, content, calls as (name, arguments))
    ("<|channel|>analysis<|message|>Compare 9.11 and 9.8.<|end|><|start|>assistant<|channel|>final<|message|>"
     "9.8 is greater.<|return|>", "Compare 9.11 and 9.8.", "9.8 is greater.", []),
    ("<|channel|>analysis<|message|>Need the forecast.<|end|><|start|>assistant<|channel|>commentary "
     f"to=functions.get_weather <|constrain|>json<|message|>{ARGS}<|call|>", "Need the forecast.", None,
     [("get_weather", ARGS)]),
    (f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}<|call|>", None, None,
     [("get_weather", ARGS)]),  # the recipient before the channel; no thinking
    ("<|channel|>analysis<|message|>A.<|end|><|start|>assistant<|channel|>analysis<|message|>B.<|end|>"
     "<|start|>assistant<|channel|>commentary<|message|>Checking now.<|end|><|start|>assistant<|channel|>commentary"
     ' to=functions.now <|constrain|>json<|message|>{}<|call|>', "A.\nB.", "Checking now.", [("now", "{}")]),
    ("<|channel|>analysis<|message|>Cut off while thin", "Cut off while thin", "", []),  # max_tokens
    ("<|channel|>analysis<|message|>Search.<|end|><|start|>assistant<|channel|>analysis to=browser.search "
     '<|constrain|>json<|message|>{"query": "x"}<|call|>', "Search.", "", []),  # a built-in tool: not ours to run
    ("Plain text, <|channel|> later", None, "Plain text, <|channel|> later", []),
]


@pytest.mark.parametrize("text, thinking, content, calls", HARMONY, ids=lambda v: str(v)[:24])
def test_harmony_channels_split_streamed_or_not(text, thinking, content, calls):
    """The thinking, content and calls of a harmony answer, whole and streamed (the reasoning stream's content
    through the tool-call stream, as the server chains them): streamed pieces add up to the whole answer's."""
    reasoning, tools = REASONING_PARSERS["openai_gptoss"], PARSERS["openai"]
    whole_thinking, whole_content = reasoning.split(text)
    parsed = tools.parse(whole_content)
    assert (whole_thinking, parsed.content, [(c.name, c.arguments) for c in parsed.calls]) == \
        (thinking, content, calls)
    for pieces in splits(text, random.Random(text)):  # tags cut too, as a tokenizer without them as tokens cuts them
        reasoning_stream, tool_stream, so_far = ReasoningStream(reasoning), ToolCallStream(tools), ""
        got_thinking, got_content = None, ""
        for k, piece in enumerate(pieces):
            so_far += piece
            delta, now = reasoning_stream.advance(so_far, done=k == len(pieces) - 1)
            got_thinking = got_thinking if delta is None else (got_thinking or "") + delta
            got_content += tool_stream.advance(now)
        rest, got_calls = tool_stream.finish(now)
        assert (got_thinking, got_content + rest, got_calls) == (thinking, content or "", parsed.calls), pieces


def test_harmony_through_the_openai_client(live, client, monkeypatch):
    """A server with the openai tool parser (which turns on the harmony reasoning parser): the thinking comes
    back as reasoning, the final channel as content, a call to=functions.NAME as a tool call, whole or
    streamed. (This tokenizer spells the tags as text; gpt-oss's are special tokens, which the server decodes
    kept for this parser.)"""
    monkeypatch.setattr(live.server, "config", ServerConfig(served_model_name="tiny", tool_call_parser="openai"))
    assert live.server.config.reasoning_parser == "openai_gptoss"
    for text, thinking, content, calls in HARMONY[:2]:
        script(live, text)
        whole = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300).choices[0]
        assert (whole.message.model_extra or {}).get("reasoning") == thinking
        assert whole.message.content == content and message_calls(whole.message) == calls
        assert whole.finish_reason == ("tool_calls" if calls else "stop")
        chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], max_tokens=300,
                                                     stream=True))
        streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks if c.choices)
        got = assembled(chunks)[0]
        assert streamed == thinking and got["content"] == (content or "")
        assert [(c["name"], c["arguments"]) for c in got["calls"].values()] == calls
    # the answer is decoded with its special tokens kept (gpt-oss's tags are special tokens): <|im_start|> here
    tokenizer = live.engine.tokenizer
    script(live, ids(tokenizer, "<|channel|>final<|message|>a") + [tokenizer.token_to_id("<|im_start|>")] +
           ids(tokenizer, "b"))
    answer = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=300, extra_body={
        "skip_special_tokens": True})
    assert answer.choices[0].message.content == "a<|im_start|>b"
    live.wait_idle()


def test_harmony_markers_are_the_tokens_a_harmony_tokenizer_makes(tmp_path):
    """With the tags as special tokens (as gpt-oss's tokenizer has them), the runs that hold structured outputs
    are the very tokens a rendered prompt ends with and an answer's final channel opens with: the thinking is
    open after any prompt, earlier turns' final channels notwithstanding."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    hf.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>"]})
    hf.save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_pretrained(tmp_path)  # its tokenizer.json, with the tags
    start, end = REASONING_PARSERS["openai_gptoss"].thinking_markers(tokenizer)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    prompt = encode("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello<|end|>"
                    "<|start|>user<|message|>Bye<|end|><|start|>assistant")
    answer = encode("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>{}")
    assert tuple(prompt[-len(start):]) == start and len(end) >= 3
    assert [i for i in range(len(answer)) if tuple(answer[i:i + len(end)]) == end] == [len(encode(
        "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant"))]
    grammars = types.SimpleNamespace(thinking_tokens=(start, end))
    assert GrammarCompiler._thinking_until(grammars, prompt) == end


def test_harmony_parsers_are_chosen_together_and_for_gpt_oss():
    assert ServerConfig(tool_call_parser="openai").reasoning_parser == "openai_gptoss"
    with pytest.raises(ValueError, match="needs the openai_gptoss reasoning parser, not 'qwen3'"):
        ServerConfig(tool_call_parser="openai", reasoning_parser="qwen3")
    for model_type, expected in (("gpt_oss", "openai_gptoss"), ("llama", None)):
        engine = types.SimpleNamespace(tokenizer=types.SimpleNamespace(token_to_id=lambda token: None), vocab_size=10,
                                       cfg=types.SimpleNamespace(max_model_len=8),
                                       model_config=types.SimpleNamespace(model_type=model_type),
                                       grammars=types.SimpleNamespace(thinking_tokens=None, defaults={}))
        server = Server(ServerConfig())
        server.ready(engine)
        assert server.config.reasoning_parser == expected
