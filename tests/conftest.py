"""Test-wide settings: CPU only, float32 numerics, tiny checkpoints built with transformers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Pallas interpret mode and XLA both stay on CPU
