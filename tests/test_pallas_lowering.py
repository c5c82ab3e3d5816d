"""Our kernels, and the engine's whole step with them, lowered for an NVIDIA GPU from this CPU machine.

`jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs the Pallas Triton lowering without a GPU, so
its rules (power-of-two blocks, both operands of a dot in one dtype) and the choice of lowering (Triton,
not Mosaic GPU) are checked on every CI run, not only in a GPU session. `jax.default_backend` is made to say
"gpu" meanwhile, so the code traces as it would there: half-precision dot operands, pools of the GPU's
element types, the engine's GPU defaults. Triton's own compile (PTX) still needs a GPU: scripts/gpu_check.sh.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from hf_models import build
from jaxinfer.config import EngineConfig
from jaxinfer.llm import load_engine
from jaxinfer.runner import Passes
from pallas_kernels.kv_storage import storage_dtype
from pallas_kernels import paged_decode
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.ragged_prefill import ragged_prefill_attention

TRITON, MOSAIC = "xla.gpu.triton", "mosaic_gpu"
S = jax.ShapeDtypeStruct
# (query dtype, pool format, page size Z, head dim H, query heads per KV head G, sliding window, softcap, sinks)
CASES = [
    (jnp.bfloat16, jnp.bfloat16, 16, 128, 4, None, None, False),  # Llama 3 8B
    (jnp.float32, jnp.float32, 8, 64, 1, None, None, False),
    (jnp.bfloat16, jnp.float8_e4m3fn, 32, 128, 8, None, None, False),
    (jnp.float16, jnp.float8_e5m2, 16, 64, 2, 21, None, False),
    (jnp.bfloat16, jnp.bfloat16, 16, 256, 2, 512, 50.0, False),  # Gemma 2's head dim, window and softcap
    (jnp.float16, jnp.float16, 8, 128, 16, None, None, False),
    (jnp.bfloat16, jnp.bfloat16, 16, 96, 4, 2047, None, False),  # Phi-3.5-mini: a head dim of 96, padded to 128
    (jnp.float32, jnp.float8_e4m3fn, 8, 80, 2, None, None, False),
    (jnp.bfloat16, jnp.bfloat16, 16, 64, 8, 128, None, True),  # gpt-oss: attention sinks, a window of 128
    (jnp.bfloat16, jnp.bfloat16, 16, 576, 128, None, None, False),  # DeepSeek-V3's latent: 576 padded to 1024
]


LOOP_CONDITION = re.compile(r"\bcond \{(.*?)\} do \{", re.S)


def data_bound_loops(text: str) -> int:
    """Loops whose condition compares with no constant: a trip count that is data, whose every condition
    XLA:GPU reads on the host (as it does a conditional's predicate)."""
    return sum("stablehlo.constant" not in condition for condition in LOOP_CONDITION.findall(text))


def _lowered(fn, *args, **static):
    return jax.jit(lambda *a: fn(*a, **static)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture
def on_gpu(monkeypatch):
    """Trace as on a GPU, under JAX's Mosaic GPU default (jax 0.10.2's; a GPU machine's JAX may differ)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    default = jax.config.jax_pallas_use_mosaic_gpu
    jax.config.update("jax_pallas_use_mosaic_gpu", True)
    yield
    jax.config.update("jax_pallas_use_mosaic_gpu", default)


@pytest.mark.parametrize("dtype, kv_format, Z, H, G, window, softcap, sinks", CASES)
def test_kernels_lower_for_cuda_through_triton(on_gpu, dtype, kv_format, Z, H, G, window, softcap, sinks):
    """Each kernel is one Triton call and no Mosaic GPU one: jax 0.10.2 lowers a `pallas_call` without
    compiler parameters to Mosaic GPU, where our kernels do not compile."""
    B, K, L, P, W = 8, 2, 2, 64, 8
    pool = S((L, K, P, Z, H), storage_dtype(kv_format, "gpu"))
    tables, lengths = S((B, W), jnp.int32), S((B,), jnp.int32)
    mask = dict(sliding_window=window, softcap=softcap, sinks=jnp.zeros(K * G) if sinks else None)
    decode = _lowered(paged_decode_attention, S((B, K * G, H), dtype), pool, pool, S((), jnp.int32), tables,
                      lengths, **mask)
    prefill = _lowered(ragged_prefill_attention, S((64, K * G, H), dtype), pool, pool, S((), jnp.int32), tables,
                       S((B + 1,), jnp.int32), lengths, **mask)
    for text in (decode, prefill):
        assert text.count(TRITON) == 1 and MOSAIC not in text


def _decode_lowered(H=128):
    """The decode kernel traced afresh (not from its jit's cache, which holds traces of the unpatched code)."""
    pool = S((2, 2, 64, 16, H), jnp.bfloat16)
    return _lowered(paged_decode_attention.__wrapped__, S((8, 8, H), jnp.bfloat16), pool, pool, S((), jnp.int32),
                    S((8, 8), jnp.int32), S((8,), jnp.int32))


def test_without_triton_parameters_the_kernel_would_not_compile(on_gpu, monkeypatch):
    """What the explicit Triton parameters prevent: under the Mosaic GPU default the decode kernel's
    whole-pool blocks would be staged in shared memory, far beyond a GPU's."""
    monkeypatch.setattr(paged_decode, "triton_params", lambda *knobs: None)
    with pytest.raises(ValueError, match="shared memory"):
        _decode_lowered()


def test_an_unpadded_head_dim_of_96_breaks_a_triton_rule(on_gpu, monkeypatch):
    """What the padded head dim prevents: Triton refuses blocks of 96 columns."""
    monkeypatch.setattr(paged_decode, "padded_head_dim", lambda H: H)
    with pytest.raises(ValueError, match="power of 2"):
        _decode_lowered(96)


@pytest.mark.parametrize("family, config, kv_cache_dtype", [("gemma2", None, "auto"),
                                                           ("qwen3", {"head_dim": 96}, "fp8"),
                                                           ("qwen3_moe-fp8", None, "auto"), ("cohere2", None, "auto")])
def test_every_warm_up_step_lowers_for_cuda(on_gpu, tmp_path, family, config, kv_cache_dtype):
    """The engine as a GPU resolves it (Pallas attention, static control flow, bfloat16, packed prefill)
    lowers every step shape its warm-up compiles, and those of prompt logprobs, of every sampler pass at
    once and of a grammar's token mask, with the kernels as Triton calls and no conditional or loop whose
    trip count is data (XLA:GPU would read either on the host, a wait for the device, at every layer or
    round). Gemma 2 adds layers of two kinds (one attention with a traced window) and capped logits; Qwen 3
    an fp8 KV cache and Phi-3's head dim; Qwen3-MoE the experts, from an fp8 checkpoint (every projection
    widened in the layer scan); Cohere 2 LayerNorm, parallel blocks, interleaved RoPE on its sliding layers
    only."""
    build(family, tmp_path, config=config)
    engine = load_engine(tmp_path, EngineConfig(max_slots=4, page_size=16, max_model_len=128, prefill_chunk=32,
                                                attention_backend="pallas", kv_cache_dtype=kv_cache_dtype))
    cfg, runner = engine.cfg, engine.executor.runner
    assert (cfg.control_flow, cfg.dtype, cfg.max_prefill_seqs) == ("static", "bfloat16", 8)
    layouts = [*runner._shapes([Passes(), Passes(draw=True), Passes(True, True, True, True)], (False, True)),
               *runner._shapes([Passes()], (False,), masked=True)]
    assert len(layouts) >= 10
    for layout in layouts:
        text = runner.lower(layout, ("cuda",)).as_text()
        assert TRITON in text and MOSAIC not in text and "stablehlo.case" not in text
        assert data_bound_loops(text) == 0 and len(LOOP_CONDITION.findall(text)) >= 2  # the layers' scan, rounds


def test_dynamic_control_flow_lowers_with_what_static_avoids(on_gpu, tmp_path):
    """What the checks above would see otherwise: `control_flow="dynamic"` (the CPU default) runs the decode
    rounds as a loop bound by data and the sampler's passes under conditionals."""
    build("qwen3", tmp_path)
    engine = load_engine(tmp_path, EngineConfig(max_slots=4, page_size=16, max_model_len=128, prefill_chunk=32,
                                                attention_backend="pallas", control_flow="dynamic"))
    runner = engine.executor.runner
    decode = next(layout for layout in runner._shapes([None], scored=(False,)) if not layout.shape("prefill_tokens"))
    text = runner.lower(decode, ("cuda",)).as_text()
    assert data_bound_loops(text) >= 1 and "stablehlo.case" in text
