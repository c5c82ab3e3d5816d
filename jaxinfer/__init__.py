"""jaxinfer: LLM inference on JAX/XLA.

The top-level names load lazily so that host-only modules (config, tokenizer,
scheduling) can be imported without importing JAX.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "LLM": "jaxinfer.llm", "SamplingParams": "jaxinfer.llm", "RequestOutput": "jaxinfer.llm",
    "CompletionOutput": "jaxinfer.llm", "Logprob": "jaxinfer.llm", "RequestOutputKind": "jaxinfer.llm",
    "StructuredOutputsParams": "jaxinfer.engine.structured",
    "BeamSearchParams": "jaxinfer.engine.beam_search", "BeamSearchOutput": "jaxinfer.engine.beam_search",
    "EngineConfig": "jaxinfer.config",
    "ModelConfig": "jaxinfer.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
