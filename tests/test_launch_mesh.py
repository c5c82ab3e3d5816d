"""Two local processes with two CPU devices each form one mesh through scripts/launch_mesh.py, serve HTTP, and
answer exactly what one process answers; a process that dies takes the group down, naming itself."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.llm import LLM, SamplingParams
from live_server import free_socket, wait_healthy

LAUNCHER = Path(__file__).resolve().parent.parent / "scripts" / "launch_mesh.py"
ENGINE = dict(max_slots=2, max_model_len=64, prefill_chunk=16, num_pages=32, page_size=8)
PROMPT = [5, 9, 100, 7, 300, 12]
# A request whose sampling loads device rows at admission (penalty counts, logit edits): the followers must load
# them too, as process 0 announces.
STEERED = dict(repetition_penalty=1.3, logit_bias={300: 4.0, 9: 6.0}, allowed_token_ids=list(range(0, 400, 3)) + [9])
# A request under a grammar: each step carries its token mask, which the followers must apply too.
GUIDED = dict(structured_outputs={"regex": "[a-z]+ [0-9]{2}"})


def _port() -> int:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return port


def launch(*mesh: str) -> tuple[subprocess.Popen, str]:
    port = _port()
    command = [sys.executable, str(LAUNCHER), "--processes", "2", "--platform", "cpu", "--devices-per-process", "2",
               "--coordinator-port", str(_port()), "--grace", "15", "--",
               "--host", "127.0.0.1", "--port", str(port), "--skip-warmup", *mesh,
               "--max-num-seqs", "2", "--max-model-len", "64", "--prefill-chunk", "16", "--num-pages", "32",
               "--page-size", "8"]
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True), \
        f"http://127.0.0.1:{port}"


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def alone():
    llm = LLM(engine=EngineConfig(**ENGINE))
    out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def steered():
    llm = LLM(engine=EngineConfig(**ENGINE))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, **STEERED)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def guided():
    llm = LLM(engine=EngineConfig(**ENGINE))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, **GUIDED)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids


def _ask(url: str, **extra) -> list[int]:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            **extra}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["token_ids"]


def test_two_processes_answer_what_one_answers_and_drain_on_sigterm(alone, steered, guided):
    launcher, url = launch("-dp", "2", "-tp", "2")
    try:
        wait_healthy(url, timeout=240, process=launcher)
        assert _ask(url) == alone
        assert _ask(url, **STEERED) == steered != alone
        assert _ask(url, **GUIDED) == guided != alone
        assert _ask(url) == alone  # and again: the other process stayed in step
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0, launcher.stderr.read()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_dying_process_takes_the_group_down(alone, steered):
    launcher, url = launch("-tp", "4")  # tensor parallel across the two processes: collectives every layer
    try:
        wait_healthy(url, timeout=240, process=launcher)
        assert _ask(url) == alone
        assert _ask(url, **STEERED) == steered  # every process holds the slot rows: each must load them
        leader, follower = children(launcher.pid)
        subprocess.run(["kill", "-9", str(follower)], check=True)
        start = time.monotonic()
        status = launcher.wait(60)
        assert status != 0 and time.monotonic() - start < 60
        assert "process 1" in launcher.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if launcher.poll() is None:
            launcher.kill()
