"""The host/device line: host bookkeeping modules must import without JAX."""

import subprocess
import sys

HOST_MODULES = ("jaxinfer.config", "jaxinfer.engine.pages", "jaxinfer.engine.scheduler", "jaxinfer.tokenizer",
                "jaxinfer.planner.costmodel", "jaxinfer.planner.simulator", "jaxinfer.planner.plan",
                "jaxinfer.planner.steplog")


def test_host_modules_do_not_import_jax():
    code = f"import sys; import {', '.join(HOST_MODULES)}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_engine_serves_without_llguidance():
    """A machine without llguidance (the GPU machines run the source tree as it is) serves every request but
    structured outputs, which are refused saying what is missing."""
    code = """
import sys
sys.modules["llguidance"] = None  # import llguidance now fails
from jaxinfer import LLM, SamplingParams, StructuredOutputsParams
from jaxinfer.config import EngineConfig
llm = LLM(engine=EngineConfig(max_slots=1, max_model_len=32))
print(len(llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids))
try:
    llm.generate("Hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")), use_tqdm=False)
except ValueError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    generated, refused = out.splitlines()[-2:]
    assert generated == "2" and "structured outputs need the llguidance package (pip install llguidance)" in refused
