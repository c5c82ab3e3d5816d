"""Real servers for the server tests: in this process (uvicorn in a thread) or as a `jaxinfer serve` process.

Both listen on 127.0.0.1 at a free port. The in-process server uses the same
engine settings as tests/test_engine.py, so the compiled steps are shared when
both run in one pytest process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn

from jaxinfer.config import EngineConfig
from jaxinfer.llm import load_engine
from jaxinfer.server.app import Server, ServerConfig, build_app

ENGINE = EngineConfig(max_slots=6, page_size=16, prefill_chunk=64, min_prefill_bucket=64, max_model_len=384,
                      decode_steps=4, num_pages=200, max_prefill_seqs=6)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """The app over a loaded engine, served by uvicorn in a background thread."""

    def __init__(self, config: ServerConfig = ServerConfig(), engine: EngineConfig = ENGINE, engine_object=None):
        self.server = Server(config)
        self.engine = engine_object or load_engine(None, engine)
        self.engine.start()
        self.server.ready(self.engine)
        sock = free_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(build_app(self.server), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until every request has left the engine and the server; then the engine's pages and slots are
        checked (all free or cached-idle)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.in_flight == 0 and not self.engine.has_work() and not self.engine._requests:
                self.engine.check_idle()
                return
            time.sleep(0.02)
        raise AssertionError(f"still busy after {timeout}s: {self.server.in_flight} sequences in flight")


def serves_normally(url: str) -> None:
    """A small greedy request still gets its whole answer."""
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Still there?", "max_tokens": 4, "temperature": 0,
                                                       "ignore_eos": True}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4


def wait_healthy(url: str, timeout: float = 300.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{process.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} was not healthy within {timeout}s")


def spawn_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`jaxinfer serve` on a free port as its own process (stderr piped); -> (process, base url)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "jaxinfer.cli", "-v", "serve", "--host", "127.0.0.1", "--port", str(port),
               *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
