"""Test-wide settings: CPU only, float32 numerics, tiny checkpoints built with transformers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Pallas interpret mode and XLA both stay on CPU
# The suite is dominated by compiling (a few seconds per step shape); at the toy sizes tested, LLVM's
# optimisations halve compile time and buy nothing back. Production runs keep XLA's defaults.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# No persistent compilation cache: with one (a directory of the run's own, which the servers and launchers
# tests start inherited, saving about 20 s), xdist workers died inside jaxlib 0.10.2's `executable.serialize()`
# (SIGSEGV or SIGABRT in compilation_cache.put_executable_and_time) in three of four full runs on 2026-11-29,
# CI's own clone among them, each time after many compiles in one worker; every test passed alone.
