"""OpenAI's Responses API (`POST /v1/responses`) over the chat route, as vLLM serves it.

A request is read into the chat request it means (`to_chat`): `instructions` become a system message, `input`
(text, or a list of messages, `function_call` and `function_call_output` items) the messages, function tools
and `tool_choice` their chat forms, `text.format` a `response_format`, `max_output_tokens` `max_tokens`. The
chat route then renders, validates and generates as for `/v1/chat/completions`; its final message becomes the
response's output items (`output`: the thinking as a `reasoning` item, the text as a `message`, each call as a
`function_call`), and a stream's deltas become the Responses events, ending in `response.completed`.

Nothing is stored: `previous_response_id` and `background` are refused (400), `store` is answered false.
Host code, plain Python: it knows nothing of HTTP or the engine.
"""

from __future__ import annotations

import json
import uuid

from jaxinfer.server.protocol import APIError

# Chat sampling fields a Responses request may carry as they are (vLLM's extensions among them).
_PASSED = ("model", "temperature", "top_p", "stream", "parallel_tool_calls", "seed", "top_k", "min_p",
           "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "priority", "cache_salt",
           "chat_template_kwargs")
_REFUSED = {"previous_response_id": "previous_response_id is not supported: this server keeps no responses "
                                    "(send the whole conversation as input)",
            "background": "background responses are not supported: this server keeps no responses",
            "conversation": "conversation is not supported: this server keeps no conversations (send the whole "
                            "conversation as input)"}
_TEXT_PARTS = ("input_text", "output_text", "text")
# The chat field a validation error names -> the Responses field the caller sent.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text",
           "reasoning_effort": "reasoning"}


def _fail(message: str, param: str) -> None:
    raise APIError(400, message, param)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def to_chat(body) -> tuple[dict, dict]:
    """-> (the chat request body this Responses request means, the fields the response echoes)."""
    if not isinstance(body, dict):
        _fail("the request body must be a JSON object", None)
    for name, message in _REFUSED.items():
        if body.get(name):
            _fail(message, name)
    chat = {name: body[name] for name in _PASSED if name in body}
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            _fail("instructions must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    chat["messages"] = messages + _input_messages(body.get("input"))
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    if "tool_choice" in body and (tools or body["tool_choice"] != "auto"):  # OpenAI takes "auto" with no tools
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text = body.get("text") or {}
    if not isinstance(text, dict):
        _fail("text must be an object such as {\"format\": {\"type\": \"json_schema\", ...}}", "text")
    response_format = _response_format(text.get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    reasoning = body.get("reasoning") or {}
    if not isinstance(reasoning, dict):
        _fail("reasoning must be an object such as {\"effort\": \"low\"}", "reasoning")
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "text": {"format": text.get("format") or {"type": "text"}},
            "metadata": body.get("metadata") or {}, "user": body.get("user"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": None}}
    return chat, echo


def chat_param(param: str | None) -> str | None:
    """The Responses field to name in an error the chat route raised."""
    return _PARAMS.get(param, param)


def _input_messages(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        _fail("input must be a string or a non-empty list of input items", "input")
    messages = []
    for item in value:
        if not isinstance(item, dict):
            _fail(f"each input item must be an object, got {type(item).__name__}", "input")
        kind = item.get("type", "message")
        if kind == "message":  # OpenAI's developer messages are what chat templates know as system ones
            role = "system" if item.get("role") == "developer" else item.get("role")
            messages.append({"role": role, "content": _content(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not all(isinstance(v, str) for v in (call["id"], item.get("name"), item.get("arguments"))):
                _fail("a function_call item needs string call_id, name and arguments", "input")
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # calls made in one turn stay one message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                _fail("a function_call_output item needs string call_id and output", "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        elif kind != "reasoning":  # earlier thinking sent back: the chat template leaves it out
            _fail(f"input items of type {kind!r} are not supported (message, function_call, "
                  "function_call_output, reasoning)", "input")
    return messages


def _content(content):
    """A message's content: text, or its text parts joined (images and files are not served)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        _fail("message content must be a string or a list of content parts", "input")
    for part in content:
        if part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            _fail(f"content parts of type {part.get('type')!r} are not supported: only text "
                  "(input_text, output_text)", "input")
    return [{"type": "text", "text": part["text"]} for part in content]


def _tools(value) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        _fail("tools must be a list of function tools", "tools")
    tools = []
    for tool in value:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            _fail(f"only function tools are supported, got {kind!r}", "tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value):
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    return value  # "none", "auto", "required"; anything else is the chat route's 400


def _response_format(value) -> dict | None:
    if value is None or value == {"type": "text"}:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_schema", "json_object"):
        _fail("text.format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or a json_schema format",
              "text")
    if value["type"] == "json_object":
        return {"type": "json_object"}
    schema = {k: value[k] for k in ("name", "schema", "strict", "description") if k in value}
    return {"type": "json_schema", "json_schema": schema}


def output_items(message: dict, finish_reason: str | None) -> list[dict]:
    """A chat message as Responses output items: its thinking, its text (an empty answer too), its calls."""
    status = "incomplete" if finish_reason == "length" else "completed"
    items = []
    if message.get("reasoning"):
        items.append(reasoning_item(new_id("rs"), message["reasoning"]))
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        items.append(message_item(new_id("msg"), message.get("content") or "", status))
    for call in calls:
        items.append(call_item(new_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]))
    return items


def message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [text_part(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(item_id: str, text: str | None) -> dict:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def response_object(response_id: str, created: int, model: str, echo: dict, status: str, output: list,
                    usage: dict | None, finish_reason: str | None = None) -> dict:
    """The response: `usage` from the chat route's (prompt, completion, cached and thinking token counts)."""
    incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
    body = {"id": response_id, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": incomplete, "model": model, "output": output, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "truncation": "disabled",
            **echo, "usage": None}
    if usage is not None:
        body["usage"] = {"input_tokens": usage["prompt_tokens"],
                         "input_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
                         "output_tokens": usage["completion_tokens"],
                         "output_tokens_details": {"reasoning_tokens": usage.get("reasoning_tokens", 0)},
                         "total_tokens": usage["total_tokens"]}
    return body


def event(kind: str, sequence: int, **fields) -> str:
    """One server-sent event of a Responses stream."""
    payload = {"type": kind, "sequence_number": sequence, **fields}
    return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


class EventStream:
    """A chat stream's deltas as Responses events: each item opened when its first text arrives, closed when the
    next kind begins or the answer ends; the calls, which the chat route sends whole at the end, then the
    response. `header(status, output, usage, finish_reason)` builds the response object the events carry."""

    def __init__(self, header):
        self.header, self.sequence = header, 0
        self.output: list[dict] = []  # items closed so far
        self.open: dict | None = None  # the item being streamed: {"type", "id", "text"}

    def _event(self, kind: str, **fields) -> str:
        self.sequence += 1
        return event(kind, self.sequence - 1, **fields)

    def start(self) -> list[str]:
        return [self._event(kind, response=self.header("in_progress", [], None, None))
                for kind in ("response.created", "response.in_progress")]

    def text(self, kind: str, delta: str) -> list[str]:
        """`delta` of the thinking ("reasoning") or of the answer ("message")."""
        if not delta:
            return []
        events = self._close("completed") if self.open is not None and self.open["type"] != kind else []
        if self.open is None:
            events += self._begin(kind)
        self.open["text"] += delta
        where = {"item_id": self.open["id"], "output_index": len(self.output), "content_index": 0}
        if kind == "reasoning":
            return events + [self._event("response.reasoning_text.delta", **where, delta=delta)]
        return events + [self._event("response.output_text.delta", **where, delta=delta, logprobs=[])]

    def _begin(self, kind: str) -> list[str]:
        self.open = {"type": kind, "id": new_id("rs" if kind == "reasoning" else "msg"), "text": ""}
        index = len(self.output)
        if kind == "reasoning":
            return [self._event("response.output_item.added", output_index=index,
                                item=reasoning_item(self.open["id"], None))]
        return [self._event("response.output_item.added", output_index=index,
                            item=message_item(self.open["id"], None, "in_progress")),
                self._event("response.content_part.added", item_id=self.open["id"], output_index=index,
                            content_index=0, part=text_part(""))]

    def _close(self, status: str) -> list[str]:
        item, self.open = self.open, None
        where = {"item_id": item["id"], "output_index": len(self.output), "content_index": 0}
        if item["type"] == "reasoning":
            done = reasoning_item(item["id"], item["text"])
            events = [self._event("response.reasoning_text.done", **where, text=item["text"])]
        else:
            done = message_item(item["id"], item["text"], status)
            events = [self._event("response.output_text.done", **where, text=item["text"], logprobs=[]),
                      self._event("response.content_part.done", **where, part=text_part(item["text"]))]
        events.append(self._event("response.output_item.done", output_index=len(self.output), item=done))
        self.output.append(done)
        return events

    def finish(self, calls: list[dict], finish_reason: str | None, usage: dict) -> list[str]:
        """Close the open item, stream the calls, and end with the whole response."""
        status = "incomplete" if finish_reason == "length" else "completed"
        events = self._close(status) if self.open is not None else []
        if not calls and not any(item["type"] == "message" for item in self.output):
            events += self._begin("message") + self._close(status)  # an empty answer is an empty message
        for call in calls:
            index, item_id = len(self.output), new_id("fc")
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            events += [self._event("response.output_item.added", output_index=index,
                                   item=call_item(item_id, call["id"], name, "", "in_progress")),
                       self._event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                   delta=arguments),
                       self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                   arguments=arguments, name=name)]
            self.output.append(call_item(item_id, call["id"], name, arguments))
            events.append(self._event("response.output_item.done", output_index=index, item=self.output[-1]))
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return events + [self._event(kind, response=self.header(status, self.output, usage, finish_reason))]

    def error(self, error: APIError) -> str:
        body = error.body()["error"]
        return self._event("error", code=str(body["code"]), message=body["message"], param=body["param"])
