"""Run by tests/test_mesh.py in a process of its own with 8 fake CPU devices (JAX reads the device count once,
at start-up). Loads one safetensors checkpoint on each mesh layout asked for, decodes greedily, and prints one
JSON object per layout: the tokens and how the weights, the KV pool and the slot state are sharded."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402

from jaxinfer.config import EngineConfig  # noqa: E402
from pallas_kernels.kv_storage import value_format  # noqa: E402
from jaxinfer.engine.structured import StructuredOutputsParams  # noqa: E402
from jaxinfer.llm import LLM, SamplingParams  # noqa: E402

TRITON = "xla.gpu.triton"

PROMPTS = [[5, 9, 100, 7], list(range(20, 39)), [42], list(range(300, 312))]
BAD_WORDS = ["of the", "the LORD", "and"]  # the one-device output of prompts 2 and 3 has "of the"
STRUCTURED_REGEX = r"[a-z]+ [0-9]{2}"
STRUCTURED_JSON = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                   "additionalProperties": False}


def describe(array) -> dict:
    return {"shape": list(array.shape), "spec": [None if a is None else str(a) for a in array.sharding.spec],
            "local": list(array.addressable_shards[0].data.shape), "devices": len(array.sharding.device_set)}


def lowers_for_cuda(runner) -> list[bool]:
    """Whether each step shape the runner compiled lowers for an NVIDIA GPU with the kernels as Triton calls
    (traced as on a GPU: tests/test_pallas_lowering.py); the kernels run under shard_map on this mesh."""
    real, jax.default_backend = jax.default_backend, lambda: "gpu"
    try:
        return [TRITON in runner.lower(layout, ("cuda",)).as_text() for layout in runner.layouts]
    finally:
        jax.default_backend = real


def run(checkpoint: str, data: int, model: int, backend: str, kv_cache_dtype: str = "auto") -> dict:
    # The Pallas layout (DP and TP, as on a GPU) has 4 slots a shard whose decode steps shrink to 2 rows,
    # the 2 each shard runs: its step reads and writes the slot state of the rows it computes only.
    slots, buckets = (8, (2, 4)) if backend == "pallas" else (4, None)
    engine = EngineConfig(max_slots=slots, page_size=8, prefill_chunk=16, max_model_len=64, num_pages=32,
                          decode_steps=2, mesh_shape=(data, model), attention_backend=backend, dtype="float32",
                          max_prefill_seqs=2,  # packed prompts on every layout; 2, not Pallas's 8: interpret is slow
                          control_flow="static" if backend == "pallas" else "dynamic",  # as on a GPU
                          decode_buckets=buckets, kv_cache_dtype=kv_cache_dtype)
    llm = LLM(checkpoint, engine)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
    if kv_cache_dtype != "auto":  # a narrow KV cache: its pool's shards and greedy tokens only
        llm.engine.check_idle()
        return {"layout": [data, model], "backend": backend, "kv_cache_dtype": kv_cache_dtype,
                "cuda": lowers_for_cuda(llm.runner) if backend == "pallas" else None,
                "tokens": [o.outputs[0].token_ids for o in outs], "kv": describe(llm.runner.kv.k),
                "kv_dtype": str(value_format(llm.runner.kv.k.dtype))}
    # Bad words (slot rows loaded at admission, recent tokens kept per slot) beside a plain request.
    banned = dataclasses.replace(greedy, bad_words=BAD_WORDS)
    edited = llm.generate(PROMPTS, [banned, greedy, banned, banned], use_tqdm=False)
    # Structured outputs (a token mask per step from the host, one round a dispatch) beside a plain request.
    regex = dataclasses.replace(greedy, structured_outputs=StructuredOutputsParams(regex=STRUCTURED_REGEX))
    person = dataclasses.replace(greedy, structured_outputs=StructuredOutputsParams(json=STRUCTURED_JSON,
                                                                                    disable_any_whitespace=True))
    structured = llm.generate(PROMPTS, [regex, greedy, person, regex], use_tqdm=False)
    runner = llm.runner
    llm.engine.check_idle()
    return {"layout": [data, model], "backend": backend, "tokens": [o.outputs[0].token_ids for o in outs],
            "bad_words_tokens": [o.outputs[0].token_ids for o in edited],
            "structured_texts": [o.outputs[0].text for o in structured],
            "structured_tokens": [o.outputs[0].token_ids for o in structured],
            "wq": describe(runner.params["layers"]["wq"]), "wk": describe(runner.params["layers"]["wk"]),
            "embed": describe(runner.params["embed"]), "kv": describe(runner.kv.k),
            "slots": describe(runner.state.tokens),
            "decode_rows": sorted({layout.shape("positions")[0] for layout in runner.layouts}),
            "cuda": lowers_for_cuda(runner) if backend == "pallas" else None}


if __name__ == "__main__":
    checkpoint = sys.argv[1]
    for layout in sys.argv[2:]:
        data, model, backend, *kv_cache_dtype = layout.split(",")
        print(json.dumps(run(checkpoint, int(data), int(model), backend, *kv_cache_dtype)), flush=True)
