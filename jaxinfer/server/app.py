"""The OpenAI-compatible HTTP app: routes, server-sent events, admission, auth and health.

`Server` holds what the routes share: the engine (None while it loads and warms
up), the health state and the number of sequences handed to the engine and not
yet finished (the bound behind 429). `build_app(server)` is the Starlette app.
The engine loop runs in its own thread; routes only call its thread-safe
`add_request`, `abort`, `stats` and `reset_prefix_cache`. Every request's engine
work is aborted when its response ends early (client gone, error), so pages
never outlive a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import jaxinfer
from jaxinfer.engine.beam_search import search_stream
from jaxinfer.engine.engine import Engine, EngineError
from jaxinfer.engine.request import MAX_LOGPROBS
from jaxinfer.server import metrics
from jaxinfer.server.protocol import (APIError, GenerationRequest, Limits, TokenText, chat_logprobs, check_api_key,
                                      check_sampling_defaults, check_text, completion_logprobs, parse_chat,
                                      parse_completion, parse_json, parse_token_ids, prompt_logprobs_json, read_body,
                                      usage)
from jaxinfer.server.reasoning import PARSERS as REASONING_PARSERS
from jaxinfer.server.reasoning import ReasoningStream, reasoning_tokens
from jaxinfer.server import responses
from jaxinfer.server.tool_calls import PARSERS, Forced, ToolCallStream
from jaxinfer.tokenizer import CHAT_TEMPLATE_ERRORS, openai_messages

log = logging.getLogger(__name__)
HARMONY = "openai_gptoss"  # gpt-oss's reasoning parser: on by default for it, as vLLM reads its channels


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    served_model_name: str = "jaxinfer"
    model_aliases: tuple[str, ...] = ()  # other names requests may use (vLLM's --served-model-name A B ...)
    model_path: str | None = None  # reported by /v1/models as the model's root
    api_key: str | None = None  # guards /v1/*; /health and /metrics stay open
    max_queue: int = 256  # sequences allowed to wait beyond the engine's slots; more get 429
    max_n: int = 16
    max_body_bytes: int = 4 * 2**20
    retry_after_seconds: int = 1
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    # A request's own chat_template runs code the operator never read (a sandbox bounds what it touches, not
    # how long it runs): refused unless trusted, as vLLM's --trust-request-chat-template.
    trust_request_chat_template: bool = False
    # vLLM's --chat-template (its source): what chat requests render with unless they send their own.
    chat_template: str | None = None
    # vLLM's --enable-auto-tool-choice --tool-call-parser NAME: tool_choice "auto" parses the answer's tool calls
    # with PARSERS[NAME]. None: "auto" is 400, as in vLLM without those flags.
    tool_call_parser: str | None = None
    # vLLM's --reasoning-parser NAME: chat answers' thinking comes back apart from their content.
    reasoning_parser: str | None = None
    # vLLM's --structured-outputs-config: disable_any_whitespace / disable_additional_properties for every request
    # (backend: "auto" or "guidance", the one built in; disable_fallback: nothing to fall back to).
    structured_outputs_config: dict = dataclasses.field(default_factory=dict)
    # vLLM's --generation-config: default temperature, top_p, top_k, min_p and repetition_penalty from the
    # model's generation_config.json; a request's own values win.
    sampling_defaults: dict = dataclasses.field(default_factory=dict)
    # vLLM's --max-logprobs: the most logprobs, top_logprobs or prompt_logprobs a request may ask for (400 above).
    max_logprobs: int = MAX_LOGPROBS

    def __post_init__(self):
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}] (the most alternatives the sampler "
                             f"returns), got {self.max_logprobs}")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool-call parser {self.tool_call_parser!r}; known: {', '.join(PARSERS)}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}; known: "
                             f"{', '.join(REASONING_PARSERS)}")
        if self.tool_call_parser == "openai":  # gpt-oss's calls are read from what the harmony reader makes
            if self.reasoning_parser not in (None, HARMONY):
                raise ValueError(f"the openai tool-call parser reads gpt-oss's harmony answers, which needs the "
                                 f"{HARMONY} reasoning parser, not {self.reasoning_parser!r}")
            object.__setattr__(self, "reasoning_parser", HARMONY)
        _check_structured_config(self.structured_outputs_config)
        check_sampling_defaults(self.sampling_defaults)


STRUCTURED_CONFIG = {"backend": ("auto", "guidance"), "disable_fallback": (False, True),
                     "disable_any_whitespace": (False, True), "disable_additional_properties": (False, True)}


def _check_structured_config(config: dict) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"the structured outputs config is a JSON object, got {config!r:.80}")
    for key, value in config.items():
        if key not in STRUCTURED_CONFIG:
            raise ValueError(f"unknown structured outputs config {key!r}; known: {', '.join(STRUCTURED_CONFIG)}")
        if not any(value == allowed and type(value) is type(allowed) for allowed in STRUCTURED_CONFIG[key]):
            raise ValueError(f"structured outputs config {key} must be one of {STRUCTURED_CONFIG[key]} (the guidance "
                             f"backend, llguidance, is the one built in), got {value!r:.80}")


class Server:
    """The state the routes share. Health: starting -> ready -> draining, or dead after an engine failure."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.engine: Engine | None = None
        self.health = "starting"
        self.in_flight = 0  # sequences handed to the engine and not finished
        self.active: dict[str, list[str]] = {}  # response id -> its engine request ids
        self.on_fatal = lambda: None  # set by whoever runs the app: stop the process after an engine failure
        self.limits: Limits | None = None
        self.token_text: TokenText | None = None

    def ready(self, engine: Engine) -> None:
        self.engine = engine
        if self.config.reasoning_parser is None and getattr(engine.model_config, "model_type", None) == "gpt_oss":
            log.info("gpt-oss answers in harmony channels: reading them with the %s reasoning parser", HARMONY)
            self.config = dataclasses.replace(self.config, reasoning_parser=HARMONY)
        if self.config.reasoning_parser is not None and engine.tokenizer is not None:
            # As vLLM with a reasoning parser: structured outputs hold from the end of the thinking.
            markers = REASONING_PARSERS[self.config.reasoning_parser].thinking_markers(engine.tokenizer)
            engine.grammars.thinking_tokens = markers
        for key in engine.grammars.defaults:
            engine.grammars.defaults[key] = self.config.structured_outputs_config.get(key, False)
        self.limits = Limits(engine.vocab_size, engine.cfg.max_model_len, self.config.max_n,
                             max_logprobs=self.config.max_logprobs, sampling_defaults=self.config.sampling_defaults)
        self.token_text = TokenText(engine.tokenizer)
        self.health = "ready"

    @property
    def capacity(self) -> int:
        return self.engine.cfg.max_slots + self.config.max_queue

    def model(self, name) -> str:
        """The served model's name for a request's `model` (None: this one); 400 for a non-string, 404 for
        another name. Every route that takes `model` checks it here."""
        served = self.config.served_model_name
        if name is not None and not isinstance(name, str):
            raise APIError(400, "model must be a string", "model")
        if name is not None and name != served and name not in self.config.model_aliases:
            names = "', '".join((served, *self.config.model_aliases))
            raise APIError(404, f"the model '{name[:100]}' does not exist; this server serves '{names}'", "model")
        return served

    def fail(self, reason: str) -> None:
        if self.health != "dead":
            log.error("the engine cannot continue (%s): /health is now 503 and the server stops", reason)
            self.health = "dead"
            self.on_fatal()

    async def drain(self) -> None:
        """Refuse new requests and wait (up to shutdown_timeout) for those in flight; abort the rest."""
        self.health = "draining" if self.health != "dead" else "dead"
        deadline = time.monotonic() + self.config.shutdown_timeout
        log.info("draining %d sequences in flight (up to %.0fs)", self.in_flight, self.config.shutdown_timeout)
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for ids in list(self.active.values()):
            for request_id in ids:
                self.engine.abort(request_id)
        if self.in_flight:
            log.warning("shutdown timeout: aborted %d sequences still in flight", self.in_flight)

    async def watch(self) -> None:
        """Notice an engine that died between requests."""
        while True:
            if self.engine is not None and self.engine.error is not None:
                self.fail(f"{type(self.engine.error).__name__}: {self.engine.error}")
            await asyncio.sleep(0.25)


# --- request plumbing ------------------------------------------------------------------------


def render_chat(server: Server, messages: list[dict], kwargs: dict) -> str:
    """A chat request's prompt text, from `parse_chat`'s messages and template kwargs; 400 for a template that
    cannot render them."""
    if kwargs.get("chat_template") is not None and not server.config.trust_request_chat_template:
        raise APIError(400, "this server does not run chat templates sent with requests (its operator can start it "
                            "with --trust-request-chat-template, as in vLLM); leave chat_template out to use the "
                            "model's", "chat_template")
    if kwargs.get("chat_template") is None and server.config.chat_template is not None:
        kwargs = {**kwargs, "chat_template": server.config.chat_template}
    try:
        return server.engine.tokenizer.apply_chat_template(openai_messages(messages), **kwargs)
    except jinja2.TemplateSyntaxError as e:
        raise APIError(400, f"the chat template is not valid Jinja: {e}", "chat_template") from None
    except CHAT_TEMPLATE_ERRORS as e:
        raise APIError(400, f"the chat template could not render these messages: {e}", "messages") from None


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_json(request: Request, cap: int):
    """The body as JSON; 413 over `cap` bytes (checked while reading), 400 for bad UTF-8 or JSON."""
    return parse_json(await read_body(request, cap))


def endpoint(server: Server, handler, guarded: bool = True, needs_engine: bool = True):
    """A route: API key check, readiness, and every failure as an OpenAI-style error body."""

    async def route(request: Request) -> Response:
        try:
            if guarded and server.config.api_key is not None:
                check_api_key(request.headers.get("authorization", ""), server.config.api_key)
            if needs_engine and server.health != "ready":
                raise APIError(503, f"the server is {server.health}", headers={"Retry-After": "5"})
            return await handler(request)
        except APIError as e:
            return _error_response(e)
        except ClientDisconnect:  # gone while sending its body: routine, nothing admitted, nobody reads the answer
            return Response(status_code=499)
        except Exception as e:  # a bug or an engine failure: a bounded 500, the server goes on
            log.exception("%s %s failed", request.method, request.url.path)
            return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    return route


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merged(streams):
    """(prompt index, RequestOutput) from several request streams as they come; errors re-raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out, None))
        except Exception as e:
            await queue.put((i, None, e))
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                open_streams -= 1
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()


class _GuardedStream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (finished, client gone, cancelled)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


# --- generation ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """One completions/chat call in flight: its prompts, engine streams and what was already sent."""

    request: GenerationRequest
    response_id: str
    created: int
    model: str
    prompts: list[tuple[str, list[int]]]  # (text, ids)
    request_ids: list[str]
    streams: list = dataclasses.field(default_factory=list)
    sent_text: dict = dataclasses.field(default_factory=dict)  # choice index -> characters sent
    sent_tokens: dict = dataclasses.field(default_factory=dict)  # choice index -> tokens sent
    finished: set = dataclasses.field(default_factory=set)  # choice indices whose last chunk went out
    released: bool = False
    tool_parser: object = None  # chat with tool_choice "auto", "required" or named: finds each choice's calls
    tool_streams: dict = dataclasses.field(default_factory=dict)  # choice index -> its ToolCallStream
    reasoning: object = None  # chat on a server with a reasoning parser: splits the thinking from the content
    reasoning_streams: dict = dataclasses.field(default_factory=dict)  # choice index -> its ReasoningStream
    sent_content: dict = dataclasses.field(default_factory=dict)  # chat: choice index -> content characters sent
    responses: dict | None = None  # a Responses API call: the request's fields its response echoes


class Generation:
    """The completions and chat routes over a `Server`."""

    def __init__(self, server: Server):
        self.server = server

    async def completions(self, request: Request) -> Response:
        server = self.server
        req = parse_completion(await read_json(request, server.config.max_body_bytes), server.limits)
        model = server.model(req.model)
        self._check_room(req.params.n * len(req.prompts), len(req.prompts))
        # Tokenizing a few MB of text takes seconds: off the event loop, so other requests go on.
        prompts = await asyncio.to_thread(lambda: [self._prompt(p, req, "prompt") for p in req.prompts])
        return await self._run(request, req, prompts, model, "cmpl")

    async def chat(self, request: Request) -> Response:
        body = await read_json(request, self.server.config.max_body_bytes)
        return await self._chat(request, *parse_chat(body, self.server.limits))

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API: the chat request it means, answered as a response (`server/responses.py`)."""
        body, echo = responses.to_chat(await read_json(request, self.server.config.max_body_bytes))
        try:
            parsed = parse_chat(body, self.server.limits)
        except APIError as e:  # name the field the caller sent
            raise APIError(e.status, str(e).replace("max_tokens", "max_output_tokens"),
                           responses.chat_param(e.param), e.headers) from None
        return await self._chat(request, *parsed, response_fields=echo)

    async def _chat(self, request: Request, req: GenerationRequest, messages: list[dict], kwargs: dict,
                    response_fields: dict | None = None) -> Response:
        """A chat request, answered as a chat completion, or with `response_fields` as a response."""
        server = self.server
        model = server.model(req.model)
        if server.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions")
        tool_parser = self._tool_parser(req)
        reasoning = REASONING_PARSERS.get(server.config.reasoning_parser)
        if reasoning is not None and reasoning.keep_special_tokens:  # gpt-oss's harmony: its tags are special tokens
            req.params = dataclasses.replace(req.params, skip_special_tokens=False)
        self._check_room(req.params.n, 1)
        prompt = await asyncio.to_thread(self._chat_prompt, req, messages, kwargs)
        return await self._run(request, req, [prompt], model, "resp" if response_fields else "chatcmpl",
                               tool_parser, response_fields)

    def _tool_parser(self, req: GenerationRequest):
        """The parser of the answer's tool calls (None for tool_choice "none"); as vLLM, "auto" is 400 on a server
        started without one, and the parser may need the special tokens kept in the text. A forced call
        ("required", a named tool) needs no parser: structured outputs shaped the answer."""
        if req.tool_choice == "none":
            return None
        if req.tool_choice in ("required", "named"):
            return Forced(req.tool_name)
        name = self.server.config.tool_call_parser
        if name is None:
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                                'set (send tool_choice "none" to have the tools only rendered into the prompt)',
                           "tool_choice")
        parser = PARSERS[name]
        if hasattr(parser, "for_tools"):  # one that types the calls' arguments by the tools' schemas
            parser = parser.for_tools(req.tools)
        if parser.keep_special_tokens:
            req.params = dataclasses.replace(req.params, skip_special_tokens=False)
        return parser

    def _chat_prompt(self, req: GenerationRequest, messages: list[dict], kwargs: dict) -> tuple[str, list[int]]:
        text = render_chat(self.server, messages, kwargs)
        ids = self.server.engine.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        return self._prompt(ids, req, "messages", text)

    def _check_room(self, seqs: int, num_prompts: int) -> None:
        """400 if the request could never be admitted; 429 if it cannot be now."""
        server = self.server
        if seqs > server.capacity:
            raise APIError(400, f"{num_prompts} prompts x n={seqs // num_prompts} is more than this server ever "
                                f"runs at once ({server.capacity} sequences)", "prompt")
        if server.in_flight + seqs > server.capacity:
            raise APIError(429, f"the server is at capacity ({server.capacity} sequences running or queued); "
                                "retry later", headers={"Retry-After": str(server.config.retry_after_seconds)})

    def _prompt(self, prompt, req: GenerationRequest, param: str, text: str | None = None) -> tuple[str, list[int]]:
        """-> (text, ids) after the context-length checks, as vLLM words them."""
        engine = self.server.engine
        if isinstance(prompt, str):
            if engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send token ids", param)
            text, ids = prompt, engine.tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = prompt
            if text is None:
                text = engine.tokenizer.decode(ids) if engine.tokenizer is not None and req.echo else ""
        limit, max_tokens = engine.cfg.max_model_len, req.params.max_tokens
        try:
            text, ids = engine.truncate(text, ids, req.params)
        except ValueError as e:
            raise APIError(400, str(e), "truncate_prompt_tokens") from None
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, your request has "
                                f"{len(ids)} input tokens. Please reduce the length of the prompt.", param)
        if req.max_tokens_given and not req.echo_only and len(ids) + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for "
                                "max_tokens). Please reduce the length of the prompt or max_tokens.",
                           req.max_tokens_param)
        try:
            engine.validate(ids, req.params)
        except (ValueError, MemoryError) as e:  # a sampling field's own limit names the field
            field = next((f for f in ("min_tokens", "stop_token_ids", "bad_words") if f in str(e)), param)
            field = req.structured_param if str(e).startswith("structured outputs") else field
            raise APIError(400, str(e), field) from None
        return text, ids

    async def _run(self, http: Request, req: GenerationRequest, prompts, model: str, kind: str,
                   tool_parser=None, response_fields: dict | None = None) -> Response:
        server = self.server
        seqs = req.params.n * len(prompts)
        self._check_room(seqs, len(prompts))  # again: others were admitted while this one was tokenized
        response_id = f"{kind}-{uuid.uuid4().hex}"
        job = _Job(req, response_id, int(time.time()), model, prompts,
                   [f"{response_id}-{i}" for i in range(len(prompts))], tool_parser=tool_parser,
                   reasoning=REASONING_PARSERS.get(server.config.reasoning_parser) if req.chat else None,
                   responses=response_fields)
        server.in_flight += seqs
        server.active[response_id] = job.request_ids
        try:
            for (text, ids), request_id in zip(prompts, job.request_ids):
                prompt = ids if req.cache_salt is None else {"prompt_token_ids": ids, "cache_salt": req.cache_salt}
                job.streams.append(self._beam_search(req, request_id, text, ids) if req.beam else
                                   server.engine.add_request(prompt, req.params, request_id=request_id,
                                                             priority=req.priority))
        except BaseException:
            self._close(job)
            raise
        if req.stream:
            events = self._events(job) if response_fields is None else self._response_events(job)
            return _GuardedStream(events, lambda: self._close(job))
        try:
            return JSONResponse(await self._collect(http, job))
        finally:
            self._close(job)

    def _beam_search(self, req: GenerationRequest, request_id: str, text: str, ids: list[int]):
        """A prompt's beam search as a stream of one final output: its n beams, best first, as n choices."""
        engine = self.server.engine
        rounds = min(req.beam.max_tokens, engine.cfg.max_model_len - len(ids))
        decode = engine.tokenizer and functools.partial(engine.tokenizer.decode,
                                                        skip_special_tokens=req.params.skip_special_tokens)
        return search_stream(engine, request_id, ids, text, req.beam, rounds, decode, req.cache_salt, req.priority)

    def _close(self, job: _Job) -> None:
        """Abort whatever of the job still runs and give back its admission; safe to call twice."""
        if job.released:
            return
        job.released = True
        for request_id in job.request_ids:
            self.server.engine.abort(request_id)  # a finished request's id is unknown: ignored
        self.server.in_flight -= job.request.params.n * len(job.prompts)
        self.server.active.pop(job.response_id, None)

    async def _collect(self, http: Request, job: _Job) -> dict:
        finals = [None] * len(job.streams)

        async def gather():
            async for i, out in _merged(job.streams):
                finals[i] = out

        work = asyncio.create_task(gather())
        gone = asyncio.create_task(_until_disconnected(http))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if work not in done:
            work.cancel()
            raise APIError(499, "the client disconnected")  # nobody reads it; _close aborts the work
        try:
            work.result()
        except EngineError as e:
            self.server.fail(str(e))
            raise APIError(500, f"the engine failed while running this request: {e}") from None
        return self._response(job, finals)

    # --- building the JSON -------------------------------------------------------------------

    def _choice(self, job: _Job, i: int, out, completion, final: bool) -> dict:
        """Choice `completion` of prompt i: the whole answer (final) or what is new since the last chunk."""
        req, n = job.request, job.request.params.n
        index = i * n + completion.index
        text, ids, entries = completion.text, completion.token_ids, completion.logprobs
        finish, stop_reason = completion.finish_reason, completion.stop_reason
        if req.echo_only:
            text, ids, entries = "", [], []
            finish = "length" if completion.finished else None
            stop_reason = None
        first = index not in job.sent_text
        start_text, start_tokens = (0, 0) if final else (job.sent_text.get(index, 0), job.sent_tokens.get(index, 0))
        unchanged = finish is None and len(text) == start_text and len(ids) == start_tokens and not first
        if not final and (index in job.finished or unchanged):
            return None
        delta_text, delta_ids = text[start_text:], ids[start_tokens:]
        delta_entries = entries[start_tokens:] if entries is not None else None
        job.sent_text[index], job.sent_tokens[index] = len(text), len(ids)
        logprobs, prefix = None, ""
        if req.chat:
            if req.logprobs is not None:
                logprobs = chat_logprobs(delta_entries, delta_ids, self._token_text(req), req.logprobs)
        else:
            echo_now = req.echo and (final or first)  # the prompt leads the choice's first text
            prompt_text = job.prompts[i][0] if req.echo else ""
            prefix = prompt_text if echo_now else ""
            if req.logprobs is not None:
                token_ids, token_entries = list(delta_ids), list(delta_entries)
                if echo_now:
                    token_ids, token_entries = out.prompt_token_ids + token_ids, out.prompt_logprobs + token_entries
                offset = 0 if echo_now else len(prompt_text) + start_text
                logprobs = completion_logprobs(token_entries, token_ids, self._token_text(req), offset)
        if finish is not None:
            job.finished.add(index)
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}
        if req.return_token_ids:
            choice["token_ids"] = list(delta_ids)
            if final or first:
                choice["prompt_token_ids"] = list(job.prompts[i][1])
        if req.prompt_logprobs and not req.chat and (final or first):
            choice["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
        if not req.chat:
            return {"index": index, "text": prefix + delta_text, **choice}
        return self._chat_choice(job, index, choice, text, final)

    def _chat_choice(self, job: _Job, index: int, choice: dict, text: str, final: bool) -> dict | None:
        """The message (final) or delta of a chat choice whose whole text so far is `text`: its thinking split off
        by the server's reasoning parser, if any; tool calls parsed out of the content, if asked for. None:
        nothing new to send yet."""
        thinking, key = None, "message" if final else "delta"
        if job.reasoning is not None:
            if final:
                thinking, text = job.reasoning.split(text)
            else:
                stream = job.reasoning_streams.setdefault(index, ReasoningStream(job.reasoning))
                thinking, text = stream.advance(text, choice["finish_reason"] is not None)
        if job.tool_parser is not None:
            out = self._tool_call_choice(job, index, choice, text, final)
        else:
            start = 0 if final else job.sent_content.get(index, 0)
            job.sent_content[index] = len(text)
            out = {**choice, key: {"role": job.request.role, "content": text} if final else {"content": text[start:]}}
            if not final and start == len(text) and thinking is not None:
                out = None  # no content yet: the thinking alone goes out
        if thinking is None:
            return out
        if out is None:
            quiet = choice["finish_reason"] is None and choice["logprobs"] is None and "token_ids" not in choice
            if not thinking and quiet:
                return None
            out = {**choice, "delta": {}}
        body = dict(out[key])
        if final and not body.get("content"):
            body["content"] = None  # as vLLM: all thinking, no answer
        if final or thinking:
            body.update(reasoning=thinking, reasoning_content=thinking)  # vLLM's name, then its older one
        return {**out, key: body}

    def _token_text(self, req: GenerationRequest):
        """How logprobs name tokens: their text, or as vLLM's return_tokens_as_token_ids "token_id:<id>" (text
        that is not valid UTF-8 on its own can then still be told apart)."""
        return _token_id_text if req.tokens_as_ids else self.server.token_text

    def _tool_call_choice(self, job: _Job, index: int, choice: dict, text: str, final: bool) -> dict | None:
        """A chat choice whose text is parsed for tool calls: the whole message (final), or the delta of content
        now known not to be a call, with the calls in the choice's last chunk (None: nothing to send yet). As in
        vLLM, finish_reason "stop" becomes "tool_calls" when calls were made (a named tool's stays "stop");
        "length" stays."""
        if final:
            parsed = job.tool_parser.parse(text)
            content, calls = parsed.content, parsed.calls
        else:
            stream = job.tool_streams.setdefault(index, ToolCallStream(job.tool_parser))
            content, calls = stream.advance(text), []
            if choice["finish_reason"] is not None:
                rest, calls = stream.finish(text)
                content += rest
            elif not content and choice["logprobs"] is None and "token_ids" not in choice:
                return None
        calls = calls if job.request.parallel_tool_calls else calls[:1]  # as vLLM: false keeps the first call
        if calls and choice["finish_reason"] == "stop":
            choice = {**choice, "finish_reason": job.tool_parser.calls_finish_reason}
        if final:
            message = {"role": job.request.role, "content": content}
            return {**choice, "message": {**message, "tool_calls": [c.json(job.tool_parser.new_id()) for c in calls]}
                    if calls else message}
        delta = {"content": content}
        if calls:
            delta["tool_calls"] = [{"index": k, **c.json(job.tool_parser.new_id())} for k, c in enumerate(calls)]
        return {**choice, "delta": delta}

    def _usage(self, job: _Job, finals) -> dict:
        prompt = sum(len(ids) for _, ids in job.prompts)
        completion = 0 if job.request.echo_only else \
            sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)
        return usage(prompt, completion)

    def _response(self, job: _Job, finals) -> dict:
        if job.responses is not None:
            return self._responses_object(job, finals)
        choices = [self._choice(job, i, out, c, final=True) for i, out in enumerate(finals) for c in out.outputs]
        choices.sort(key=lambda c: c["index"])
        kind = "chat.completion" if job.request.chat else "text_completion"
        response = {"id": job.response_id, "object": kind, "created": job.created, "model": job.model,
                    "choices": choices, "usage": self._usage(job, finals)}
        if job.request.chat and job.request.prompt_logprobs:  # vLLM's extension, beside the choices
            response["prompt_logprobs"] = prompt_logprobs_json(finals[0].prompt_logprobs)
        return response

    def _responses_object(self, job: _Job, finals) -> dict:
        out = finals[0]
        choice = self._choice(job, 0, out, out.outputs[0], final=True)
        finish = choice["finish_reason"]
        status = "incomplete" if finish == "length" else "completed"
        return self._responses_header(job, finals)(status, responses.output_items(choice["message"], finish),
                                                   self._responses_usage(job, finals), finish)

    def _responses_header(self, job: _Job, finals):
        def header(status, output, usage, finish):
            return responses.response_object(job.response_id, job.created, job.model, job.responses, status,
                                             output, usage, finish)
        return header

    def _responses_usage(self, job: _Job, finals) -> dict:
        cached = sum(out.num_cached_tokens or 0 for out in finals if out is not None)
        thinking = 0
        if job.reasoning is not None:
            decode = functools.partial(self.server.engine.tokenizer.decode,
                                       skip_special_tokens=job.request.params.skip_special_tokens)
            thinking = sum(reasoning_tokens(job.reasoning, c.token_ids, decode)
                           for out in finals if out is not None for c in out.outputs)
        return {**self._usage(job, finals), "cached_tokens": cached, "reasoning_tokens": thinking}

    async def _response_events(self, job: _Job):
        """A Responses stream (`responses.EventStream`) over the chat route's deltas; an engine failure ends it
        with an error event."""
        finals = [None] * len(job.streams)
        stream = responses.EventStream(self._responses_header(job, finals))
        calls, finish = [], None
        for sent in stream.start():
            yield sent
        try:
            async for i, out in _merged(job.streams):
                finals[i] = out
                for completion in out.outputs:
                    choice = self._choice(job, i, out, completion, final=False)
                    if choice is None:
                        continue
                    delta, finish = choice["delta"], choice["finish_reason"] or finish
                    for kind, text in (("reasoning", delta.get("reasoning")), ("message", delta.get("content"))):
                        for sent in stream.text(kind, text):
                            yield sent
                    calls += delta.get("tool_calls") or []
            for sent in stream.finish(calls, finish, self._responses_usage(job, finals)):
                yield sent
        except EngineError as e:
            self.server.fail(str(e))
            yield stream.error(APIError(500, f"the engine failed while running this request: {e}"))
        except Exception as e:  # a bug here: the client still gets an error event
            log.exception("streaming %s failed", job.response_id)
            yield stream.error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    def _chunk(self, job: _Job, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if job.request.chat else "text_completion"
        return _sse({"id": job.response_id, "object": kind, "created": job.created, "model": job.model,
                     "choices": choices, **extra})

    async def _events(self, job: _Job):
        req, finals = job.request, [None] * len(job.streams)
        # vLLM's continuous_usage_stats: every chunk says the tokens so far (of every choice: ours carry several)
        so_far = (lambda: {"usage": self._usage(job, finals)}) if req.continuous_usage else dict
        try:
            if req.chat:  # the first chunk of each choice carries the role
                roles = [{"index": k, "delta": {"role": req.role, "content": ""}, "logprobs": None,
                          "finish_reason": None} for k in range(req.params.n * len(job.prompts))]
                yield self._chunk(job, roles, **so_far())
            async for i, out in _merged(job.streams):
                finals[i] = out
                choices = [c for c in (self._choice(job, i, out, comp, final=False) for comp in out.outputs) if c]
                if choices:
                    yield self._chunk(job, choices, **so_far())
            if req.include_usage:
                yield self._chunk(job, [], usage=self._usage(job, finals))
        except EngineError as e:
            self.server.fail(str(e))
            yield _sse(APIError(500, f"the engine failed while running this request: {e}").body())
        except Exception as e:  # a bug here: the client still gets an error event and [DONE]
            log.exception("streaming %s failed", job.response_id)
            yield _sse(APIError(500, f"internal error: {type(e).__name__}: {e}").body())
        yield "data: [DONE]\n\n"


# --- the other routes ------------------------------------------------------------------------


class Info:
    def __init__(self, server: Server):
        self.server = server

    async def health(self, request: Request) -> Response:
        status = 200 if self.server.health == "ready" else 503
        return JSONResponse({"status": self.server.health}, status_code=status)

    async def metrics(self, request: Request) -> Response:
        engine = self.server.engine
        if engine is None:
            return Response("", media_type=metrics.CONTENT_TYPE)
        stats = None
        while stats is None:  # the engine thread may be resizing a set we read: read again
            with contextlib.suppress(RuntimeError):
                stats = engine.stats()
        cfg = engine.cfg
        cache = {"block_size": cfg.page_size, "cache_dtype": cfg.kv_cache_dtype, "num_gpu_blocks": cfg.num_pages,
                 "enable_prefix_caching": cfg.enable_prefix_caching,
                 "gpu_memory_utilization": cfg.gpu_memory_utilization}  # vLLM's label names
        return Response(metrics.render(stats, self.server.config.served_model_name, cache),
                        media_type=metrics.CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        cfg = self.server.config
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "jaxinfer",
                  "root": cfg.model_path or cfg.served_model_name, "parent": None,
                  "max_model_len": self.server.engine.cfg.max_model_len}
                 for name in (cfg.served_model_name, *cfg.model_aliases)]  # one card a name, as vLLM lists them
        return JSONResponse({"object": "list", "data": cards})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": jaxinfer.__version__})

    async def reset_prefix_cache(self, request: Request) -> Response:
        """vLLM's development route: forget every cached prefix, so that a benchmark starts cold. 200 when
        done; 409 while requests are in the engine (nothing is done then)."""
        if not await asyncio.to_thread(self.server.engine.reset_prefix_cache):
            raise APIError(409, "requests are in the engine, so the prefix cache was not reset; retry when idle")
        return Response(status_code=200)

    async def tokenize(self, request: Request) -> Response:
        server = self.server
        body = await read_json(request, server.config.max_body_bytes)
        tokenizer = server.engine.tokenizer
        if not isinstance(body, dict) or tokenizer is None:
            raise APIError(400, "send a JSON object with 'prompt' (a string) to a model with a tokenizer")
        check_text(body)
        server.model(body.get("model"))
        # Tokenizing a few MB of text takes seconds: off the event loop, so other requests go on.
        return JSONResponse(await asyncio.to_thread(self._tokenize, body))

    def _tokenize(self, body: dict) -> dict:
        server, tokenizer = self.server, self.server.engine.tokenizer
        if "messages" in body:
            req, messages, kwargs = parse_chat({**body, "stream": False}, server.limits)
            ids = tokenizer.encode(render_chat(server, messages, kwargs), add_special_tokens=req.add_special_tokens)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "prompt must be a string", "prompt")
            add_special = body.get("add_special_tokens", True)
            if not isinstance(add_special, bool):
                raise APIError(400, "add_special_tokens must be true or false", "add_special_tokens")
            ids = tokenizer.encode(prompt, add_special_tokens=add_special)
        return {"count": len(ids), "max_model_len": server.engine.cfg.max_model_len, "tokens": ids}

    async def detokenize(self, request: Request) -> Response:
        server = self.server
        body = await read_json(request, server.config.max_body_bytes)
        if not isinstance(body, dict) or "tokens" not in body:
            raise APIError(400, "send a JSON object with 'tokens' (a list of token ids)", "tokens")
        server.model(body.get("model"))
        if server.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        ids = parse_token_ids(body["tokens"], server.limits, "tokens")
        # As vLLM's: the tokens' whole text, special tokens included (transformers' decode by default).
        return JSONResponse({"prompt": server.engine.tokenizer.decode(ids, skip_special_tokens=False)})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error_response(APIError(exc.status_code, str(exc.detail)))


def build_app(server: Server) -> Starlette:
    generation, info = Generation(server), Info(server)

    def route(path, handler, methods=("POST",), guarded=True, needs_engine=True):
        return Route(path, endpoint(server, handler, guarded, needs_engine), methods=list(methods))

    routes = [
        route("/v1/completions", generation.completions),
        route("/v1/chat/completions", generation.chat),
        route("/v1/responses", generation.responses),
        route("/v1/models", info.models, ("GET",)),
        route("/tokenize", info.tokenize, guarded=False),
        route("/detokenize", info.detokenize, guarded=False),
        route("/health", info.health, ("GET",), guarded=False, needs_engine=False),
        route("/metrics", info.metrics, ("GET",), guarded=False, needs_engine=False),
        route("/version", info.version, ("GET",), guarded=False, needs_engine=False),
        route("/reset_prefix_cache", info.reset_prefix_cache),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.create_task(server.watch())
        try:
            yield
        finally:
            watcher.cancel()

    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)
