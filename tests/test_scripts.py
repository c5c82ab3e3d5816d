"""The benchmark scripts still run (tiny CPU versions); their figures are not checked here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_bench_attention_smoke():
    out = _run("scripts/bench_attention.py", "--smoke")
    assert "jaxinfer-pallas" in out and "jnp-reference" in out and "copy bandwidth" in out


def test_bench_step_tiny():
    out = _run("scripts/bench_step.py", "--config", "jaxinfer/assets/default/config.json", "--batches", "1", "2",
               "--chunks", "16", "--repeats", "1", "--max-model-len", "64", "--context", "32")
    assert "prefill chunk    16" in out and "decode batch   2" in out and "load from orbax" in out
