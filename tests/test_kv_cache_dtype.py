"""A KV cache narrower than the model (vLLM's `kv_cache_dtype`): bfloat16 and fp8 pools under a float32 model.

The reference is transformers with the keys and values it caches rounded to the same format by torch (and
clamped to fp8's range first, as vLLM's saturating cast and ours do): our prompt logits and greedy tokens must
equal what that model computes, not merely come near the unrounded model."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicLayer

from hf_models import build, random_prompts, scored_in_chunks
from jaxinfer.config import ConfigError, EngineConfig, ModelConfig
from jaxinfer.llm import LLM, SamplingParams
from pallas_kernels.kv_storage import BITS, storage_dtype, stored, value_format

PAGE, CHUNK = 8, 16
FORMATS = {"bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
PROMPT_LENGTHS = (1, 9, 17, 40)  # one token; one past a page; one past a chunk; three chunks


def _rounded(x: torch.Tensor, fmt) -> torch.Tensor:
    if fmt.itemsize == 1:
        top = torch.finfo(fmt).max
        x = x.clamp(-top, top)
    return x.to(fmt).to(x.dtype)


@contextlib.contextmanager
def transformers_kv_rounded_to(fmt):
    """transformers' dynamic cache storing (and its attention reading) keys and values rounded to `fmt`."""
    original, calls = DynamicLayer.update, []

    def update(self, key_states, value_states, *args, **kwargs):
        calls.append(key_states.shape)
        return original(self, _rounded(key_states, fmt), _rounded(value_states, fmt), *args, **kwargs)

    DynamicLayer.update = update
    try:
        yield calls
    finally:
        DynamicLayer.update = original


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama3")
    return directory, build("llama3", directory)


@pytest.fixture(scope="module", params=list(FORMATS))
def narrow(request, checkpoint):
    directory, model = checkpoint
    engine = EngineConfig(max_slots=3, page_size=PAGE, prefill_chunk=CHUNK, dtype="float32",
                          kv_cache_dtype=request.param)
    return request.param, model, LLM(directory, engine)


def test_prompt_logits_equal_transformers_with_the_same_rounding(narrow):
    name, model, llm = narrow
    storage = llm.runner.kv.k.dtype  # on the CPU bfloat16 and fp8 values are held as their bits
    assert storage in BITS and value_format(storage) == jnp.dtype(llm.engine_config.kv_format)
    prompt = np.asarray(random_prompts(llm.model_config.vocab_size, PROMPT_LENGTHS)[-1], np.int32)
    ours = scored_in_chunks(llm, prompt, CHUNK)
    tokens = torch.tensor(prompt[None], dtype=torch.long)
    with torch.no_grad():
        exact = model(tokens).logits[0].numpy()
        with transformers_kv_rounded_to(FORMATS[name]) as calls:
            rounded = model(tokens).logits[0].numpy()
    assert calls, "transformers' cache was not used"
    rounding = np.abs(rounded - exact).max()
    assert rounding > 1e-3, f"{name}: rounding the cache should move the logits"
    np.testing.assert_allclose(ours, rounded, atol=2e-4, rtol=0, err_msg=name)


def test_greedy_tokens_equal_transformers_with_the_same_rounding(narrow):
    name, model, llm = narrow
    prompts = random_prompts(llm.model_config.vocab_size, PROMPT_LENGTHS)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), use_tqdm=False)
    with torch.no_grad(), transformers_kv_rounded_to(FORMATS[name]):
        for prompt, out in zip(prompts, outputs):
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                                 min_new_tokens=24)[0, len(prompt):].tolist()
            assert out.outputs[0].token_ids == ref, f"{name}, prompt of {len(prompt)} tokens"
    llm.engine.check_idle()


def test_fp8_saturates_instead_of_overflowing_to_nan():
    x = jnp.asarray([1e6, -1e6, 500.0, 0.3], jnp.float32)
    for fmt, expected in ((jnp.float8_e4m3fn, [448, -448, 448, 0.3125]),
                          (jnp.float8_e5m2, [57344, -57344, 512, 0.3125])):
        for platform in ("cpu", "gpu"):  # held as bits on both
            storage = storage_dtype(fmt, platform)
            assert storage in BITS
            assert value_format(storage) == jnp.dtype(fmt)
            held = stored(x, storage)
            np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(held, fmt), np.float32), expected)
    assert stored(x, jnp.float16)[0] == jnp.inf  # wider formats keep their own cast, as vLLM's
    assert storage_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16 and storage_dtype(jnp.bfloat16, "cpu") == jnp.uint16


def test_kv_cache_dtype_resolves_and_sizes_the_pool():
    model = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    resolve = lambda **kw: EngineConfig(max_model_len=64, **kw).resolve(model, "cpu")  # noqa: E731
    assert resolve().kv_cache_dtype == "float32"
    assert resolve(dtype="bfloat16").kv_cache_dtype == "bfloat16"
    assert resolve(kv_cache_dtype="fp8").kv_cache_dtype == "fp8_e4m3"
    assert resolve(kv_cache_dtype="fp8").kv_format == "float8_e4m3fn"
    assert resolve(kv_cache_dtype="fp8_e5m2").kv_format == "float8_e5m2"
    per_page = {kv: resolve(kv_cache_dtype=kv).kv_bytes_per_page(model) for kv in ("auto", "bfloat16", "fp8")}
    assert per_page == {"auto": 2 * 2 * 2 * 16 * 16 * 4, "bfloat16": 2 * 2 * 2 * 16 * 16 * 2,
                        "fp8": 2 * 2 * 2 * 16 * 16}
    assert EngineConfig(kv_cache_dtype="fp8").kv_bytes_per_page(model) == per_page["fp8"]  # before resolve()
    pages = {kv: resolve(kv_cache_dtype=kv).with_kv_budget(model, 1 << 20).num_pages for kv in ("auto", "fp8")}
    assert pages["fp8"] == 4 * pages["auto"]
    with pytest.raises(ConfigError, match="kv_cache_dtype 'int8' is not one of auto, fp8, float32"):
        EngineConfig(kv_cache_dtype="int8")


def test_fp8_pool_engine_is_batch_invariant_and_returns_every_page(checkpoint):
    """Rounding happens where a token's KV is written, the same whatever shares the step: greedy tokens alone
    equal those in a batch that preempts (a pool too small for the load), and every page comes back."""
    directory, _ = checkpoint
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = random_prompts(256, PROMPT_LENGTHS) * 2
    engine = EngineConfig(max_slots=4, page_size=PAGE, prefill_chunk=CHUNK, dtype="float32", kv_cache_dtype="fp8",
                          max_model_len=64, num_pages=12)
    llm = LLM(directory, engine)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:4]]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert together == alone * 2
    assert llm.engine.stats().preemptions > 0
    llm.engine.check_idle()


def test_the_commands_take_vllms_flag(monkeypatch):
    from jaxinfer import cli
    from jaxinfer.server import run
    seen = {}
    monkeypatch.setattr(run, "serve", lambda model, engine, *args, **kwargs: seen.setdefault("serve", engine) and 0)
    assert cli.main(["serve", "--kv-cache-dtype", "fp8", "--skip-warmup"]) == 0
    assert seen["serve"].kv_cache_dtype == "fp8"
    for command in (["serve"], ["bench", "offline"], ["eval", "perplexity", "--input", "x"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(command + ["--kv-cache-dtype", "int8"])
        args = cli.build_parser().parse_args(command + ["--kv-cache-dtype", "fp8_e5m2"])
        assert args.kv_cache_dtype == "fp8_e5m2"
