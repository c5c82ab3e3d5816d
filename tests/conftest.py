"""Test-wide settings: CPU only, float32 numerics, tiny checkpoints built with transformers."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Pallas interpret mode and XLA both stay on CPU
# The suite is dominated by compiling (a few seconds per step shape); at the toy sizes tested, LLVM's
# optimisations halve compile time and buy nothing back. Production runs keep XLA's defaults.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# Many tests start their own processes (servers, launchers, CLIs, replicas) that compile the same step
# shapes again: JAX's persistent compilation cache, in a directory of this run's own that the processes
# inherit, lets each shape compile once per run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxinfer-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
