"""Test-wide settings: CPU only, float32 numerics, tiny checkpoints built with transformers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Pallas interpret mode and XLA both stay on CPU
# The suite is dominated by compiling (a few seconds per step shape); at the toy sizes tested, LLVM's
# optimisations halve compile time and buy nothing back. Production runs keep XLA's defaults.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
