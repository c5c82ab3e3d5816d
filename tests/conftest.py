"""Test-wide settings: CPU only, float32 numerics, tiny checkpoints built with transformers."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Pallas interpret mode and XLA both stay on CPU
# The suite is dominated by compiling (a few seconds per step shape); at the toy sizes tested, LLVM's
# optimisations and XLA:CPU's fusion emitters (MLIR) each double compile time and buy nothing back
# (docs/benchmarks.md, "What the tests spend"). Production runs, and the tests' GPU runs (scripts/gpu_*.sh),
# keep XLA's defaults. Processes the tests start inherit these; those with fake devices add the device count.
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
# Many tests start their own processes (servers, launchers, CLIs, replicas) that compile the same step
# shapes again: JAX's persistent compilation cache, in a directory of this run's own that the processes
# inherit, lets each shape compile once per run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxinfer-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
