"""`jaxinfer router`: one OpenAI-compatible front for several independent `jaxinfer serve` replicas.

This module owns the replica table (health, load), the routing policy and the
relaying of requests and streamed answers. It knows replicas only through HTTP
(`/health`, `/metrics` and the API routes) and must not import the engine or JAX:
a router runs on any small host.

Routing (`Policy.choose`, applied by `Router.pick`): a generation request goes to
the healthy replica that last served the start of its prompt (prefix-cache
affinity), unless that replica holds more than 2x the outstanding tokens of the
least loaded healthy replica plus 4096 tokens; otherwise to the least loaded one.
A replica's outstanding tokens are the router's own estimate for the requests it
has in flight there (prompt estimate + max_tokens, per sequence), plus the
sequences the replica's `/metrics` reports running or waiting beyond those,
each counted at the router's mean tokens per sequence.

Faults: a replica whose `/health` probe fails (connection error, timeout,
non-200), or to which a forwarded request cannot connect or loses its
connection, leaves rotation at once and is probed again `retry_dead_after`
seconds later. A request that never reached its replica is tried once more on
another; one that did is never retried: it fails with 502 (streaming: an error
event, then `[DONE]`; likewise a stream the replica ends without `[DONE]`, or a
Responses stream without its last event) naming
the replica. A client that goes away closes its upstream request, so the replica
aborts the work.

Backpressure: a replica at capacity answers 429 before starting the work, and
stays in rotation; the request goes on to each healthy replica not yet asked.
Only when those that answered all said 429 does the client get a 429, the
router's own, with the smallest Retry-After they sent.

`POST /reset_prefix_cache` goes to every healthy replica, not one: each forgets
its cached prefixes, so a benchmark through the router starts cold everywhere.
A replica that does not answer within PROBE_TIMEOUT counts as not reset.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import jaxinfer
from jaxinfer.server.metrics import CONTENT_TYPE, format_labels
from jaxinfer.server.protocol import APIError, check_api_key, parse_json, read_body
from jaxinfer.server.responses import to_chat

log = logging.getLogger("jaxinfer.router")

METRIC_PREFIX = "jaxinfer_router:"
# Leading windows of a prompt hashed for affinity, most specific first: (characters of text, token ids).
# The long one keeps apart groups that share only a short preamble; the short one catches shorter shared prefixes.
PREFIX_WINDOWS = ((1024, 256), (256, 64))
CHARS_PER_TOKEN = 4  # a text prompt's token estimate, without a tokenizer
DEFAULT_MAX_TOKENS = 16  # what the server assumes for completions
CHAT_MAX_TOKENS = 512  # chat without max_tokens runs to the end of the context: a guess of its length
CONNECT_TIMEOUT = 5.0
PROBE_TIMEOUT = 5.0
PARSE_IN_THREAD_BYTES = 256 * 1024  # larger bodies are parsed off the event loop
DONE = b"data: [DONE]\n\n"
# The events that end a Responses API stream, which sends no [DONE].
RESPONSES_ENDS = tuple(b"event: " + kind for kind in (b"response.completed", b"response.incomplete",
                                                       b"response.failed", b"error"))
_NOT_PASSED = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "content-length", "date", "server"})


# --- the policy (pure) -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Choice:
    url: str
    by_affinity: bool


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which healthy replica gets a request.

    Rule: the first of `preferred` (the replicas that last served this prompt's leading
    windows, most specific first) that is in `loads` (the healthy replicas' outstanding
    tokens) with at most `factor` x the least outstanding tokens + `margin` wins;
    otherwise the replica with the fewest outstanding tokens, ties going to the first in
    `loads`' order. Dead replicas are absent from `loads`, so they are never chosen.
    """

    factor: float = 2.0
    margin: float = 4096.0

    def choose(self, loads: Mapping[str, float], preferred: Sequence[str | None] = ()) -> Choice | None:
        if not loads:
            return None
        least = min(loads.values())
        for url in preferred:
            if url in loads and loads[url] <= self.factor * least + self.margin:
                return Choice(url, True)
        return Choice(min(loads, key=loads.__getitem__), False)


@dataclasses.dataclass(frozen=True)
class Work:
    """What routing knows of one generation request."""

    keys: tuple[str, ...]  # hashes of the first prompt's leading windows (PREFIX_WINDOWS), most specific first
    tokens: int  # estimated prompt tokens + max_tokens, over all its sequences
    seqs: int  # prompts x n


def describe(body: dict, chat: bool) -> Work:
    """The routing view of a completions or chat body. Never raises: odd fields get defaults, and the
    replica answers them with a 400 of its own."""
    n = _int_or(body.get("n"), 1, 1, 1024)
    if chat:
        prompts = [_chat_text(body.get("messages"))]
        given = body.get("max_completion_tokens")
        max_tokens = _int_or(body.get("max_tokens") if given is None else given, CHAT_MAX_TOKENS, 0, 2**20)
    else:
        prompts = _prompts(body.get("prompt"))
        max_tokens = _int_or(body.get("max_tokens"), DEFAULT_MAX_TOKENS, 0, 2**20)
    tokens = sum(_token_estimate(p) + n * max_tokens for p in prompts)
    salt = body.get("cache_salt")
    return Work(prefix_keys(prompts[0], salt if isinstance(salt, str) else ""), tokens, n * len(prompts))


def _ends_answer(events: bytes) -> bool:
    """Whether the last of these events ends an answer: `[DONE]`, or a Responses stream's last event."""
    last = events.replace(b"\r\n", b"\n").rstrip().rsplit(b"\n\n", 1)[-1]
    return last == DONE.rstrip() or last.startswith(RESPONSES_ENDS)


def _responses_as_chat(body: dict) -> dict:
    """A Responses API body as the chat body it means, for routing; one the replica will refuse routes as an
    empty chat (the replica answers its 400)."""
    try:
        return to_chat(body)[0]
    except APIError:
        return {}


def prefix_keys(prompt: str | list, salt: str = "") -> tuple[str, ...]:
    """Hashes of the prompt's leading windows; a prompt shorter than a window hashes whole. Prompts of another
    cache salt (vLLM's cache_salt) share no cached pages on a replica, so their keys differ too."""
    keys = []
    for chars, ids in PREFIX_WINDOWS:
        if isinstance(prompt, str):
            material = f"{len(salt)}:{salt}t" + prompt[:chars]
        else:  # not str() of junk: JSON nested a thousand deep would exceed the recursion limit
            material = f"{len(salt)}:{salt}i" + ",".join(str(t) if isinstance(t, int) else "?" for t in prompt[:ids])
        keys.append(hashlib.blake2b(material.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest())
    return tuple(keys)


def _int_or(value, default: int, low: int, high: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, low), high)
    return default


def _prompts(prompt) -> list:
    """A completions prompt as a list of texts or token-id lists (one string or id list becomes one prompt)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, (str, list)) for p in prompt):
            return prompt
        return [prompt]  # token ids (or junk the replica will refuse)
    return [""]


def _chat_text(messages) -> str:
    """The messages as roughly what a chat template renders: role and content, in order."""
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones count
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and
                              isinstance(p.get("text"), str))
        role = m.get("role")
        parts.append(f"{role if isinstance(role, str) else ''}\n{content if isinstance(content, str) else ''}\n")
    return "".join(parts)


def _token_estimate(prompt: str | list) -> int:
    return math.ceil(len(prompt) / CHARS_PER_TOKEN) if isinstance(prompt, str) else len(prompt)


class PrefixTable:
    """Prefix key -> the replica that last served it; the least recently used keys are forgotten."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._table: collections.OrderedDict[str, str] = collections.OrderedDict()

    def get(self, key: str) -> str | None:
        return self._table.get(key)

    def put(self, key: str, url: str) -> None:
        self._table[key] = url
        self._table.move_to_end(key)
        if len(self._table) > self.capacity:
            self._table.popitem(last=False)


def reported_sequences(text: str) -> float:
    """running + waiting from a replica's Prometheus text (ours, `jaxinfer:`, or vLLM's, `vllm:`)."""
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.endswith((":num_requests_running", ":num_requests_waiting")):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return total


# --- replicas and their load ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    replicas: tuple[str, ...]
    api_key: str | None = None  # guards /v1/*; /health, /metrics, /tokenize and /detokenize stay open
    replica_api_key: str | None = None  # sent to replicas; None: the client's Authorization header is passed on
    health_interval: float = 2.0
    retry_dead_after: float = 10.0
    upstream_timeout: float = 600.0  # longest wait for a replica's next bytes
    max_body_bytes: int = 32 * 2**20
    policy: Policy = Policy()

    def __post_init__(self):
        object.__setattr__(self, "replicas", tuple(url.rstrip("/") for url in self.replicas))
        if not self.replicas:
            raise ValueError("the router needs at least one --replica URL")
        for url in self.replicas:
            try:
                parsed = httpx.URL(url)
            except httpx.InvalidURL:
                parsed = None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host or parsed.path not in (
                    "", "/"):
                raise ValueError(f"--replica {url!r} is not a server's base URL; expected e.g. http://10.0.0.5:8000")
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"a replica is listed twice: {', '.join(self.replicas)}")
        for name in ("health_interval", "retry_dead_after", "upstream_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds, "
                                 f"got {getattr(self, name)}")


@dataclasses.dataclass
class Replica:
    url: str
    healthy: bool = False  # in rotation; a replica joins after its first good probe
    next_probe: float = 0.0  # time.monotonic() of the next /health probe
    own_requests: int = 0  # forwarded and not finished
    own_seqs: int = 0
    own_tokens: int = 0  # the estimate of what they still hold
    reported_seqs: float = 0.0  # running + waiting in the replica's /metrics at the last probe
    external_tokens: float = 0.0  # the reported sequences the router did not send, in tokens
    routed: int = 0  # generation requests sent
    failures: int = 0  # requests lost to this replica's faults (unreachable, connection lost, timed out)
    refused: int = 0  # requests it answered 429 (at capacity)
    last_error: str = ""

    @property
    def load(self) -> float:
        return self.own_tokens + self.external_tokens


class _Lease:
    """One forwarded request's share of its replica's load; given back once."""

    def __init__(self, replica: Replica, work: Work | None):
        self.replica, self.work, self.released = replica, work, work is None
        if work is not None:
            replica.own_requests += 1
            replica.own_seqs += work.seqs
            replica.own_tokens += work.tokens
            replica.routed += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.replica.own_requests -= 1
            self.replica.own_seqs -= self.work.seqs
            self.replica.own_tokens -= self.work.tokens


class _ClientGone(Exception):
    pass


class Router:
    """The replica table, the health probes and the forwarding; all of it runs on one event loop."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.replicas = {url: Replica(url) for url in config.replicas}
        self.prefixes = PrefixTable()
        self.mean_seq_tokens = 256.0  # per sequence routed: the weight of each one a replica reports beyond ours
        self.affinity_routed = 0
        self.unavailable = 0  # requests answered 503 for want of a healthy replica
        self.client: httpx.AsyncClient | None = None
        self._watchers: list[asyncio.Task] = []
        self._turn = 0

    async def start(self) -> None:
        timeout = httpx.Timeout(self.config.upstream_timeout, connect=CONNECT_TIMEOUT)
        # Keep-alive shorter than uvicorn's 5 s, so a pooled connection is never reused just as the replica drops it.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        await asyncio.gather(*(self.probe(r) for r in self.replicas.values()))
        self._watchers = [asyncio.create_task(self._watch(r)) for r in self.replicas.values()]

    async def stop(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self.client.aclose()

    # --- choosing ------------------------------------------------------------------------------

    def pick(self, work: Work | None, exclude: Sequence[str] = ()) -> Replica | None:
        """The replica for `work` (None: any request, by load alone), and its prefixes remembered there."""
        healthy = [r for r in self.replicas.values() if r.healthy and r.url not in exclude]
        if not healthy:
            return None
        self._turn += 1  # equal loads take turns
        k = self._turn % len(healthy)
        loads = {r.url: r.load for r in healthy[k:] + healthy[:k]}
        preferred = [self.prefixes.get(key) for key in work.keys] if work is not None else []
        choice = self.config.policy.choose(loads, preferred)
        if work is not None:
            for key in work.keys:
                self.prefixes.put(key, choice.url)
            self.affinity_routed += choice.by_affinity
            self.mean_seq_tokens += 0.05 * (work.tokens / max(work.seqs, 1) - self.mean_seq_tokens)
        return self.replicas[choice.url]

    # --- health --------------------------------------------------------------------------------

    def mark_dead(self, replica: Replica, why: str) -> None:
        if replica.healthy:
            log.warning("%s leaves rotation: %s; probing again in %gs", replica.url, why, self.config.retry_dead_after)
        replica.healthy, replica.last_error = False, why
        replica.next_probe = time.monotonic() + self.config.retry_dead_after

    async def probe(self, replica: Replica) -> None:
        """/health (must be 200) and /metrics (the replica's own count of running and waiting sequences)."""
        try:
            health = await self.client.get(f"{replica.url}/health", timeout=PROBE_TIMEOUT)
            if health.status_code != 200:
                self.mark_dead(replica, f"/health answered {health.status_code}")
                return
            own_before = replica.own_seqs
            stats = await self.client.get(f"{replica.url}/metrics", timeout=PROBE_TIMEOUT)
        except httpx.HTTPError as e:
            self.mark_dead(replica, f"/health failed: {_why(e)}")
            return
        if not replica.healthy:
            log.info("%s is in rotation", replica.url)
        replica.healthy = True
        replica.next_probe = time.monotonic() + self.config.health_interval
        if stats.status_code == 200:
            replica.reported_seqs = reported_sequences(stats.text)
            # Requests the router sent count once: what the replica reports beyond them came from elsewhere.
            external = max(0.0, replica.reported_seqs - max(own_before, replica.own_seqs))
            replica.external_tokens = external * self.mean_seq_tokens

    async def _watch(self, replica: Replica) -> None:
        while True:
            wait = replica.next_probe - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, self.config.health_interval))
                continue
            try:
                await self.probe(replica)
            except Exception:  # a bug: the probes go on
                log.exception("probing %s failed", replica.url)
                replica.next_probe = time.monotonic() + self.config.health_interval

    def _lost(self, replica: Replica, e: httpx.TransportError) -> None:
        """A forwarded request failed at the replica's end: count it; a broken connection also means dead."""
        replica.failures += 1
        if not isinstance(e, httpx.TimeoutException):
            self.mark_dead(replica, _why(e))

    # --- forwarding ----------------------------------------------------------------------------

    async def forward(self, request: Request, body: bytes | None, work: Work | None) -> Response:
        """Send the request to a chosen replica; once more to another if the first could not be reached
        (or refused it with 503: starting or draining); to each other one while they answer 429 (at capacity)."""
        tried: list[str] = []
        full: list[str] = []
        waits: list[int] = []  # the Retry-After seconds of those at capacity
        while len(tried) - len(full) < 2:  # a 429 uses up none of the one retry: that work never started
            replica = self.pick(work, exclude=tried)
            if replica is None:
                break
            tried.append(replica.url)
            lease = _Lease(replica, work)
            try:
                upstream = await _unless_disconnected(request, self._send(replica, request, body))
            except _ClientGone:
                lease.release()
                return Response(status_code=499)  # nobody reads it; cancelling the send closed the connection
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.WriteError) as e:  # the work never got there
                lease.release()
                self._lost(replica, e)
                continue
            except httpx.TransportError as e:
                lease.release()
                self._lost(replica, e)
                raise _failed(replica, e, self.config.upstream_timeout) from None
            if upstream.status_code == 429:
                lease.release()
                await _close(upstream)
                replica.refused += 1
                full.append(replica.url)
                with contextlib.suppress(ValueError):
                    waits.append(max(0, int(upstream.headers.get("retry-after", ""))))
                continue
            if upstream.status_code == 503 and len(tried) - len(full) == 1:
                lease.release()
                await _close(upstream)
                self.mark_dead(replica, "it answered 503")
                continue
            return await self._relay(request, replica, upstream, lease)
        if full:
            raise APIError(429, f"every replica that answered is at capacity ({', '.join(full)}); retry later",
                           headers={"Retry-After": str(min(waits, default=1))})
        self.unavailable += 1
        lost = f" ({', '.join(tried)} failed)" if tried else ""
        raise APIError(503, f"no healthy replica can take this request{lost}; retry later",
                       headers={"Retry-After": str(math.ceil(min(self.config.retry_dead_after, 60)))})

    async def _send(self, replica: Replica, request: Request, body: bytes | None) -> httpx.Response:
        url = f"{replica.url}{request.url.path}"
        if request.url.query:
            url += f"?{request.url.query}"
        upstream = self.client.build_request(request.method, url, content=body, headers=self._headers(request))
        return await self.client.send(upstream, stream=True)

    def _headers(self, request: Request) -> dict:
        headers = {"accept": request.headers.get("accept", "*/*"),
                   "accept-encoding": request.headers.get("accept-encoding", "identity")}
        if "content-type" in request.headers:
            headers["content-type"] = request.headers["content-type"]
        key = self.config.replica_api_key
        auth = f"Bearer {key}" if key is not None else request.headers.get("authorization")
        if auth is not None:
            headers["authorization"] = auth
        return headers

    async def _relay(self, request: Request, replica: Replica, upstream: httpx.Response, lease: _Lease) -> Response:
        """The replica's answer as it is: status, headers and bytes (server-sent events as they arrive)."""
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_PASSED}
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            async def cleanup():
                lease.release()
                await _close(upstream)

            return _Relay(self._events(replica, upstream), upstream.status_code, headers, cleanup)
        try:
            content = await _unless_disconnected(request, _read_raw(upstream))
        except _ClientGone:
            return Response(status_code=499)
        except httpx.TransportError as e:
            self._lost(replica, e)
            raise _failed(replica, e, self.config.upstream_timeout) from None
        finally:
            lease.release()
            await _close(upstream)
        return Response(content, status_code=upstream.status_code, headers=headers)

    async def _events(self, replica: Replica, upstream: httpx.Response):
        """The replica's SSE bytes, passed on whole events at a time; if the replica fails mid-stream, or ends it
        without `[DONE]` or a response's last event (a client would take that for complete), an error event and
        `[DONE]` instead of the incomplete rest."""
        pending, done = b"", False
        try:
            async for chunk in upstream.aiter_raw():
                pending += chunk
                end = _whole_events(pending)
                if end:
                    done = _ends_answer(pending[:end])
                    yield pending[:end]
                    pending = pending[end:]
            if done or (pending.strip() and _ends_answer(pending)):
                if pending:
                    yield pending
            else:  # the torn rest, if any, is dropped
                replica.failures += 1
                yield _error_event(APIError(502, f"the replica {replica.url} ended the stream without [DONE]"))
        except httpx.TransportError as e:
            self._lost(replica, e)
            if not done:  # after [DONE] the client has all of it
                yield _error_event(_failed(replica, e, self.config.upstream_timeout))
        except Exception as e:  # a bug here: the client still gets an error event and [DONE]
            log.exception("relaying the stream from %s failed", replica.url)
            yield _error_event(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    # --- routes --------------------------------------------------------------------------------

    async def generation(self, request: Request) -> Response:
        body = await self._read(request)
        payload = await _parse_json(body)
        if not isinstance(payload, dict):
            raise APIError(400, f"the request body must be a JSON object, not {type(payload).__name__}")
        chat = not request.url.path.endswith("/v1/completions")
        if request.url.path.endswith("/responses"):  # routed as the chat request it means
            payload = _responses_as_chat(payload)
        return await self.forward(request, body, describe(payload, chat))

    async def passthrough(self, request: Request) -> Response:
        """/v1/models, /tokenize, /detokenize: to the least loaded replica, unparsed."""
        body = await self._read(request) if request.method == "POST" else None
        return await self.forward(request, body, None)

    async def version(self, request: Request) -> Response:
        """The router's own package version (its replicas answer for theirs)."""
        return JSONResponse({"version": jaxinfer.__version__})

    async def health(self, request: Request) -> Response:
        healthy = [r.url for r in self.replicas.values() if r.healthy]
        if healthy:
            return JSONResponse({"status": "ready", "healthy_replicas": healthy})
        return JSONResponse({"status": "no healthy replica", "healthy_replicas": []}, status_code=503,
                            headers={"Retry-After": str(math.ceil(min(self.config.retry_dead_after, 60)))})

    async def metrics(self, request: Request) -> Response:
        return Response(render_metrics(self), media_type=CONTENT_TYPE)

    async def reset_prefix_cache(self, request: Request) -> Response:
        """Every healthy replica's /reset_prefix_cache at once: 200 when all of them reset; else 409 if one
        refused because it had requests in flight, 504 if the only failures were replicas silent for
        PROBE_TIMEOUT (otherwise 502), naming the replicas that did not reset."""
        healthy = [r for r in self.replicas.values() if r.healthy]
        if not healthy:
            raise APIError(503, "no healthy replica to reset", headers={"Retry-After": "1"})

        async def reset(replica: Replica) -> int:
            try:
                # A control call: not the generation timeout, so one hung replica cannot hold it for minutes.
                answer = await self.client.post(f"{replica.url}/reset_prefix_cache", headers=self._headers(request),
                                                timeout=PROBE_TIMEOUT)
                return answer.status_code
            except httpx.TransportError as e:
                self._lost(replica, e)
                return 504 if isinstance(e, httpx.TimeoutException) else 502

        statuses = await asyncio.gather(*(reset(r) for r in healthy))
        failed = [f"{r.url} ({status})" for r, status in zip(healthy, statuses) if status != 200]
        if failed:
            codes = set(statuses) - {200}
            raise APIError(409 if 409 in codes else 504 if codes == {504} else 502,
                           f"the prefix cache was not reset on {', '.join(failed)}")
        return Response(status_code=200)

    async def _read(self, request: Request) -> bytes:
        return await read_body(request, self.config.max_body_bytes)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _failed(replica: Replica, e: httpx.TransportError, timeout: float) -> APIError:
    if isinstance(e, httpx.TimeoutException):
        return APIError(504, f"the replica {replica.url} sent nothing for {timeout:g}s ({_why(e)})")
    return APIError(502, f"the replica {replica.url} failed while serving this request: {_why(e)}")


async def _read_raw(upstream: httpx.Response) -> bytes:
    return b"".join([chunk async for chunk in upstream.aiter_raw()])


async def _close(upstream: httpx.Response) -> None:
    """Close the upstream response even while being cancelled: an unread body closes the connection, and the
    replica takes that as its client gone."""
    with anyio.CancelScope(shield=True):
        await upstream.aclose()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coroutine):
    """Await `coroutine` unless the client disconnects first (then it is cancelled and _ClientGone raised)."""
    work = asyncio.ensure_future(coroutine)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        await asyncio.wait({work})
        raise _ClientGone()
    return work.result()


async def _parse_json(body: bytes):
    if len(body) > PARSE_IN_THREAD_BYTES:  # megabytes of JSON: off the event loop
        return await asyncio.to_thread(parse_json, body)
    return parse_json(body)


class _Relay(StreamingResponse):
    """A relayed event stream that runs `cleanup` (give back the load, close the upstream) however it ends:
    finished, client gone, cancelled, or never started."""

    def __init__(self, events, status: int, headers: dict, cleanup):
        super().__init__(events, status_code=status, headers=headers)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(RuntimeError):  # still running: it was cancelled, and ends by itself
                    await self.body_iterator.aclose()
                await self._cleanup()


def _whole_events(buffer: bytes) -> int:
    """How many leading bytes of `buffer` are whole server-sent events (each ends in a blank line, LF or CRLF)."""
    lf, crlf = buffer.rfind(b"\n\n"), buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _error_event(error: APIError) -> bytes:
    return f"data: {json.dumps(error.body())}\n\n".encode() + DONE


def render_metrics(router: Router) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples) -> None:
        full = METRIC_PREFIX + name
        lines.extend([f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"])
        lines.extend(f"{full}{format_labels(labels) if labels else ''} {value}" for labels, value in samples)

    def each(value) -> list:
        return [({"replica": r.url}, value(r)) for r in router.replicas.values()]

    family("replica_healthy", "gauge", "1 while the replica is in rotation.", each(lambda r: int(r.healthy)))
    family("outstanding_tokens", "gauge", "Tokens the router counts in flight on the replica (its own estimate "
           "plus the replica's reported sequences beyond those).", each(lambda r: round(r.load)))
    family("requests_in_flight", "gauge", "Requests the router has in flight on the replica.",
           each(lambda r: r.own_requests))
    family("replica_reported_sequences", "gauge", "Running + waiting sequences in the replica's /metrics at the "
           "last probe.", each(lambda r: r.reported_seqs))
    family("requests_routed_total", "counter", "Generation requests sent to the replica.", each(lambda r: r.routed))
    family("request_failures_total", "counter", "Requests lost to the replica's faults (unreachable, connection "
           "lost, timed out).", each(lambda r: r.failures))
    family("requests_refused_total", "counter", "Requests the replica answered 429 (at capacity); each went on "
           "to a replica not yet asked, if one was left.", each(lambda r: r.refused))
    family("affinity_routed_total", "counter", "Generation requests routed by prompt-prefix affinity.",
           [({}, router.affinity_routed)])
    family("no_replica_total", "counter", "Requests answered 503 for want of a healthy replica.",
           [({}, router.unavailable)])
    return "\n".join(lines) + "\n"


# --- the app and the command -----------------------------------------------------------------


def _endpoint(router: Router, handler, guarded: bool):
    async def route(request: Request) -> Response:
        try:
            if guarded and router.config.api_key is not None:
                check_api_key(request.headers.get("authorization", ""), router.config.api_key)
            return await handler(request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except ClientDisconnect:  # gone while sending its body: routine, and nobody reads the answer
            return Response(status_code=499)
        except Exception as e:  # a bug: a bounded 500, the router goes on
            log.exception("%s %s failed", request.method, request.url.path)
            error = APIError(500, f"internal error: {type(e).__name__}: {e}")
            return JSONResponse(error.body(), status_code=500)

    return route


async def _http_error(request: Request, exc: HTTPException) -> Response:
    error = APIError(exc.status_code, str(exc.detail))
    return JSONResponse(error.body(), status_code=exc.status_code)


def build_app(router: Router) -> Starlette:
    def route(path, handler, methods=("POST",), guarded=False):
        return Route(path, _endpoint(router, handler, guarded), methods=list(methods))

    routes = [
        route("/v1/completions", router.generation, guarded=True),
        route("/v1/chat/completions", router.generation, guarded=True),
        route("/v1/responses", router.generation, guarded=True),
        route("/v1/models", router.passthrough, ("GET",), guarded=True),
        route("/tokenize", router.passthrough),
        route("/detokenize", router.passthrough),
        route("/health", router.health, ("GET",)),
        route("/metrics", router.metrics, ("GET",)),
        route("/version", router.version, ("GET",)),
        route("/reset_prefix_cache", router.reset_prefix_cache, guarded=True),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)


class _Uvicorn(uvicorn.Server):
    """uvicorn that exits 0 after the graceful stop a first SIGTERM or Ctrl-C starts (uvicorn re-raises the
    signal); a second one stops at once."""

    def handle_exit(self, sig, frame) -> None:
        self.force_exit = self.should_exit
        self.should_exit = True


def run(args) -> int:
    config = RouterConfig(tuple(args.replica), api_key=args.api_key, replica_api_key=args.replica_api_key,
                          health_interval=args.health_interval, retry_dead_after=args.retry_dead_after,
                          upstream_timeout=args.upstream_timeout)
    log.setLevel(logging.INFO)  # replicas leaving and rejoining rotation
    _Uvicorn(uvicorn.Config(build_app(Router(config)), host=args.host, port=args.port,
                            timeout_graceful_shutdown=args.shutdown_timeout,
                            log_level="info" if args.verbose else "warning")).run()
    return 0


def add_parser(sub) -> None:
    """Register `router` among the `jaxinfer` subcommands."""
    p = sub.add_parser("router", help="one HTTP front for several `serve` replicas, routing by load and prefix",
                       description="Forwards /v1/completions, /v1/chat/completions and /v1/responses (streamed or "
                                   "not), /v1/models, "
                                   "/tokenize and /detokenize to independent `jaxinfer serve` replicas; serves its "
                                   "own /health and /metrics. A request goes to the replica that last served the "
                                   "start of its prompt (its prefix cache is warm) unless that one is much busier, "
                                   "else to the one with the fewest outstanding tokens. Replicas failing /health "
                                   "leave rotation until they answer 200 again.")
    p.add_argument("--replica", action="append", required=True, metavar="URL",
                   help="a replica's base URL, e.g. http://10.0.0.5:8000; repeat for each")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $JAXINFER_API_KEY)")
    p.add_argument("--replica-api-key", default=None,
                   help="the key sent to replicas (default: the client's Authorization header, passed on)")
    p.add_argument("--health-interval", type=float, default=2.0, metavar="S",
                   help="seconds between /health and /metrics probes of each replica (default 2)")
    p.add_argument("--retry-dead-after", type=float, default=10.0, metavar="S",
                   help="seconds before a failed replica is probed again (default 10)")
    p.add_argument("--upstream-timeout", type=float, default=600.0, metavar="S",
                   help="longest wait for a replica's next bytes before the request fails with 504 (default 600)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long requests in flight may take to finish (default 30)")
    p.set_defaults(run=run)
