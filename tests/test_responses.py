"""OpenAI's Responses API (`/v1/responses`) against the official `openai` client, on a scripted model.

The model is `test_tool_calls`'s script (the engine around it runs as ever, with the hermes tool-call parser), so
each answer is known: a response's output items, its streamed events and their sum must all say it.
"""

import dataclasses
import json

import httpx
import openai
import pytest

from jaxinfer.server.responses import to_chat
from test_tool_calls import ASK, HERMES_ANSWER, TOOL, WEATHER, client, ids, live, script  # noqa: F401 (fixtures)

FLAT_TOOL = {"type": "function", **TOOL["function"]}  # the Responses API's form of a function tool
QUESTION = ASK[0]["content"]


def events_of(stream) -> list:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def streamed_text(events, kind: str = "response.output_text.delta") -> str:
    return "".join(e.delta for e in events if e.type == kind)


def test_a_text_answer_streamed_or_not(live, client):
    """instructions and input as the chat route's system and user messages; the answer as one message item; the
    stream's deltas add up to it, between the events OpenAI's clients wait for, and end in response.completed
    carrying the same response."""
    script(live, "It is sunny in Zürich.")
    response = client.responses.create(model="tiny", instructions="Be brief.", input=QUESTION)
    assert response.status == "completed" and response.output_text == "It is sunny in Zürich."
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert response.usage.output_tokens == len(live.executor.scripts[0]) + 1  # the script and its EOS
    assert response.usage.input_tokens > 0 and response.instructions == "Be brief." and response.store is False
    events = events_of(client.responses.create(model="tiny", instructions="Be brief.", input=QUESTION,
                                               stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert streamed_text(events) == events[-4].text == response.output_text
    assert events[-1].response.output_text == response.output_text
    assert events[-1].response.usage.output_tokens == response.usage.output_tokens
    live.wait_idle()


def test_a_function_call_streamed_or_not(live, client):
    """A hermes call in the answer: a message item with the text before it, then a function_call item whose
    arguments are the call's; streamed, the same items in the same order."""
    script(live, HERMES_ANSWER)
    response = client.responses.create(model="tiny", input=QUESTION, tools=[FLAT_TOOL])
    message, call = response.output
    assert message.type == "message" and response.output_text == "Let me check.\n"
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == WEATHER and call.call_id.startswith("chatcmpl-tool-")
    events = events_of(client.responses.create(model="tiny", input=QUESTION, tools=[FLAT_TOOL], stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.type for item in done] == ["message", "function_call"]
    assert streamed_text(events) == "Let me check.\n"
    assert streamed_text(events, "response.function_call_arguments.delta") == call.arguments == done[1].arguments
    assert events[-1].type == "response.completed" and len(events[-1].response.output) == 2
    live.wait_idle()


def test_the_conversation_goes_on_after_a_call(live, client):
    """The call and its output sent back as input items: the chat route renders them as the assistant's tool
    call and the tool's message, and the model answers."""
    script(live, "It will rain.")
    response = client.responses.create(model="tiny", tools=[FLAT_TOOL], input=[
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": json.dumps(WEATHER)},
        {"type": "function_call_output", "call_id": "call_1", "output": "rain"}])
    assert response.output_text == "It will rain."
    chat, _ = to_chat({"instructions": "Be brief.", "input": [
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "reasoning", "id": "rs_1", "summary": []}]})
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"}]
    live.wait_idle()


def test_thinking_comes_back_as_a_reasoning_item(live, client, monkeypatch):
    monkeypatch.setattr(live.server, "config", dataclasses.replace(live.server.config, reasoning_parser="qwen3"))
    script(live, "<think>\nCompare.\n</think>\n\nIt rains.")
    response = client.responses.create(model="tiny", input=QUESTION)
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "\nCompare.\n"
    assert response.output_text == "\n\nIt rains."
    thinking = len(ids(live.engine.tokenizer, "<think>\nCompare.\n</think>"))  # spelt in several tokens here
    assert 0 < response.usage.output_tokens_details.reasoning_tokens == thinking < response.usage.output_tokens
    events = events_of(client.responses.create(model="tiny", input=QUESTION, stream=True))
    assert streamed_text(events, "response.reasoning_text.delta") == "\nCompare.\n"
    assert streamed_text(events) == "\n\nIt rains."
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]
    live.wait_idle()


def test_an_answer_cut_by_max_output_tokens_is_incomplete(live, client):
    script(live, "one two three four five six seven eight")
    response = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.max_output_tokens == 3
    events = events_of(client.responses.create(model="tiny", input=QUESTION, max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete" and streamed_text(events) == response.output_text
    live.wait_idle()


def test_a_json_schema_format_holds_the_answer_to_it(live, client):
    """text.format json_schema is the chat route's response_format. The script ignores the token mask a real model
    samples under, so its answer, which leaves the schema after the object, ends at the first token the grammar
    forbids (the scheduler's rule for a broken grammar); without the format it runs to its end."""
    script(live, '{"city": "Zürich"} and more')
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    response = client.responses.create(model="tiny", input=QUESTION, text={"format": {
        "type": "json_schema", "name": "place", "schema": schema, "strict": True}})
    assert response.output_text == '{"city": "Zürich"} and' and response.text.format.type == "json_schema"
    assert client.responses.create(model="tiny", input=QUESTION).output_text == '{"city": "Zürich"} and more'
    live.wait_idle()


@pytest.mark.parametrize("body, param, words", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"input": "hi", "background": True}, "background", "keeps no responses"),
    ({"input": []}, "input", "non-empty list"),
    ({"input": [{"type": "web_search_call"}]}, "input", "'web_search_call' are not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input",
     "'input_image' are not supported"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must be at least 1"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text", "text.format must be"),
    ({"input": "hi", "temperature": -1}, "temperature", "temperature"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice", "needs tools"),
    ("[1, 2]", None, "JSON object"),
])
def test_bad_requests_are_400_naming_the_field(live, body, param, words):
    """Through the raw route (the openai client checks some fields itself) and, where it sends them as they are,
    through the client, whose BadRequestError carries the same message."""
    raw = httpx.post(f"{live.url}/v1/responses", content=body if isinstance(body, str) else json.dumps(body),
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert raw.status_code == 400, raw.text
    error = raw.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "BadRequestError"
    live.wait_idle()


def test_the_openai_client_sees_a_bad_request_as_such(live, client):
    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        client.responses.create(model="tiny", input="hi", previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other", input="hi")
    script(live, "still serving")
    assert client.responses.create(model="tiny", input="hi").output_text == "still serving"
    assert client.responses.create(model="tiny", input="hi", tool_choice="auto").output_text == "still serving"
    live.wait_idle()
