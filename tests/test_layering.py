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
