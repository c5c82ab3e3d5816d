"""`jaxinfer router` in front of fake replicas: small Starlette apps that speak our server's HTTP (`/health`,
`/metrics`, `/v1/completions` streamed or not, a delay per token), served by uvicorn in threads, or as processes
where a test kills one. No model is loaded.

Run as a script (`python tests/test_router.py PORT DELAY NAME`), this file serves one fake replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import jaxinfer
from jaxinfer.router import (DONE, PREFIX_WINDOWS, Choice, Policy, Router, RouterConfig, build_app, describe,
                             prefix_keys, reported_sequences)

FAST = {"health_interval": 0.1, "retry_dead_after": 1.0}


# --- fake replicas and how they are served ---------------------------------------------------


class FakeReplica:
    """A stand-in for `jaxinfer serve`: `max_tokens` tokens ("x" each), `delay` seconds apart.

    The prompts "please 400" and "please 429" get those errors; streamed, "please cut" ends the
    stream cleanly after two events without `[DONE]`, and "please crlf" delimits events with
    CRLF (as SSE allows). With `retry_after` set it is at capacity: every generation request
    gets 429 with that Retry-After. With `reset_hangs` its /reset_prefix_cache never answers.
    It records every body and Authorization header, counts the requests running and those
    whose client left early, and reports `running + external` in /metrics (external: load
    from clients that bypass the router). Answers carry `model: name`, so a test sees who
    served them.
    """

    def __init__(self, delay: float = 0.0, name: str = "fake"):
        self.delay, self.name, self.url = delay, name, ""
        self.received: list[dict] = []
        self.auth: list[str | None] = []
        self.running = self.aborted = self.external = self.resets = 0
        self.retry_after: int | None = None
        self.reset_hangs = False

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/health", lambda request: JSONResponse({"status": "ready"})),
            Route("/metrics", self.metrics),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.completions, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/v1/models", lambda request: JSONResponse({"object": "list", "data": [{"id": self.name}]})),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
        ])

    async def reset_prefix_cache(self, request: Request) -> Response:
        """As our server: refused (409) while requests run."""
        if self.reset_hangs:  # until the client gives up
            await _sleep_unless_gone(request, 60)
            return Response(status_code=499)
        if self.running:
            return _error(409, "requests are in the engine")
        self.resets += 1
        return Response(status_code=200)

    async def metrics(self, request: Request) -> Response:
        labels = f'{{model_name="{self.name}"}}'
        return PlainTextResponse(f"jaxinfer:num_requests_running{labels} {self.running + self.external}\n"
                                 f"jaxinfer:num_requests_waiting{labels} 0\n"
                                 f"jaxinfer:kv_cache_usage_perc{labels} 0.0\n")

    async def tokenize(self, request: Request) -> Response:
        words = (await request.json())["prompt"].split()
        return JSONResponse({"count": len(words), "tokens": list(range(len(words)))})

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(body)
        self.auth.append(request.headers.get("authorization"))
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens", 16)
        if prompt == "please 429" or self.retry_after is not None:
            return _error(429, "the server is at capacity", {"Retry-After": str(self.retry_after or 7)})
        if prompt == "please 400" or not isinstance(max_tokens, int):
            return _error(400, "max_tokens must be an integer")
        rid = "cmpl-" + hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
        if body.get("stream"):
            events = {"please cut": self._cut(), "please crlf": self._crlf()}.get(prompt) or self._events(rid, max_tokens)
            return StreamingResponse(events, media_type="text/event-stream")
        self.running += 1
        try:
            stayed = await _sleep_unless_gone(request, self.delay * max_tokens)
        finally:
            self.running -= 1
        if not stayed:
            self.aborted += 1
            return Response(status_code=499)
        return JSONResponse({"id": rid, "object": "text_completion", "created": 0, "model": self.name,
                             "choices": [{"index": 0, "text": "x" * max_tokens, "finish_reason": "length"}]})

    async def responses(self, request: Request) -> Response:
        """A Responses API stream of two text deltas; "please cut" ends it before its last event."""
        body = await request.json()
        self.received.append(body)
        kinds = ["response.created", "response.output_text.delta", "response.output_text.delta"]
        kinds += [] if body.get("input") == "please cut" else ["response.completed"]
        events = [f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': i})}\n\n"
                  for i, kind in enumerate(kinds)]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    async def _events(self, rid: str, max_tokens: int):
        self.running += 1
        sent = 0
        try:
            for i in range(max_tokens):
                await asyncio.sleep(self.delay)
                choice = {"index": 0, "text": "x", "finish_reason": "length" if i == max_tokens - 1 else None}
                chunk = {"id": rid, "object": "text_completion", "created": 0, "model": self.name, "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
                sent += 1
            yield "data: [DONE]\n\n"
        finally:
            self.running -= 1
            self.aborted += sent < max_tokens


    async def _cut(self):
        yield 'data: {"text": "x"}\n\n'
        yield 'data: {"text": "y"}\n\ndata: {"text": '  # and a torn event

    async def _crlf(self):
        for i in range(3):
            await asyncio.sleep(self.delay)
            yield f'data: {{"text": "{i}"}}\r\n\r\n'
        yield "data: [DONE]\r\n\r\n"


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    body = {"error": {"message": message, "type": "Error", "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _sleep_unless_gone(request: Request, seconds: float) -> bool:
    """-> False if the client disconnected first."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    done, _ = await asyncio.wait({watcher}, timeout=seconds)
    watcher.cancel()
    return not done


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class InThread:
    """An ASGI app served by uvicorn in a daemon thread on 127.0.0.1 (lifespan run: the router's first probes)."""

    def __init__(self, app):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        _wait_until(lambda: self.server.started, 10, "uvicorn did not start")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def fakes(*delays: float):
    replicas = [FakeReplica(delay, f"fake{i}") for i, delay in enumerate(delays)]
    served = [InThread(r.app()) for r in replicas]
    for replica, server in zip(replicas, served):
        replica.url = server.url
    try:
        yield replicas
    finally:
        for server in served:
            server.close()


@contextlib.contextmanager
def routing(*urls: str, **config):
    router = Router(RouterConfig(tuple(urls), **{**FAST, **config}))
    served = InThread(build_app(router))
    try:
        yield router, served.url
    finally:
        served.close()


def spawn_fake(port: int, delay: float, name: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, str(port), str(delay), name], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def up() -> bool:
        assert process.poll() is None, f"the fake replica exited with {process.returncode}"
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        return False

    _wait_until(up, 20, "the fake replica did not start")
    return process


def _wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


async def _post_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def post(body):
            async with limit:
                return await client.post(f"{url}/v1/completions", json=body)

        return await asyncio.gather(*(post(b) for b in bodies))


def _metric(text: str, name: str, replica: str) -> float:
    prefix = f'jaxinfer_router:{name}{{replica="{replica}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix))[len(prefix):])


# --- the policy and the request's routing view (pure) ---------------------------------------


def test_policy_keeps_affinity_while_loads_are_comparable():
    policy = Policy(factor=2.0, margin=100)
    assert policy.choose({"a": 1000, "b": 900}, ["a"]) == Choice("a", True)
    assert policy.choose({"a": 2100, "b": 1000}, ["a"]) == Choice("a", True)  # exactly 2x + margin: still kept
    assert policy.choose({"a": 0, "b": 50}, [None, "b"]) == Choice("b", True)  # the coarser window's replica


def test_policy_leaves_an_overloaded_affinity_replica():
    policy = Policy(factor=2.0, margin=100)
    assert policy.choose({"a": 2101, "b": 1000}, ["a"]) == Choice("b", False)
    assert policy.choose({"a": 5000, "b": 1000, "c": 2000}, ["a", "c"]) == Choice("c", True)


def test_policy_takes_the_fewest_outstanding_tokens_and_never_a_dead_replica():
    policy = Policy()
    assert policy.choose({"a": 300, "b": 100, "c": 200}) == Choice("b", False)
    assert policy.choose({"a": 0, "b": 0}) == Choice("a", False)  # ties: the first given (the router rotates)
    assert policy.choose({"b": 10_000}, ["dead"]) == Choice("b", False)  # "dead" is not among the healthy
    assert policy.choose({}, ["dead"]) is None


def test_router_picks_only_healthy_replicas_and_counts_load_it_did_not_send():
    router = Router(RouterConfig(("http://a:1", "http://b:2", "http://c:3")))
    a, b, c = router.replicas.values()
    a.healthy = b.healthy = True
    picks = {router.pick(describe({"prompt": f"p{i}"}, chat=False)).url for i in range(20)}
    assert picks == {a.url, b.url}  # c never, and equal loads take turns
    b.external_tokens = 1e6  # what b's /metrics reported beyond the router's own requests
    assert {router.pick(describe({"prompt": f"q{i}"}, chat=False)).url for i in range(5)} == {a.url}


def test_describe_hashes_prompt_starts_and_estimates_tokens():
    chars, ids = PREFIX_WINDOWS[-1]
    shared = "s" * chars
    one, two = describe({"prompt": shared + "1" * 2000}, False), describe({"prompt": shared + "2" * 2000}, False)
    assert one.keys[-1] == two.keys[-1] and one.keys[0] != two.keys[0]  # the coarse window joins them
    assert describe({"prompt": [7] * ids + [1]}, False).keys[-1] == describe({"prompt": [7] * ids}, False).keys[-1]
    assert prefix_keys("abc") != prefix_keys([97, 98, 99])
    salted = describe({"prompt": shared, "cache_salt": "tenant-a"}, False).keys  # vLLM's cache_salt: no shared pages
    assert salted != describe({"prompt": shared}, False).keys
    assert salted == describe({"prompt": shared, "cache_salt": "tenant-a"}, False).keys
    assert prefix_keys("abc", "t") != prefix_keys("tabc")
    work = describe({"prompt": ["x" * 40, [1, 2, 3]], "max_tokens": 10, "n": 2}, False)
    assert (work.tokens, work.seqs) == (10 + 20 + 3 + 20, 4)
    chat = describe({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                     "max_completion_tokens": 5}, True)
    assert chat.tokens == 2 + 5 and chat.seqs == 1
    for junk in ({}, {"prompt": None}, {"prompt": {"a": 1}, "max_tokens": "ten", "n": 1.5}, {"prompt": [None, 3]},
                 {"messages": "hi"}, {"messages": [1, {"content": 3}]}):
        describe(junk, chat=False)
        describe(junk, chat=True)


def test_describe_never_recurses_into_junk():
    """JSON nested just shallow enough to parse (in a thread, for a large body) must not fail routing with a 500:
    the replica answers such a prompt with its own 400."""
    nested = []
    for _ in range(5000):
        nested = [nested]
    describe({"prompt": [nested, 1]}, chat=False)
    describe({"prompt": nested}, chat=False)
    describe({"messages": [{"role": nested, "content": "hi"}]}, chat=True)


def test_reported_sequences_reads_running_and_waiting():
    text = ('# HELP jaxinfer:num_requests_running x\njaxinfer:num_requests_running{model_name="m"} 3\n'
            'jaxinfer:num_requests_waiting{model_name="m"} 2.0\njaxinfer:kv_cache_usage_perc{model_name="m"} 0.5\n'
            'vllm:num_requests_running{model_name="v"} 1\n')
    assert reported_sequences(text) == 6


def test_config_refuses_bad_replicas_and_intervals():
    from jaxinfer.cli import main
    for argv in (["--replica", "localhost:8000"], ["--replica", "http://a:1/v1"],
                 ["--replica", "http://a:1", "--replica", "http://a:1/"], ["--replica", "http://a:1",
                                                                          "--health-interval", "0"]):
        assert main(["router", *argv]) == 2


def test_the_command_routes_and_exits_0_on_sigterm():
    port = _free_port()
    with fakes(0.0) as (fake,):
        command = [sys.executable, "-m", "jaxinfer.cli", "router", "--replica", fake.url, "--host", "127.0.0.1",
                   "--port", str(port), "--health-interval", "0.2"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def up() -> bool:
                assert process.poll() is None, process.stderr.read()
                with contextlib.suppress(httpx.TransportError):
                    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                return False

            _wait_until(up, 20, "the router did not start")
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert answer.json()["choices"][0]["text"] == "xx"
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0
        finally:
            process.kill()
            process.wait()


# --- routing live ----------------------------------------------------------------------------


def test_a_slower_replica_gets_fewer_requests():
    with fakes(0.02, 0.06) as replicas, routing(*(r.url for r in replicas)) as (router, url):
        bodies = [{"prompt": f"request {i}", "max_tokens": 8} for i in range(100)]
        answers = asyncio.run(_post_all(url, bodies, concurrency=20))
        assert all(a.status_code == 200 for a in answers)
        fast, slow = (len(r.received) for r in replicas)
        assert fast + slow == 100 and slow < 40, (fast, slow)  # by speed: 25 of 100 on the 3x slower one
        metrics = httpx.get(f"{url}/metrics").text
        for replica in replicas:
            assert _metric(metrics, "requests_routed_total", replica.url) == len(replica.received)
            assert _metric(metrics, "replica_healthy", replica.url) == 1
            assert _metric(metrics, "requests_in_flight", replica.url) == 0


def test_equal_replicas_share_100_concurrent_requests():
    with fakes(0.02, 0.02) as replicas, routing(*(r.url for r in replicas)) as (router, url):
        bodies = [{"prompt": f"request {i}", "max_tokens": 8, "stream": i % 2 == 0} for i in range(100)]
        answers = asyncio.run(_post_all(url, bodies, concurrency=100))
        assert all(a.status_code == 200 for a in answers)
        assert min(len(r.received) for r in replicas) >= 30, [len(r.received) for r in replicas]


def test_load_from_clients_bypassing_the_router_is_seen():
    with fakes(0.0, 0.0) as (busy, idle), routing(busy.url, idle.url) as (router, url):
        busy.external = 40
        _wait_until(lambda: router.replicas[busy.url].reported_seqs == 40, 5, "no /metrics poll")
        for i in range(6):
            assert httpx.post(f"{url}/v1/completions", json={"prompt": f"r{i}", "max_tokens": 1}).status_code == 200
        assert (len(busy.received), len(idle.received)) == (0, 6)
        busy.external = 0
        _wait_until(lambda: router.replicas[busy.url].external_tokens == 0, 5, "no /metrics poll")
        for i in range(6):
            httpx.post(f"{url}/v1/completions", json={"prompt": f"s{i}", "max_tokens": 1})
        assert len(busy.received) == 3


def test_requests_sharing_a_prefix_land_on_one_replica():
    with fakes(0.05, 0.05) as replicas, routing(*(r.url for r in replicas)) as (router, url):
        document = "a long document that every request of this group starts with, " * 6
        bodies = [{"prompt": f"Group {g}: {document} Question {i}: " + "why? " * 150, "max_tokens": 8}
                  for i in range(10) for g in range(5)]
        answers = asyncio.run(_post_all(url, bodies, concurrency=50))
        assert all(a.status_code == 200 for a in answers)
        served = {}
        for replica in replicas:
            for body in replica.received:
                served.setdefault(body["prompt"][:7], set()).add(replica.name)
        assert len(served) == 5 and all(len(names) == 1 for names in served.values()), served
        assert set.union(*served.values()) == {"fake0", "fake1"}  # and the groups are spread
        assert router.affinity_routed == 45


def test_streams_pass_through_byte_exact_as_they_arrive_and_errors_unchanged():
    with fakes(0.1) as (fake,), routing(fake.url) as (router, url):
        body = {"prompt": "exact", "max_tokens": 5, "stream": True}
        direct = httpx.post(f"{fake.url}/v1/completions", json=body, timeout=10).content
        start = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as routed:
            assert routed.status_code == 200 and routed.headers["content-type"].startswith("text/event-stream")
            chunks = [(time.monotonic() - start, chunk) for chunk in routed.iter_raw()]
        assert b"".join(c for _, c in chunks) == direct and direct.endswith(DONE)
        assert chunks[0][0] < 0.35 < chunks[-1][0]  # the first token came long before the last
        direct = httpx.post(f"{fake.url}/v1/completions", json={"prompt": "please 400"})
        routed = httpx.post(f"{url}/v1/completions", json={"prompt": "please 400"})
        assert (routed.status_code, routed.content) == (400, direct.content)
        assert routed.headers["content-type"] == "application/json"
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "please 429"}).headers["retry-after"] == "7"
        assert router.replicas[fake.url].healthy  # a 4xx says nothing about the replica's health


def test_a_replica_at_capacity_passes_the_request_to_one_with_room():
    """A 429 means the replica did not start the work: the router tries the others, and answers 429 itself (with
    the smallest Retry-After) only when every one is at capacity. The refused attempts hold no load."""
    with fakes(0.0, 0.0) as (full, room), routing(full.url, room.url) as (router, url):
        full.retry_after = 7
        for i in range(4):  # equal loads take turns: the full one is asked first too
            for stream in (False, True):
                answer = httpx.post(f"{url}/v1/completions", json={"prompt": f"r{i} {stream}", "max_tokens": 2,
                                                                   "stream": stream})
                assert answer.status_code == 200 and '"fake1"' in answer.text, answer.text
        assert full.received and len(room.received) == 8
        room.retry_after = 3
        for stream in (False, True):
            answer = httpx.post(f"{url}/v1/completions", json={"prompt": "r9", "stream": stream})
            error = answer.json()["error"]
            assert answer.status_code == 429 and answer.headers["retry-after"] == "3"
            assert error["code"] == 429 and full.url in error["message"] and room.url in error["message"]
        metrics = httpx.get(f"{url}/metrics").text
        for fake in (full, room):
            assert _metric(metrics, "requests_in_flight", fake.url) == 0 and router.replicas[fake.url].load == 0
            assert router.replicas[fake.url].healthy  # full is not broken
        assert _metric(metrics, "requests_refused_total", full.url) == len(full.received)
        assert _metric(metrics, "requests_refused_total", room.url) == 2


def test_a_stream_the_replica_ends_without_done_gets_an_error_event():
    """A clean end without `[DONE]` would look complete to a client: it gets an error event and `[DONE]` instead
    of the torn rest."""
    with fakes(0.0) as (fake,), routing(fake.url) as (router, url):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "please cut", "stream": True}, timeout=10)
        events = answer.content.split(b"\n\n")
        assert answer.status_code == 200 and answer.content.endswith(DONE), answer.content
        assert events[:2] == [b'data: {"text": "x"}', b'data: {"text": "y"}']
        error = json.loads(events[2][len(b"data: "):])["error"]
        assert error["code"] == 502 and fake.url in error["message"] and "[DONE]" in error["message"]
        assert router.replicas[fake.url].failures == 1 and router.replicas[fake.url].healthy


def test_a_responses_stream_ends_with_its_last_event_not_done():
    """A Responses API stream sends no `[DONE]`: one that ends with response.completed passes whole and unchanged;
    one cut before it gets the error event. The request is routed by the chat prompt its input means."""
    with fakes(0.0) as (fake,), routing(fake.url) as (router, url):
        whole = httpx.post(f"{url}/v1/responses", json={"input": "hello", "stream": True}, timeout=10)
        assert whole.status_code == 200 and whole.content.endswith(b'"sequence_number": 3}\n\n'), whole.content
        assert b"error" not in whole.content and router.replicas[fake.url].failures == 0
        cut = httpx.post(f"{url}/v1/responses", json={"input": "please cut", "stream": True}, timeout=10)
        assert cut.content.endswith(DONE) and b'"code": 502' in cut.content
        assert router.replicas[fake.url].failures == 1 and [b["input"] for b in fake.received] == ["hello",
                                                                                                    "please cut"]


def test_crlf_delimited_events_stream_as_they_arrive():
    with fakes(0.2) as (fake,), routing(fake.url) as (router, url):
        start = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "please crlf", "stream": True},
                          timeout=10) as routed:
            chunks = [(time.monotonic() - start, chunk) for chunk in routed.iter_raw()]
        assert b"".join(c for _, c in chunks).endswith(b"data: [DONE]\r\n\r\n") and b"error" not in chunks[-1][1]
        assert chunks[0][0] < 0.45 < chunks[-1][0], chunks  # the first event came before the last was sent


def test_other_routes_pass_through():
    with fakes(0.0) as (fake,), routing(fake.url) as (router, url):
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "fake0"
        assert httpx.post(f"{url}/tokenize", json={"prompt": "one two three"}).json()["count"] == 3
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 2})
        assert chat.status_code == 200 and fake.received[-1]["messages"][0]["content"] == "hi"
        assert httpx.get(f"{url}/health").json() == {"status": "ready", "healthy_replicas": [fake.url]}
        assert httpx.get(f"{url}/version").json() == {"version": jaxinfer.__version__}  # the router's own, as vLLM


def test_reset_prefix_cache_goes_to_every_healthy_replica():
    """200 once every replica has reset; 409 naming the replica that refused while it had a request running;
    502 naming one that could not be reached (which leaves rotation)."""
    with fakes(0.0, 0.2) as (idle, slow), routing(idle.url, slow.url) as (router, url):
        assert httpx.post(f"{url}/reset_prefix_cache").status_code == 200
        assert (idle.resets, slow.resets) == (1, 1)
        with httpx.stream("POST", f"{slow.url}/v1/completions", json={"prompt": "hold", "max_tokens": 20,
                                                                      "stream": True}) as held:
            lines = held.iter_lines()  # kept open: the fake counts the request running until it ends
            next(lines)
            refused = httpx.post(f"{url}/reset_prefix_cache")
        assert refused.status_code == 409 and f"{slow.url} (409)" in refused.json()["error"]["message"]
        assert idle.url not in refused.json()["error"]["message"] and (idle.resets, slow.resets) == (2, 1)
    dead = f"http://127.0.0.1:{_free_port()}"
    with fakes(0.0) as (fake,), routing(dead, fake.url, retry_dead_after=60) as (router, url):
        router.replicas[dead].healthy = True  # died a moment ago, not yet noticed
        unreachable = httpx.post(f"{url}/reset_prefix_cache")
        assert unreachable.status_code == 502 and f"{dead} (502)" in unreachable.json()["error"]["message"]
        assert fake.resets == 1 and not router.replicas[dead].healthy


def test_reset_prefix_cache_does_not_wait_long_for_a_replica_that_hangs(monkeypatch):
    """A control call waits PROBE_TIMEOUT, not the generation timeout: a silent replica is not reset (504), the
    others are."""
    monkeypatch.setattr("jaxinfer.router.PROBE_TIMEOUT", 1.0)
    with fakes(0.0, 0.0) as (hung, fine), routing(hung.url, fine.url) as (router, url):
        hung.reset_hangs = True
        answer = httpx.post(f"{url}/reset_prefix_cache", timeout=4)
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["message"] == f"the prefix cache was not reset on {hung.url} (504)"
        assert (hung.resets, fine.resets) == (0, 1) and router.replicas[hung.url].healthy


def test_api_key_guards_v1_and_the_replica_key_is_sent_on():
    with fakes(0.0) as (fake,), routing(fake.url, api_key="sekrit", replica_api_key="inner") as (router, url):
        body = {"prompt": "hi", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sekrit"}):
            answer = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["type"] == "AuthenticationError"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        key = {"Authorization": "Bearer sekrit"}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=key).status_code == 200
        assert fake.auth == ["Bearer inner"]
        assert httpx.get(f"{url}/v1/models", headers=key).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.post(f"{url}/reset_prefix_cache").status_code == 401
        assert httpx.post(f"{url}/reset_prefix_cache", headers=key).status_code == 200 and fake.resets == 1


def test_bad_input_gets_400_and_never_reaches_a_replica():
    with fakes(0.0) as (fake,), routing(fake.url, max_body_bytes=10_000) as (router, url):
        for content, status in ((b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400), (b"", 400),
                                (b"[" * 5000, 400), (b"1" * 5000, 400), (b" " * 20_000, 413)):
            answer = httpx.post(f"{url}/v1/completions", content=content)
            assert answer.status_code == status, (content[:20], answer.text)
            assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
        assert fake.received == []
        junk = httpx.post(f"{url}/v1/completions", json={"prompt": {"a": 1}, "max_tokens": "ten", "n": 1.5})
        assert junk.status_code == 400 and len(fake.received) == 1  # the replica's own verdict
        assert httpx.get(f"{url}/v1/nothing").status_code == 404
        assert httpx.get(f"{url}/v1/completions").json()["error"]["code"] == 405
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_leaves_while_sending_its_body_is_no_error(caplog):
    """A client gone mid-upload is routine, not a bug: no traceback in the router's log, and no request sent."""
    with fakes(0.0) as (fake,), routing(fake.url) as (router, url):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "')
            time.sleep(0.2)
        time.sleep(0.3)
        assert httpx.get(f"{url}/health").status_code == 200 and fake.received == []
    assert not [r for r in caplog.records if r.name == "jaxinfer.router" and r.levelname == "ERROR"], caplog.text


def test_no_healthy_replica_is_503_with_retry_after():
    with routing(f"http://127.0.0.1:{_free_port()}") as (router, url):
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "retry-after" in health.headers
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1
        assert "no healthy replica" in answer.json()["error"]["message"]
        assert "jaxinfer_router:no_replica_total 1" in httpx.get(f"{url}/metrics").text


def test_an_unreachable_replica_is_skipped_and_the_request_tried_once_more():
    dead = f"http://127.0.0.1:{_free_port()}"
    with fakes(0.0) as (fake,), routing(dead, fake.url, retry_dead_after=60) as (router, url):
        router.replicas[dead].healthy = True  # died a moment ago, not yet noticed
        for i in range(4):
            answer = httpx.post(f"{url}/v1/completions", json={"prompt": f"r{i}", "max_tokens": 1})
            assert answer.status_code == 200 and answer.json()["model"] == "fake0"
        assert router.replicas[dead].failures == 1 and not router.replicas[dead].healthy


def test_a_client_that_leaves_closes_its_upstream_request():
    with fakes(0.05) as (fake,), routing(fake.url) as (router, url):
        body = {"prompt": "leave", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as answer:
            assert next(answer.iter_raw()).startswith(b"data: ")
        _wait_until(lambda: fake.aborted == 1 and fake.running == 0, 5, "the streamed request went on")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "leave", "max_tokens": 100}, timeout=0.5)
        _wait_until(lambda: fake.aborted == 2 and fake.running == 0, 5, "the plain request went on")
        _wait_until(lambda: router.replicas[fake.url].own_requests == 0, 5, "the router still counts them")
        assert router.replicas[fake.url].own_tokens == 0 and router.replicas[fake.url].healthy


def test_two_real_replicas_behind_the_router():
    """Two in-process `jaxinfer serve` apps over the embedded model: answers as from a replica, by affinity."""
    from live_server import LiveServer  # imports JAX: only here

    replicas = [LiveServer(), LiveServer()]
    try:
        with routing(*(r.url for r in replicas)) as (router, url):
            body = {"prompt": "The router says", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            routed = [httpx.post(f"{url}/v1/completions", json=body, timeout=300).json() for _ in range(2)]
            stream = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=300).text
            texts = [json.loads(event[len("data: "):])["choices"][0]["text"] for event in stream.split("\n\n")
                     if event.startswith("data: {")]
            assert routed[0]["choices"][0]["text"] == routed[1]["choices"][0]["text"] == "".join(texts)
            assert stream.endswith("data: [DONE]\n\n")
            assert sorted(r.routed for r in router.replicas.values()) == [0, 3]  # one prompt, one replica
            assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "jaxinfer"
    finally:
        for replica in replicas:
            replica.close()


async def _through_a_kill(url: str, victim: subprocess.Popen) -> tuple[list, list, list]:
    """Streams and plain requests on both replicas; the victim is killed while they run; then more requests."""
    async with httpx.AsyncClient(timeout=15) as client:
        async def streamed(i):
            body = {"prompt": f"stream {i}", "max_tokens": 40, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as answer:
                return answer.status_code, b"".join([chunk async for chunk in answer.aiter_raw()])

        async def plain(i):
            return await client.post(f"{url}/v1/completions", json={"prompt": f"plain {i}", "max_tokens": 40})

        streams = [asyncio.create_task(streamed(i)) for i in range(6)]
        await asyncio.sleep(0.3)  # all six streaming, three on each replica: plain ones split three and three
        plains = [asyncio.create_task(plain(i)) for i in range(6)]
        await asyncio.sleep(0.5)
        victim.kill()
        done = await asyncio.wait_for(asyncio.gather(*streams, *plains), 10)
        later = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={"prompt": f"later {i}",
                                                                                  "max_tokens": 4})
                                       for i in range(6)))
        return done[:6], done[6:], later


def test_a_killed_replica_fails_its_requests_clearly_and_returns_after_the_retry_interval():
    port = _free_port()
    victim_url = f"http://127.0.0.1:{port}"
    victim = spawn_fake(port, 0.05, "victim")
    try:
        with fakes(0.05) as (survivor,), routing(victim_url, survivor.url) as (router, url):
            streams, plains, later = asyncio.run(_through_a_kill(url, victim))
            victim.wait()
            failed_streams = [body for status, body in streams if b'"error"' in body]
            assert all(status == 200 for status, _ in streams) and failed_streams
            for body in failed_streams:
                error = body.split(b"\n\n")[-3]  # then [DONE], then the empty rest
                assert victim_url in json.loads(error[len(b"data: "):])["error"]["message"]
                assert b'"victim"' in body and body.endswith(DONE)
            assert sum(body.count(b'"fake0"') == 40 and body.endswith(DONE) for _, body in streams) == 6 - len(
                failed_streams)
            failed = [p for p in plains if p.status_code != 200]
            assert failed and all(p.status_code == 502 and victim_url in p.json()["error"]["message"] for p in failed)
            assert all(p.json()["model"] == "fake0" for p in plains + later if p.status_code == 200)
            assert all(p.status_code == 200 for p in later)
            assert httpx.get(f"{url}/health").status_code == 200
            metrics = httpx.get(f"{url}/metrics").text
            assert _metric(metrics, "replica_healthy", victim_url) == 0
            assert _metric(metrics, "request_failures_total", victim_url) >= len(failed_streams) + len(failed)

            victim = spawn_fake(port, 0.0, "victim")  # back, on the same port
            _wait_until(lambda: router.replicas[victim_url].healthy, FAST["retry_dead_after"] + 3, "not back")
            back = [httpx.post(f"{url}/v1/completions", json={"prompt": f"back {i}", "max_tokens": 1}, timeout=10)
                    for i in range(4)]
            assert {b.json()["model"] for b in back} == {"victim", "fake0"}
    finally:
        victim.kill()
        victim.wait()


if __name__ == "__main__":  # one fake replica: PORT DELAY NAME
    port, delay, name = sys.argv[1:4]
    uvicorn.run(FakeReplica(float(delay), name).app(), host="127.0.0.1", port=int(port), log_level="warning")
