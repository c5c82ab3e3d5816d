"""The OpenAI API's request and response shapes: bodies in, `GenerationRequest` out, and back to JSON.

Host code only. Every bad field raises `APIError` naming the field (HTTP 400 unless
said otherwise); the app turns it into an OpenAI-style error body. Fields follow
vLLM where it extends the API (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`min_tokens`, `stop_token_ids`, ...). Unknown fields are ignored and logged.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import re

from jaxinfer.engine.beam_search import BeamSearchParams
from jaxinfer.engine.request import INT32_MAX, MAX_LOGPROBS, SamplingParams, token_id_key
from jaxinfer.engine.structured import StructuredOutputsParams

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 400  # error messages never echo a large input back
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
          409: "ConflictError", 413: "RequestEntityTooLarge", 429: "RateLimitError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}
# Fields we do not serve whose answer would differ from what the client asked for if they were ignored: refused.
_REFUSED = {"suffix": "fill-in-the-middle (suffix) is not supported here",
            "guided_whitespace_pattern": "a whitespace pattern is not supported here (disable_any_whitespace is)"}
# vLLM's older request fields for structured outputs -> the `StructuredOutputsParams` field each sets.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# vLLM's other `structured_outputs` fields (a client that serializes the whole object sends them all): these
# mean nothing here and are dropped; those they set are 400, unless left at their defaults (null, false).
_STRUCTURED_DROPPED = ("disable_fallback", "_backend", "_backend_was_auto")
_STRUCTURED_UNSERVED = ("whitespace_pattern", "structural_tag")
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
                      "stop_token_ids", "seed", "logprobs", "echo", "stream", "stream_options", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "user",
                      "include_stop_str_in_output", "skip_special_tokens", "prompt_logprobs", "return_token_ids",
                      "logit_bias", "allowed_token_ids", "truncate_prompt_tokens", "priority", "bad_words",
                      "add_special_tokens", "cache_salt", "return_tokens_as_token_ids", "response_format",
                      "structured_outputs", "guided_decoding_backend", "use_beam_search", "length_penalty",
                      *_GUIDED, *_REFUSED}
_CHAT_FIELDS = (_COMPLETION_FIELDS - {"prompt", "echo", "suffix"}) | {
    "messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt", "continue_final_message",
    "chat_template", "chat_template_kwargs", "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort"}
REASONING_EFFORTS = ("low", "medium", "high")  # OpenAI's reasoning_effort, as vLLM takes it
_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered with `status` and the body `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers or {}

    def body(self) -> dict:
        message = str(self)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        message = message.encode("utf-8", "replace").decode()  # an echoed lone surrogate would fail the response
        return {"error": {"message": message, "type": _TYPES.get(self.status, "APIError"), "param": self.param,
                          "code": self.status}}


async def read_body(request, cap: int) -> bytes:
    """A Starlette request's body; 413 over `cap` bytes, refused from the declared length or while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"the request body is larger than {cap} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise APIError(413, f"the request body is larger than {cap} bytes")
    return bytes(body)


def parse_json(body: bytes):
    """A request body as JSON: 400 for bad UTF-8, malformed or too deeply nested JSON, or huge numbers."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise APIError(400, "malformed JSON: nested too deeply") from None
    except ValueError:  # json refuses integers of more than 4300 digits
        raise APIError(400, "malformed JSON: a number has too many digits") from None


def check_api_key(authorization: str, key: str) -> None:
    """401 unless `authorization` is 'Bearer <key>' (compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the served model and the server's flags allow."""

    vocab_size: int
    max_model_len: int
    max_n: int = 16
    max_logprobs: int = MAX_LOGPROBS
    # The model's generation_config.json defaults (vLLM's --generation-config): a request's own values win.
    sampling_defaults: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GenerationRequest:
    """One completions or chat body, validated. Prompts are text or token ids (one per choice group)."""

    chat: bool
    prompts: list  # str | list[int] each
    params: SamplingParams
    model: object  # the body's "model", as sent: Server.model checks it
    stream: bool
    include_usage: bool
    echo: bool = False
    echo_only: bool = False  # max_tokens 0 with echo: score the prompt, return no completion tokens
    logprobs: int | None = None  # top alternatives per token in the response (chat: top_logprobs)
    max_tokens_given: bool = True  # False: chat without max_tokens, which runs to the end of the context
    max_tokens_param: str = "max_tokens"  # the field that set it (chat: or max_completion_tokens), for errors
    return_token_ids: bool = False  # vLLM's extension: choices also carry token_ids (and prompt_token_ids)
    prompt_logprobs: bool = False  # vLLM's extension: the first (or only) choice of a prompt carries them
    priority: int = 0  # vLLM's extension: lower values are admitted first, ties in arrival order
    role: str = "assistant"  # chat: the answer's role; without a generation prompt, the last message's (vLLM)
    tool_choice: str = "none"  # chat: "auto" (tool calls are parsed out of the answer), "required", "named", "none"
    tool_name: str | None = None  # chat: the tool a "named" choice forces
    parallel_tool_calls: bool = True  # chat: false keeps only the first call parsed out of an answer (vLLM)
    tools: list = dataclasses.field(default_factory=list)  # chat: the request's tools (a parser may type by them)
    continuous_usage: bool = False  # stream: every chunk carries the usage so far (vLLM's continuous_usage_stats)
    add_special_tokens: bool = True  # a text prompt is encoded with BOS etc.; chat's default is false (vLLM's)
    cache_salt: str | None = None  # cached prompt pages are shared only among requests of the same salt (vLLM's)
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)
    structured_param: str | None = None  # the field that asked for structured outputs, for errors
    beam: BeamSearchParams | None = None  # vLLM's use_beam_search: n beams, the best first, instead of n samples


def _fail(message: str, param: str | None) -> None:
    raise APIError(400, message, param)


def _describe(value) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply"
    return text if len(text) <= 40 else text[:40] + "..."


def _int(body: dict, name: str, default=None):
    raw = body.get(name)
    if raw is None:
        return default
    value = _integer(raw)
    if value is None:
        _fail(f"{name} must be an integer, got {_describe(raw)}", name)
    return value


def _integer(value) -> int | None:
    """`value` as an int if it is one, or a float with no fraction (2.0, as pydantic's lax mode takes it for
    vLLM's int fields); None for anything else (booleans, 2.5, "2")."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(_float(value)):
        _fail(f"{name} must be a finite number, got {_describe(value)}", name)
    if not low <= value <= high:
        _fail(f"{name} must be in [{low}, {high}], got {value}", name)
    return float(value)


def _float(value: int | float) -> float:
    """JSON integers have no size limit; one too large for a float counts as infinite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        _fail(f"{name} must be true or false, got {_describe(value)}", name)
    return value


def _token_ids(value, limits: Limits, param: str) -> list[int]:
    ids = [_integer(t) for t in value]
    for t, raw in zip(ids, value):
        if t is None:
            _fail(f"{param} token ids must be integers, got {_describe(raw)}", param)
        if not 0 <= t < limits.vocab_size:
            _fail(f"token id {t} in {param} is outside the vocabulary [0, {limits.vocab_size})", param)
    return ids


def _priority(body: dict) -> int:
    priority = _int(body, "priority", 0)
    if not -2**63 <= priority < 2**63:
        _fail(f"priority must fit in a signed 64-bit integer, got {priority}", "priority")
    return priority


def _logit_bias(body: dict, limits: Limits) -> dict[int, float]:
    """OpenAI's {"token id": bias}; biases clamped to [-100, 100], as vLLM does."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(f"logit_bias must be an object of token id -> bias, got {_describe(value)}", "logit_bias")
    ids = [token_id_key(key) for key in value]  # JSON keys are strings
    for key, t in zip(value, ids):
        if isinstance(t, str):
            _fail(f"logit_bias keys must be token ids, got {_describe(key)}", "logit_bias")
    _token_ids(ids, limits, "logit_bias")
    biases = list(value.values())
    for bias in biases:
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(_float(bias)):
            _fail(f"logit_bias values must be finite numbers, got {_describe(bias)}", "logit_bias")
    return {t: min(100.0, max(-100.0, float(b))) for t, b in zip(ids, biases)}


def _id_list(body: dict, limits: Limits, name: str) -> tuple[int, ...] | None:
    """A field holding a list of token ids (stop_token_ids, allowed_token_ids); None if absent."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        _fail(f"{name} must be a list of token ids, got {_describe(value)}", name)
    return tuple(_token_ids(value, limits, name))


def parse_token_ids(value, limits: Limits, param: str) -> list[int]:
    """One list of token ids (may be empty), as vLLM's `/detokenize` takes them."""
    if not isinstance(value, list):
        _fail(f"{param} must be a list of token ids, got {_describe(value)}", param)
    return _token_ids(value, limits, param)


def parse_prompts(value, limits: Limits, param: str = "prompt") -> list:
    """A completions `prompt` (or /detokenize's `tokens`): a string, a list of strings, a list of token ids or a
    list of such lists."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(f"{param} must be a non-empty string, list of strings, list of token ids or list of token-id lists",
              param)
    if all(isinstance(p, str) for p in value):
        if not all(value):
            _fail(f"{param} must not be empty", param)
        return list(value)
    if all(isinstance(p, list) for p in value):
        if not all(value):
            _fail(f"{param} must not be empty: a token-id list has no tokens", param)
        return [_token_ids(p, limits, param) for p in value]
    return [_token_ids(value, limits, param)]


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        _fail("stop must be a string or a list of strings", "stop")
    if not all(stops):
        _fail("stop must not contain an empty string", "stop")
    return tuple(stops)


def _bad_words(body: dict) -> tuple[str, ...]:
    words = body.get("bad_words")
    if words is None:
        return ()
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        _fail(f"bad_words must be a list of strings, got {_describe(words)}", "bad_words")
    return tuple(words)


def _cache_salt(body: dict) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        _fail(f"cache_salt must be a non-empty string, got {_describe(salt)}", "cache_salt")
    return salt


def _stream(body: dict) -> tuple[bool, bool, bool]:
    """-> (stream, include_usage, continuous_usage_stats): vLLM sends usage in every chunk only with both."""
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not stream:
        _fail("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        _fail("stream_options must be an object", "stream_options")
    include_usage = _bool(options, "include_usage", False)
    return stream, include_usage, include_usage and _bool(options, "continuous_usage_stats", False)


def _sampling(body: dict, limits: Limits, max_tokens: int | None, logprobs: int | None,
              prompt_logprobs: int | None, structured: StructuredOutputsParams | None = None) -> SamplingParams:
    body = {**limits.sampling_defaults, **{name: value for name, value in body.items() if value is not None}}
    n = _int(body, "n", 1)
    if not 1 <= n <= limits.max_n:
        _fail(f"n must be in [1, {limits.max_n}], got {n}", "n")
    top_k = _int(body, "top_k", 0)
    if top_k < -1:
        _fail(f"top_k must be -1 (no limit) or >= 0, got {top_k}", "top_k")
    if top_k >= limits.vocab_size:  # keeps every token, as 0 does; as it is it could overflow the device's int32 row
        top_k = 0
    seed = _int(body, "seed")
    if seed is not None and not -2**63 <= seed < 2**63:
        _fail(f"seed must fit in a signed 64-bit integer, got {seed}", "seed")
    stop_token_ids = _id_list(body, limits, "stop_token_ids") or ()
    min_tokens = _int(body, "min_tokens", 0)
    # chat without max_tokens runs to the end of the context: more than that is never met (nor fits in int32)
    most, most_name = (max_tokens, "max_tokens") if max_tokens is not None else (limits.max_model_len, "max_model_len")
    if not 0 <= min_tokens <= most:
        _fail(f"min_tokens must be in [0, {most_name}={most}], got {min_tokens}", "min_tokens")
    try:
        return SamplingParams(
            n=n, max_tokens=max_tokens, min_tokens=min_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0), top_k=top_k,
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, math.inf),  # > 0, as vLLM
            seed=seed, stop=_stop(body),
            stop_token_ids=stop_token_ids,
            include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
            ignore_eos=_bool(body, "ignore_eos", False), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=_bool(body, "skip_special_tokens", True), logit_bias=_logit_bias(body, limits),
            allowed_token_ids=_id_list(body, limits, "allowed_token_ids"),
            truncate_prompt_tokens=_int(body, "truncate_prompt_tokens"), bad_words=_bad_words(body),
            structured_outputs=structured)
    except ValueError as e:  # the remaining bounds (top_p > 0, repetition_penalty > 0): the field leads the message
        field = re.match(r"\w+", str(e))
        raise APIError(400, str(e), field.group(0) if field else None) from None


# What beam search (each round: a token's logprobs from the raw distribution) cannot honour: set, these are 400.
_BEAM_REFUSED = ("stop", "stop_token_ids", "min_tokens", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "logit_bias", "allowed_token_ids", "bad_words",
                 "structured_outputs", "prompt_logprobs")


def _beam(body: dict, params: SamplingParams, limits: Limits, structured_param: str | None) -> BeamSearchParams | None:
    """vLLM's `use_beam_search`: `n` beams (the width) of up to `max_tokens` (chat without it: to the end of the
    context), ranked with `length_penalty`; the sampling fields it would ignore are refused instead."""
    length_penalty = _number(body, "length_penalty", 1.0, -math.inf, math.inf)
    if not _bool(body, "use_beam_search", False):
        return None
    plain = SamplingParams()
    refused = next((name for name in _BEAM_REFUSED if getattr(params, name) != getattr(plain, name)), None)
    if refused is not None:
        refused = structured_param if refused == "structured_outputs" else refused
        _fail(f"{refused} is not supported with use_beam_search", refused)
    try:
        return BeamSearchParams(params.n, params.max_tokens or limits.max_model_len, params.ignore_eos,
                                params.temperature, length_penalty, params.include_stop_str_in_output)
    except ValueError as e:
        raise APIError(400, str(e).replace("beam_width", "n (the beam width)", 1), "n") from None


def check_sampling_defaults(defaults: dict) -> None:
    """Start-up: the generation config's defaults must pass the checks a request's fields do (ValueError)."""
    most = defaults.get("max_tokens")
    if most is not None and (not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= INT32_MAX):
        raise ValueError(f"the generation config's default max_tokens (max_new_tokens) must be a positive integer, "
                         f"got {most!r}")
    try:
        _sampling({}, Limits(INT32_MAX, INT32_MAX, sampling_defaults=defaults), 16, None, None)
    except APIError as e:
        raise ValueError(f"the generation config's default {e.param}: {e}") from None


def _logprobs_count(raw, name: str, limits: Limits) -> int | None:
    if raw is None:
        return None
    value = _integer(raw)
    if value is None or not 0 <= value <= limits.max_logprobs:
        _fail(f"{name} must be an integer in [0, {limits.max_logprobs}], got {_describe(raw)}", name)
    return value


def _max_tokens(body: dict, name: str, default: int | None) -> int | None:
    value = _int(body, name, default)
    if value is not None and not 0 <= value <= INT32_MAX:
        _fail(f"{name} must be in [0, {INT32_MAX}], got {value}", name)
    return value


def check_text(body: dict) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which is no text: the tokenizer and the response
    encoder would fail on it."""
    for key, value in body.items():
        param = key.encode("utf-8", "replace").decode()
        try:
            json.dumps([key, value], ensure_ascii=False).encode()
        except UnicodeEncodeError:
            _fail("the request holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text", param)
        except RecursionError:  # json.loads stopped just short of the limit, from a shallower stack
            _fail("malformed JSON: nested too deeply", param)


def _check_fields(body: dict, known: set[str]) -> None:
    """Unknown fields are logged and ignored, as vLLM does; the `_REFUSED` ones are 400."""
    unknown = sorted(set(body) - known)
    if unknown:
        log.info("ignoring unknown request fields: %s", ", ".join(k[:40] for k in unknown[:10]))
    for name, why in _REFUSED.items():
        value = body.get(name) if name in known else None  # chat has no suffix: ignored there, as in vLLM
        if value not in (None, ""):
            _fail(f"{name}: {why}", name)


def _structured(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """The body's structured outputs and the field that gave them: OpenAI's `response_format` (json_object,
    json_schema), vLLM's `structured_outputs` object, or its older `guided_*` fields; at most one kind."""
    found = [(name, body[name]) for name in ("response_format", "structured_outputs", *_GUIDED)
             if body.get(name) is not None]
    found = [(name, value) for name, value in found if (name, value) != ("response_format", {"type": "text"})]
    if len(found) > 1:
        _fail(f"only one kind of structured outputs can be asked for, got {' and '.join(n for n, _ in found)}",
              found[1][0])
    if not found:
        return None, None
    name, value = found[0]
    if name == "response_format":
        fields = _response_format(value)
    elif name == "structured_outputs":
        if not isinstance(value, dict):
            _fail(f"structured_outputs must be an object, got {_describe(value)}", name)
        fields = {k: v for k, v in value.items()
                  if k not in _STRUCTURED_DROPPED and not (k in _STRUCTURED_UNSERVED and v in (None, False))}
        unserved = [k for k in _STRUCTURED_UNSERVED if k in fields]
        if unserved:
            _fail(f"structured_outputs: {unserved[0]} is not supported here", name)
    else:
        fields = {_GUIDED[name]: value}
    try:
        return StructuredOutputsParams(**fields), name
    except TypeError as e:  # an unknown field of structured_outputs
        _fail(f"{name}: {e}".replace("StructuredOutputsParams.__init__()", "structured outputs"), name)
    except ValueError as e:
        _fail(f"{name}: {e}", name)


def _response_format(value) -> dict:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or spec.get("schema") is None:
            _fail("response_format json_schema needs a json_schema object with a schema", "response_format")
        return {"json": spec["schema"]}
    _fail("response_format type must be 'text', 'json_object' or 'json_schema', got "
          f"{_describe(kind if kind is not None else value)}", "response_format")


def parse_completion(body, limits: Limits) -> GenerationRequest:
    if not isinstance(body, dict):
        _fail("the request body must be a JSON object", None)
    check_text(body)
    _check_fields(body, _COMPLETION_FIELDS)
    if "prompt" not in body:
        _fail("prompt is required", "prompt")
    prompts = parse_prompts(body["prompt"], limits)
    echo = _bool(body, "echo", False)
    max_tokens = _max_tokens(body, "max_tokens", 16)
    if max_tokens == 0 and not echo:
        _fail("max_tokens must be at least 1 (0 is allowed only with echo, to score the prompt)", "max_tokens")
    logprobs = _logprobs_count(body.get("logprobs"), "logprobs", limits)
    prompt_logprobs = _logprobs_count(body.get("prompt_logprobs"), "prompt_logprobs", limits)
    if echo and logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, logprobs)
    stream, include_usage, continuous_usage = _stream(body)
    structured, structured_param = _structured(body)
    if echo and _bool(body, "use_beam_search", False):
        _fail("echo is not supported with use_beam_search", "echo")
    params = _sampling(body, limits, max(max_tokens, 1), logprobs, prompt_logprobs, structured)
    return GenerationRequest(False, prompts, params, body.get("model"), stream, include_usage, echo, max_tokens == 0,
                             logprobs, return_token_ids=_bool(body, "return_token_ids", False),
                             prompt_logprobs=body.get("prompt_logprobs") is not None, priority=_priority(body),
                             continuous_usage=continuous_usage,
                             add_special_tokens=_bool(body, "add_special_tokens", True), cache_salt=_cache_salt(body),
                             tokens_as_ids=_bool(body, "return_tokens_as_token_ids", False),
                             structured_param=structured_param,
                             beam=_beam(body, params, limits, structured_param))


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        _fail("messages must be a non-empty list", "messages")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            # As vLLM: any role the chat template knows (Llama 3.1's "ipython", say), not only OpenAI's.
            _fail(f"each message needs a role: a string such as {', '.join(_ROLES)}", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is served
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                _fail("message content parts must be of type 'text' with a string 'text'", "messages")
            content = "\n".join(p["text"] for p in content)  # as vLLM joins text parts
        elif content is not None and not isinstance(content, str):
            _fail("message content must be a string, a list of text parts or null", "messages")
        # null content (an assistant's tool-call turn) reaches the template as "", as vLLM passes it: a template
        # testing `"x" in message.content` (gpt-oss's) fails on None
        messages.append({**message, "content": "" if content is None else content, **_thinking(message)})
    return messages


def _thinking(message: dict) -> dict:
    """An assistant message's earlier thinking sent back (vLLM's `reasoning`, or `reasoning_content`) also as the
    `thinking` gpt-oss's template reads (it keeps a tool call's analysis in the next prompt, as vLLM's harmony
    rendering does); a message's own `thinking` stays."""
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if message["role"] != "assistant" or "thinking" in message or not isinstance(reasoning, str):
        return {}
    return {"thinking": reasoning}


def _template_kwargs(body: dict) -> dict:
    """The chat template's arguments: the request's own fields, updated with chat_template_kwargs (which win, as
    in vLLM and `LLM.chat`). As in vLLM, add_generation_prompt defaults to true, so continue_final_message needs
    it set false; tools are rendered into the prompt whatever the tool_choice; reasoning_effort goes to the
    template (gpt-oss's reads it; others ignore it)."""
    extra = body.get("chat_template_kwargs")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        _fail("chat_template_kwargs must be an object", "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        _fail(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {_describe(effort)}",
              "reasoning_effort")
    fields = ("tools", "chat_template", "add_generation_prompt", "continue_final_message", "reasoning_effort")
    kwargs = {**{name: body[name] for name in fields if body.get(name) is not None}, **extra}
    kwargs["add_generation_prompt"] = _bool(kwargs, "add_generation_prompt", True)
    kwargs["continue_final_message"] = _bool(kwargs, "continue_final_message", False)
    if kwargs["add_generation_prompt"] and kwargs["continue_final_message"]:
        _fail("continue_final_message and add_generation_prompt cannot both be true (add_generation_prompt defaults "
              "to true): send add_generation_prompt: false to continue the final message", "continue_final_message")
    tools = kwargs.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        _fail(f"tools must be a list of tool objects, got {_describe(tools)}", "tools")
    if tools == []:
        _fail("tools must not be an empty array: leave it out, or give the tools the model may call", "tools")
    if kwargs.get("chat_template") is not None and not isinstance(kwargs["chat_template"], str):
        _fail(f"chat_template must be a string (a Jinja template), got {_describe(kwargs['chat_template'])}",
              "chat_template")
    return kwargs


def _tool_choice(body: dict) -> tuple[str, str | None]:
    """The body's tool choice by vLLM's rules, "none", "auto", "required" or "named" (with the tool's name):
    absent, it is "auto" when tools are given (null: "none"); any other choice needs tools."""
    if "tool_choice" not in body:
        return ("auto" if body.get("tools") else "none"), None
    choice = body["tool_choice"]
    if choice in (None, "none"):
        return "none", None
    if body.get("tools") is None:
        _fail("tool_choice needs tools: send the tools the model may call", "tool_choice")
    if choice in ("auto", "required"):
        return choice, None
    if not isinstance(choice, dict) or choice.get("type") != "function":
        _fail(f"tool_choice must be 'none', 'auto', 'required' or a named tool, got {_describe(choice)}",
              "tool_choice")
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        _fail(f"a named tool_choice is {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got "
              f"{_describe(choice)}", "tool_choice")
    return "named", name


def _function(tool: dict) -> dict:
    function = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(function, dict) \
            or not isinstance(function.get("name"), str):
        _fail(f"a tool is {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}, "
              f"got {_describe(tool)}", "tools")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        _fail(f"a tool's parameters are a JSON schema object, got {_describe(parameters)}", "tools")
    return function


def _forced_call_schema(tools: list[dict], choice: str, name: str | None, parallel: bool) -> dict:
    """The JSON schema vLLM holds a forced call to: a named tool's parameters are the whole answer; "required"
    answers a list of calls, each {"name": a tool's, "parameters": that tool's} (one only without parallel calls)."""
    functions = [_function(tool) for tool in tools]
    parameters = {f["name"]: f.get("parameters") or {"type": "object", "properties": {}} for f in functions}
    if choice == "named":
        if name not in parameters:
            _fail(f"tool_choice names the tool {_describe(name)}, which is not in tools", "tool_choice")
        return parameters[name]
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f]}, "parameters": p},
              "required": ["name", "parameters"]} for f, p in parameters.items()]
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": calls}}


def parse_chat(body, limits: Limits) -> tuple[GenerationRequest, list[dict], dict]:
    """-> (the request with no prompt yet, the messages, template kwargs); the app renders the template."""
    if not isinstance(body, dict):
        _fail("the request body must be a JSON object", None)
    check_text(body)
    _check_fields(body, _CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _max_tokens(body, name, None)
    if max_tokens == 0:
        _fail(f"{name} must be at least 1", name)
    logprobs = None
    if _bool(body, "logprobs", False):
        logprobs = _logprobs_count(body.get("top_logprobs", 0), "top_logprobs", limits)
    elif body.get("top_logprobs") is not None:
        _fail("top_logprobs needs logprobs set to true", "top_logprobs")
    kwargs = _template_kwargs(body)
    stream, include_usage, continuous_usage = _stream(body)
    prompt_logprobs = _logprobs_count(body.get("prompt_logprobs"), "prompt_logprobs", limits)
    structured, structured_param = _structured(body)
    tool_choice, tool_name = _tool_choice(body)
    parallel_tool_calls = _bool(body, "parallel_tool_calls", True)
    if tool_choice in ("required", "named"):  # as vLLM: structured outputs make the answer the call
        if structured is not None:
            _fail(f"tool_choice {tool_choice!r} cannot be combined with {structured_param}: it sets the answer's "
                  "structure itself", "tool_choice")
        schema = _forced_call_schema(kwargs["tools"], tool_choice, tool_name, parallel_tool_calls)
        structured, structured_param = StructuredOutputsParams(json=schema), "tools"
    default = limits.sampling_defaults.get("max_tokens")  # the generation config's; the engine cuts it to the context
    params = _sampling(body, limits, default if max_tokens is None else max_tokens, logprobs, prompt_logprobs,
                       structured)
    request = GenerationRequest(True, [], params, body.get("model"), stream, include_usage, logprobs=logprobs,
                                max_tokens_given=max_tokens is not None, max_tokens_param=name,
                                return_token_ids=_bool(body, "return_token_ids", False),
                                prompt_logprobs=prompt_logprobs is not None, priority=_priority(body),
                                role="assistant" if kwargs["add_generation_prompt"] else messages[-1]["role"],
                                tool_choice=tool_choice, tool_name=tool_name,
                                parallel_tool_calls=parallel_tool_calls, tools=kwargs.get("tools") or [],
                                continuous_usage=continuous_usage,
                                add_special_tokens=_bool(body, "add_special_tokens", False),
                                cache_salt=_cache_salt(body),
                                tokens_as_ids=_bool(body, "return_tokens_as_token_ids", False),
                                structured_param=structured_param,
                                beam=_beam(body, params, limits, structured_param))
    return request, messages, kwargs


# --- responses ------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token ids to the strings logprobs report (`Tokenizer.token_text`; no tokenizer: 'token_id:N')."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.tokenizer is None else self.tokenizer.token_text(token_id)


def completion_logprobs(entries: list, ids: list[int], token_text: TokenText, offset: int) -> dict:
    """The completions `logprobs` object for tokens `ids` with engine entries ({token id: Logprob}: the top
    alternatives in rank order, then the token if it is not one of them) or None (a prompt's first token);
    `offset` = characters of text before the first token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(ids, entries):
        text = token_text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_finite(entry[token_id].logprob))
        out["top_logprobs"].append({token_text(t): _finite(lp.logprob) for t, lp in entry.items()})
    return out


def chat_logprobs(entries: list, ids: list[int], token_text: TokenText, top: int) -> dict:
    """The chat `logprobs` object: each token's logprob and its `top` most likely alternatives."""
    content = []
    for token_id, entry in zip(ids, entries):
        text = token_text(token_id)
        alternatives = [{"token": token_text(t), "logprob": _finite(lp.logprob), "bytes": list(token_text(t).encode())}
                        for t, lp in list(entry.items())[:top]]
        content.append({"token": text, "logprob": _finite(entry[token_id].logprob), "bytes": list(text.encode()),
                        "top_logprobs": alternatives})
    return {"content": content}


def prompt_logprobs_json(entries: list) -> list:
    """Prompt logprobs as vLLM's responses carry them: per prompt token None (the first) or
    {"token id": {"logprob", "rank", "decoded_token"}}."""
    return [None if entry is None else
            {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in entry.items()} for entry in entries]


def _finite(value: float) -> float:
    """JSON has no -inf: a logprob of -inf is reported as the most negative float, as vLLM does."""
    return max(float(value), -9999.0)
