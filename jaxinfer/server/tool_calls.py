"""Tool calls in a chat answer's text, found as vLLM's `--tool-call-parser` finds them: hermes, llama3_json, mistral,
pythonic, llama4_pythonic, qwen3_coder, seed_oss, glm45 and glm47 (GLM-4.5 to 4.7's), ernie45, deepseek_v3,
deepseek_v31, kimi_k2, openai (gpt-oss's, with the openai_gptoss reasoning parser).

Host code, plain Python: a parser splits a finished answer's text into content and calls (`parse`); a
`ToolCallStream` does the same for an answer that arrives in pieces. It knows nothing of HTTP or the engine.

What counts as a call follows vLLM's parsers (vllm/tool_parsers/hermes_tool_parser.py, llama_tool_parser.py,
mistral_tool_parser.py, pythonic_tool_parser.py): the call must parse and hold a name and its arguments, or the
whole text stays content, with no calls. Where vLLM's streaming and non-streaming parsers disagree (text before a
Llama call, a valid call followed by a broken one), the non-streamed answer is the rule and streaming follows it:
a stream sends text as content only once nothing after it can turn it into part of a call, holds the rest back,
and at the end of the answer parses the whole text as the non-streamed answer is parsed. So the streamed content
and calls always concatenate to the non-streamed ones; the calls arrive whole, in the answer's last chunk.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import secrets
import string
import uuid

from jaxinfer.server import harmony

TOOL_CALL_ID_PREFIX = "chatcmpl-tool-"  # vLLM's ids: this and a random uuid's hex


def _call_id() -> str:
    return f"{TOOL_CALL_ID_PREFIX}{uuid.uuid4().hex}"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it
    call_id: str | None = dataclasses.field(default=None, compare=False)  # the model's own (Kimi K2's), if any

    def json(self, call_id: str) -> dict:
        """The call as a response's `tool_calls` entry: its own id, else `call_id` (the parser's `new_id`)."""
        return {"id": self.call_id or call_id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class Parsed:
    content: str | None  # the text outside the calls; None when there is none
    calls: list[ToolCall]


def _call(obj, argument_keys: tuple[str, ...] = ("arguments",)) -> ToolCall:
    """A call from its decoded JSON: {"name": str, <the first of argument_keys present>: any JSON}; ValueError
    for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a tool call is an object with a string 'name'")
    key = next((k for k in argument_keys if k in obj), None)
    if key is None:
        raise ValueError(f"a tool call needs '{argument_keys[0]}'")
    return ToolCall(obj["name"], json.dumps(obj[key], ensure_ascii=False))  # vLLM's JSON text for the arguments


def partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`: a marker that may still be arriving."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class _Marked:
    """Answers shaped `content <marker> calls`: content is the text before the first marker (None if empty);
    `_calls` reads what follows it."""

    marker: str
    keep_special_tokens = True  # the marker is a special token in some models: decode with it kept, as vLLM
    new_id = staticmethod(_call_id)
    calls_finish_reason = "tool_calls"  # what finish_reason "stop" becomes when the answer made calls

    def parse(self, text: str) -> Parsed:
        start = text.find(self.marker)
        if start < 0:
            return Parsed(text, [])
        try:
            calls = self._calls(text[start:])
        except (ValueError, RecursionError):  # as vLLM: a call that does not parse leaves the text content
            calls = []
        return Parsed(text[:start] or None, calls) if calls else Parsed(self._unparsed(text, start), [])

    def _unparsed(self, text: str, start: int) -> str:
        """The content of an answer whose calls (from the marker at `start` on) did not parse: all of it."""
        return text

    def split(self, text: str, start: int) -> tuple[int, str | None]:
        """How much of `text` (searched from `start`, which no marker begins before) is content for certain,
        and whether that is settled: "held" (the rest waits for the end of the answer) or None (not yet)."""
        at = text.find(self.marker, start)
        if at >= 0:
            return at, "held"
        return len(text) - partial_marker(text, self.marker), None

    def _calls(self, text: str) -> list[ToolCall]:
        raise NotImplementedError


class Hermes(_Marked):
    """Qwen 2.5 / 3 and Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or more; the last
    may lack its closing tag (vLLM reads it to the end of the text). As in vLLM, text between and after the calls
    is not content."""

    marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def _calls(self, text: str) -> list[ToolCall]:
        return [_call(json.loads(body)) for body in self._CALL.findall(text)]


class Mistral(_Marked):
    """Mistral 7B Instruct v0.3 (Hugging Face tokenizer): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
    As vLLM, the markers are dropped, and if the rest is not JSON the first `[{...}]` in it is read."""

    marker = "[TOOL_CALLS]"
    _ARRAY = re.compile(r"\[\{.*\}\]", re.DOTALL)

    @staticmethod
    def new_id() -> str:
        """vLLM's Mistral ids: 9 letters and digits, which Mistral's chat templates require of the ids sent back."""
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def _unparsed(self, text: str, start: int) -> str:
        """As vLLM: without its control token (the text before it, already streamed, stays as it is)."""
        return text[:start] + text[start:].replace(self.marker, "")

    def _calls(self, text: str) -> list[ToolCall]:
        body = text.replace(self.marker, "").strip()
        try:
            calls = json.loads(body)
        except json.JSONDecodeError:
            found = self._ARRAY.search(body)
            if found is None:
                raise
            calls = json.loads(found.group(0))
        if not isinstance(calls, list):
            raise ValueError("mistral tool calls are a JSON list")
        return [_call(call) for call in calls]


class Llama3Json:
    """Llama 3.1 / 3.2 JSON tool calling: the whole answer is `{"name": ..., "parameters": {...}}` ("arguments"
    also taken), perhaps after `<|python_tag|>`, several one after the other (separated by `;`, `,` or blanks, as
    vLLM reads every object) or in a JSON list. With calls there is no content (text after the last call is
    dropped, as vLLM does). vLLM's streaming parser only takes an answer that starts with the object or the tag
    (after whitespace here), while its non-streaming one looks for objects anywhere: both follow the streaming
    rule here, so that plain answers stream as they come."""

    tag = "<|python_tag|>"
    keep_special_tokens = False  # as vLLM, skip_special_tokens is left alone: the tag may go, the JSON stays
    new_id = staticmethod(_call_id)
    calls_finish_reason = "tool_calls"
    _DECODER = json.JSONDecoder()

    def _body(self, text: str) -> str | None:
        """The text after the tag or from the opening brace (or bracket); None for an answer that is not calls."""
        text = text.lstrip()
        if text.startswith(self.tag):
            return text[len(self.tag):]
        return text if text.startswith(("{", "[")) else None

    def parse(self, text: str) -> Parsed:
        body = self._body(text)
        if body is None:
            return Parsed(text, [])
        try:
            calls = self._calls(body)
        except (ValueError, RecursionError):
            calls = []
        return Parsed(None, calls) if calls else Parsed(text, [])

    def _calls(self, body: str) -> list[ToolCall]:
        found, at = [], 0
        while True:
            obj, at = self._DECODER.raw_decode(body, _skip_space(body, at))
            found += obj if isinstance(obj, list) and not found else [obj]  # a list only as the whole answer
            at = _skip_space(body, at)
            if body.startswith((";", ","), at):
                at = _skip_space(body, at + 1)
            if isinstance(obj, list) or not body.startswith("{", at):
                return [_call(obj, ("arguments", "parameters")) for obj in found]

    def split(self, text: str, start: int) -> tuple[int, str | None]:
        """As `_Marked.split`; settled as soon as the first non-blank characters show calls or plain text."""
        if self.tag.startswith(text.lstrip()):  # blank, or the tag still arriving
            return 0, None
        return (0, "held") if self._body(text) is not None else (len(text), "content")


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


class Pythonic:
    """Llama 3.2 and 4 (and ToolACE) pythonic tool calling: the whole answer is a Python list of calls by name with
    keyword arguments, `[get_weather(city="Zürich", days=[1, 2]), now()]`. As vLLM's pythonic parser: an argument
    must be a literal (a string, number, True, False, None, or a list or dict of them; a negative number too,
    which vLLM's refuses), and a positional argument makes the list no calls (vLLM's pattern refuses it); then,
    or for any answer that is not such a list from its first character, the whole answer is content. With calls
    there is no content.
    `llama4_pythonic` also drops Llama 4's `<|python_start|>` before the list and `<|python_end|>`."""

    keep_special_tokens = False
    new_id = staticmethod(_call_id)
    calls_finish_reason = "tool_calls"

    def __init__(self, start: str = "", end: str = ""):
        self.start, self.end = start, end

    def _body(self, text: str) -> str:
        if self.start and text.startswith(self.start):
            text = text[len(self.start):]
        return text.replace(self.end, "") if self.end else text

    def parse(self, text: str) -> Parsed:
        body = self._body(text)
        try:
            calls = self._calls(body) if body.startswith("[") else []
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):  # TypeError: json.dumps(b"")
            calls = []
        return Parsed(None, calls) if calls else Parsed(text, [])

    def _calls(self, body: str) -> list[ToolCall]:
        tree = ast.parse(body, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            raise ValueError("pythonic tool calls are a non-empty list")
        return [self._call(node) for node in tree.elts]

    def _call(self, node) -> ToolCall:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("a pythonic tool call is name(keyword=literal, ...)")
        if any(k.arg is None for k in node.keywords):
            raise ValueError("a pythonic tool call takes no **arguments")
        arguments = {k.arg: _literal(k.value) for k in node.keywords}
        return ToolCall(node.func.id, json.dumps(arguments, ensure_ascii=False))

    def split(self, text: str, start: int) -> tuple[int, str | None]:
        """Settled by the first character (after Llama 4's start tag): `[` holds the answer back, else content."""
        body = self._body(text)
        if self.start.startswith(text) or not body:  # nothing yet, or the start tag still arriving
            return 0, None
        return (0, "held") if body.startswith("[") else (len(text), "content")


def _literal(node):
    """A call argument's value: literals only, as vLLM's pythonic parser reads them."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and type(node.operand.value) in (int, float):
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
    raise ValueError("a pythonic tool call's arguments must be literals")


class Forced:
    """tool_choice "required" or a named tool, as vLLM serves them: structured outputs hold the whole answer to the
    call's JSON (`protocol._forced_call_schema`), which is read back here. A named tool's answer is its arguments,
    taken as they are (cut short at max_tokens too, as vLLM does), and finish_reason stays "stop" (as OpenAI's);
    "required" answers a list of {"name", "parameters"}, and ends with "tool_calls". Call ids are the usual
    "chatcmpl-tool-..." ones; no server flag is needed, as in vLLM."""

    keep_special_tokens = False
    new_id = staticmethod(_call_id)

    def __init__(self, name: str | None):
        self.name = name  # None: "required"
        self.calls_finish_reason = "stop" if name is not None else "tool_calls"

    def parse(self, text: str) -> Parsed:
        if self.name is not None:
            return Parsed(None, [ToolCall(self.name, text)])
        try:
            found = json.loads(text)
            return Parsed(None, [_call(obj, ("parameters",)) for obj in found])
        except (ValueError, TypeError, RecursionError):  # cut short at max_tokens: the text stays content
            return Parsed(text, [])

    def split(self, text: str, start: int) -> tuple[int, str | None]:
        return 0, "held"  # the whole answer is the call: nothing is content before it ends


class XmlCalls(_Marked):
    """Qwen3-Coder's calls (Seed-OSS's in `<seed:tool_call>` tags): `<tool_call><function=NAME><parameter=P>value
    </parameter>...</function></tool_call>`, one or more, the last maybe unclosed. A value is text (one newline on
    each side dropped), typed as the request's tool schema types the parameter, as vLLM's qwen3_coder parser does:
    integers, numbers, booleans and null; objects and arrays as JSON (or a Python literal); text for strings, for
    parameters the schema does not name, and for values that do not parse as their type."""

    def __init__(self, marker: str, end: str, schemas: dict[str, dict] | None = None):
        self.marker, self.end, self.schemas = marker, end, schemas or {}
        self._call = re.compile(rf"{re.escape(marker)}(.*?)(?:{re.escape(end)}|\Z)", re.DOTALL)

    def for_tools(self, tools: list[dict]) -> "XmlCalls":
        """This parser with the request's tools' parameter schemas, by tool name."""
        return XmlCalls(self.marker, self.end, _parameter_schemas(tools))

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for body in self._call.findall(text):
            function = _FUNCTION.search(body)
            if function is None:
                raise ValueError("a tool call needs <function=NAME>")
            name, params = function.group(1).strip(), self.schemas.get(function.group(1).strip(), {})
            arguments = {key.strip(): _typed(_trimmed(value), params.get(key.strip()))
                         for key, value in _PARAMETER.findall(function.group(2))}
            calls.append(ToolCall(name, json.dumps(arguments, ensure_ascii=False)))
        return calls


class HarmonyCalls(_Marked):
    """gpt-oss's calls (vLLM's `openai` parser): commentary messages addressed `to=functions.NAME`, whose body is
    the arguments' JSON, passed on as they are. They are read from the content the `openai_gptoss` reasoning
    parser makes of a harmony answer (jaxinfer/server/harmony.py), where each call has one fixed form; the
    server turns that reasoning parser on with this one."""

    marker = harmony.CALL_MARKER
    _CALL = re.compile(rf"{re.escape(harmony.CALL_MARKER)}(.*?){re.escape(harmony.CALL_BODY)}(.*?)"
                       rf"(?:<\|call\|>|(?={re.escape(harmony.CALL_MARKER)})|\Z)", re.DOTALL)

    def _calls(self, text: str) -> list[ToolCall]:
        return [ToolCall(name, arguments) for name, arguments in self._CALL.findall(text)]


class GlmCalls(_Marked):
    """GLM-4.5/4.6/4.7's calls (vLLM's glm45 and glm47 parsers): `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V
    </arg_value>...</tool_call>`, one or more, each closed (an unclosed one is not a call); the name ends at the first
    newline or `<arg_key>`. A value whose parameter the request's tool schema types as a string is taken as it is;
    any other is read as JSON, else as a Python literal, else kept as its text (stripped). Content is the text before
    the first call (None if only whitespace)."""

    marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    _ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

    def __init__(self, schemas: dict[str, dict] | None = None):
        self.schemas = schemas or {}

    def for_tools(self, tools: list[dict]) -> "GlmCalls":
        return GlmCalls(_parameter_schemas(tools))

    def parse(self, text: str) -> Parsed:
        parsed = super().parse(text)
        return Parsed(None, parsed.calls) if parsed.calls and not (parsed.content or "").strip() else parsed

    def split(self, text: str, start: int) -> tuple[int, str | None]:
        end, settled = super().split(text, start)
        return (start, settled) if not text[:end].strip() else (end, settled)  # whitespace alone may not be content

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for body in self._CALL.findall(text):
            name = re.split(r"\n|<arg_key>", body, maxsplit=1)[0].strip()
            if not name:
                continue  # as vLLM: a call without a name is skipped
            params = self.schemas.get(name, {})
            arguments = {key.strip(): _glm_value(value, params.get(key.strip()))
                         for key, value in self._ARGUMENT.findall(body)}
            calls.append(ToolCall(name, json.dumps(arguments, ensure_ascii=False)))
        return calls


class ErnieCalls(_Marked):
    """ERNIE 4.5's calls (vLLM's ernie45 parser): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one or
    more, each closed; content is the text before the first, its trailing newlines dropped (None if nothing is left).
    A call that is not a JSON object leaves the whole answer content."""

    marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> Parsed:
        parsed = super().parse(text)
        return Parsed((parsed.content or "").rstrip("\n") or None, parsed.calls) if parsed.calls else parsed

    def split(self, text: str, start: int) -> tuple[int, str | None]:
        end, settled = super().split(text, start)
        while end > start and text[end - 1] == "\n":  # newlines before a call are not content: wait and see
            end -= 1
        return end, settled

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for body in self._CALL.findall(text):
            found = json.loads(body)
            if not isinstance(found, dict):
                raise ValueError("an ERNIE tool call is a JSON object")
            calls.append(ToolCall(str(found.get("name", "")), json.dumps(found.get("arguments", {}),
                                                                          ensure_ascii=False)))
        return calls


class DelimitedCalls(_Marked):
    """Calls between special tokens whose arguments' JSON text is passed on as it is (vLLM's deepseek_v3,
    deepseek_v31 and kimi_k2 parsers): content is the text before the calls section's start (`marker`); each call is
    a match of `pattern`, its groups `name` (or Kimi K2's `id`, functions.NAME:INDEX, which is also the call's id)
    and `arguments`."""

    def __init__(self, marker: str, pattern: str):
        self.marker, self._pattern = marker, re.compile(pattern, re.DOTALL)

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for match in self._pattern.finditer(text):
            found = match.groupdict()
            if "id" in found:
                call_id = found["id"].strip()
                calls.append(ToolCall(call_id.split(":")[0].split(".")[-1], found["arguments"].strip(), call_id))
            else:
                calls.append(ToolCall(found["name"].strip(), found["arguments"].strip()))
        return calls


DEEPSEEK_CALLS = "<｜tool▁calls▁begin｜>"


def _parameter_schemas(tools: list[dict]) -> dict[str, dict]:
    """The request's tools' parameter schemas, by tool name (for parsers that type arguments by them)."""
    functions = [tool.get("function") or {} for tool in tools]
    return {f.get("name"): (f.get("parameters") or {}).get("properties") or {} for f in functions}


def _glm_value(value: str, schema: dict | None):
    """A GLM call's argument: the text for a string parameter; else JSON, a Python literal, or the stripped text."""
    if (schema or {}).get("type") == "string":
        return value
    try:
        return _json_value(value.strip())
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return value.strip()


def _json_value(text: str):
    """`text` as JSON, else as a Python literal; TypeError for what JSON cannot hold (bytes, tuple keys)."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = _literal(ast.parse(text, mode="eval").body)
    json.dumps(parsed)
    return parsed


_FUNCTION = re.compile(r"<function=([^>]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


def _trimmed(value: str) -> str:
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _typed(value: str, schema: dict | None):
    """A parameter's text as the JSON value its schema's type says; the text where there is none or it fails."""
    kind = (schema or {}).get("type")
    kind = next((k for k in kind if k != "null"), None) if isinstance(kind, list) else kind
    if value.lower() == "null" and kind != "string":
        return None
    try:
        if kind == "integer":
            return int(value)
        if kind == "number":
            number = float(value)
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
        if kind == "boolean" and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if kind in ("object", "array"):
            return _json_value(value)  # what JSON cannot hold: the text instead
    except (ValueError, TypeError, SyntaxError, RecursionError):
        pass
    return value


PARSERS = {"hermes": Hermes(), "llama3_json": Llama3Json(), "mistral": Mistral(), "pythonic": Pythonic(),
           "llama4_pythonic": Pythonic("<|python_start|>", "<|python_end|>"),
           "qwen3_coder": XmlCalls("<tool_call>", "</tool_call>"),
           "seed_oss": XmlCalls("<seed:tool_call>", "</seed:tool_call>"), "glm45": GlmCalls(), "glm47": GlmCalls(),
           "ernie45": ErnieCalls(),
           # DeepSeek-V3/R1: <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
           "deepseek_v3": DelimitedCalls(DEEPSEEK_CALLS, r"<｜tool▁call▁begin｜>[^<]*?<｜tool▁sep｜>(?P<name>[^\n]*?)\s*"
                                                         r"```json\s*(?P<arguments>.*?)\s*```\s*<｜tool▁call▁end｜>"),
           # DeepSeek-V3.1: <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>
           "deepseek_v31": DelimitedCalls(DEEPSEEK_CALLS, r"<｜tool▁call▁begin｜>(?P<name>.*?)<｜tool▁sep｜>"
                                                          r"(?P<arguments>.*?)<｜tool▁call▁end｜>"),
           # Kimi K2: <|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>ARGS<|tool_call_end|>
           "kimi_k2": DelimitedCalls("<|tool_calls_section_begin|>", r"<\|tool_call_begin\|>\s*(?P<id>[^<]+:\d+)\s*"
                                     r"<\|tool_call_argument_begin\|>(?P<arguments>(?:(?!<\|tool_call_begin\|>).)*?)"
                                     r"<\|tool_call_end\|>"),
           "openai": HarmonyCalls()}


class ToolCallStream:
    """One choice's answer as it grows: `advance` gives the content that can be sent now, `finish` the rest of
    the content and the calls once the answer is complete. Both take the whole text so far."""

    def __init__(self, parser):
        self.parser = parser
        self.sent = 0  # characters of the text already given out as content
        self.settled: str | None = None  # "held" or "content" once the parser has decided

    def advance(self, text: str) -> str:
        if self.settled == "held":
            return ""
        if self.settled == "content":
            end = len(text)
        else:
            end, self.settled = self.parser.split(text, self.sent)
        piece, self.sent = text[self.sent:end], end
        return piece

    def finish(self, text: str) -> tuple[str, list[ToolCall]]:
        """-> (content not yet given out, the calls): the non-streamed parse of the whole text, less what was
        sent, which is always its beginning."""
        parsed = self.parser.parse(text)
        return (parsed.content or "")[self.sent:], parsed.calls
