"""`jaxinfer serve` as its own process: health through warm-up, memory over many disconnects, SIGTERM drain;
and an engine failure inside a step (in-process)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from jaxinfer.llm import load_engine
from jaxinfer.planner.steplog import read_log
from jaxinfer.server.app import ServerConfig
from live_server import ENGINE, LiveServer, serves_normally, spawn_server, stop, wait_healthy

TINY = ("--max-model-len", "128", "--max-num-seqs", "2", "--prefill-chunk", "32", "--num-pages", "64",
        "--shutdown-timeout", "60")
MEMORY_BOUND_MB = 25  # RSS growth allowed over 200 disconnect cycles after a warm-up of 50


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def step_log(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "steps.jsonl"


@pytest.fixture(scope="module")
def process(step_log):
    proc, url = spawn_server(*TINY, "--step-log", str(step_log))
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            seen.append(response.status_code)
            if response.status_code == 200:
                break
            assert response.json()["status"] == "starting"
            early = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
            seen.append(early.status_code + 1000)  # 1503: refused while starting (1200 if ready just now)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    wait_healthy(url, timeout=1, process=proc)
    yield proc, url, seen
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_health_is_503_until_warm_up_is_done(process):
    _, url, seen = process
    assert 503 in seen and 1503 in seen and seen[-1] == 200
    out = httpx.post(f"{url}/v1/completions", json={"prompt": "Warm", "max_tokens": 4, "temperature": 0})
    assert out.status_code == 200


def _cycle(url: str, i: int) -> None:
    """One request abandoned by its client: mid-stream, or while the other slot-holders keep it queued."""
    body = {"prompt": f"Cycle {i} " * (1 + i % 5), "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                return


def _gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {name: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() for name in
            ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
            if line.startswith(f"jaxinfer:{name}{{")}


def _settled(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        values = _gauges(url)
        if values == {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0}:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not return to idle: {values}")


def test_memory_stays_flat_over_disconnect_cycles(process):
    proc, url, _ = process
    for i in range(50):
        _cycle(url, i)
    _settled(url)
    before = _rss_mb(proc.pid)
    for i in range(200):
        _cycle(url, i)
    _settled(url)
    growth = _rss_mb(proc.pid) - before
    assert growth < MEMORY_BOUND_MB, f"RSS grew by {growth:.1f} MB over 200 disconnect cycles"
    serves_normally(url)


def test_sigterm_drains_in_flight_requests_then_exits_zero(process, step_log):
    """Requests running and queued when SIGTERM comes all finish; meanwhile new ones get 503. (Six requests
    of 120 tokens on 2 slots: the drain outlasts the checks even where one request takes 0.1 s.)"""
    proc, url, _ = process
    answers = []

    def long_request(i: int):
        answers.append(httpx.post(f"{url}/v1/completions", json={
            "prompt": f"Drain me {i}", "max_tokens": 120, "temperature": 0, "ignore_eos": True}, timeout=120))

    workers = [threading.Thread(target=long_request, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while sum(_gauges(url)[name] for name in ("num_requests_running", "num_requests_waiting")) < 6:
        assert time.monotonic() < deadline, "the requests never all arrived"  # else SIGTERM refuses a late one
        time.sleep(0.01)
    proc.terminate()
    while httpx.get(f"{url}/health").status_code == 200:  # until the signal is handled
        time.sleep(0.005)
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Too late", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 503
    assert httpx.get(f"{url}/health").status_code == 503
    for worker in workers:
        worker.join(120)
    assert [a.status_code for a in answers] == [200] * 6
    assert all(a.json()["usage"]["completion_tokens"] == 120 for a in answers)
    assert stop(proc) == 0
    log = proc.stderr.read()
    assert "warm-up:" in log and log.index("warm-up:") < log.index("ready:")
    steps = read_log(step_log)  # --step-log: every step the server ran, the last one included
    assert steps.header["engine"]["max_slots"] == 2 and steps.records >= 20 and len(steps.shapes) >= 10
    assert steps.shapes[-1].rounds >= 1


class _FailingExecutor:
    """The real executor until `armed`; then the next dispatch raises, as a device fault would."""

    def __init__(self, inner):
        self.inner, self.armed = inner, False

    def dispatch(self, plan):
        if self.armed:
            raise RuntimeError("injected device fault")
        return self.inner.dispatch(plan)

    def collect(self, handle):
        return self.inner.collect(handle)


def test_a_failing_step_fails_its_requests_and_marks_the_server_dead():
    engine = load_engine(None, ENGINE)
    executor = engine.executor = _FailingExecutor(engine.executor)
    live = LiveServer(ServerConfig(), engine_object=engine)
    fatal = threading.Event()
    live.server.on_fatal = fatal.set
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
                body = {"prompt": "Doomed", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
                whole = asyncio.create_task(http.post("/v1/completions", json=body))
                events = []
                async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    async for line in response.aiter_lines():
                        if line:
                            events.append(line)
                        if len(events) == 1:
                            executor.armed = True
                return await whole, events

        whole, events = asyncio.run(scenario())
        assert whole.status_code == 500 and "injected device fault" in whole.json()["error"]["message"]
        assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
        assert fatal.wait(5)
        assert httpx.get(f"{live.url}/health").status_code == 503
        assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "After"}).status_code == 503
    finally:
        live.close()
