"""fp8 checkpoints (quant_method "fp8": float8_e4m3fn projections with block scales, as Qwen3's and DeepSeek's -FP8
releases; and llm-compressor's compressed-tensors, vLLM's -FP8 and -FP8-dynamic) and `--quantization fp8`: what
config.json says is read or refused by name, weights stay one byte each on their shards, and the model computes
with exactly the weights transformers dequantizes (test_model_parity.py's FP8_FAMILIES compare logits and greedy
tokens with transformers' model of the same files; test_mesh_variants.py shards one)."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import build, compress_fp8, quantize_fp8, random_prompts, scored_in_chunks
from jaxinfer.config import ConfigError, EngineConfig, ModelConfig, WeightQuant
from jaxinfer.llm import LLM, SamplingParams
from jaxinfer.model import checkpoint
from jaxinfer.model.checkpoint import CheckpointError, find_model, load_config, load_params
from jaxinfer.model.transformer import dequantized
from jaxinfer.model.weights import FP8, FP8_MAX, init_params, param_count, weight_table

FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}


def _llama(**quantization) -> ModelConfig:
    hf = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "quantization_config": {**FP8_CONFIG, **quantization}}
    return ModelConfig.from_hf(hf)


def test_the_fp8_config_is_read():
    assert _llama().weight_quant == WeightQuant((16, 16), ())
    assert _llama(weight_block_size=None, modules_to_not_convert=["lm_head"]).weight_quant == \
        WeightQuant((None, None), ("lm_head",))
    assert _llama(ignored_layers=["model.layers.0.mlp"]).weight_quant.skip == ("model.layers.0.mlp",)  # MiniMax's
    cfg = _llama(modules_to_not_convert=["lm_head"])
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def _compressed(**weights) -> dict:
    """A compressed-tensors quantization_config as llm-compressor writes it (FP8-dynamic: per channel)."""
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel", **weights}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme, "input_activations": {
                "num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}}},
            "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None}


@pytest.mark.parametrize("weights, block", [
    (dict(strategy="channel"), (1, None)), (dict(strategy="tensor"), (None, None)),
    (dict(strategy="block", block_structure=[128, 128]), (128, 128))])
def test_compressed_tensors_fp8_configs_are_read(weights, block):
    hf = _llama().to_hf()
    hf["quantization_config"] = _compressed(**weights)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.weight_quant == WeightQuant(block, ("lm_head", ".*mlp.gate$"), "compressed-tensors", False)
    assert cfg.weight_quant.scale_key == "weight_scale"
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    static = _compressed(**weights)
    static["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor")
    hf["quantization_config"] = static
    assert ModelConfig.from_hf(hf).weight_quant.input_scales


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(format="pack-quantized"), "format 'pack-quantized'"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status 'frozen'"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (lambda q: q["config_groups"].update(group_1=q["config_groups"]["group_0"]), "one config group"),
    (lambda q: q["config_groups"]["group_0"].update(targets=["re:.*mlp.*"]), "targets are"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="int"), "static, symmetric 8-bit floats"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4), "static, symmetric 8-bit floats"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(dynamic=True), "static, symmetric 8-bit floats"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group"), "per tensor, channel or block"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="block"), "block_structure must be"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(type="int"), "input_activations"),
    (lambda q: q["config_groups"]["group_0"].update(output_activations={"num_bits": 8}), "output_activations"),
])
def test_compressed_tensors_variants_we_cannot_read_are_refused_by_name(edit, message):
    hf, quantization = _llama().to_hf(), _compressed()
    edit(quantization)
    hf["quantization_config"] = quantization
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf)


def test_compressed_tensors_blocks_over_fused_tensors_match_transformers(tmp_path):
    """compressed-tensors' block strategy on Phi-3's fused q/k/v and gate/up tensors (k and v share blocks):
    prompt logits equal those of transformers' model dequantized by the compressed-tensors library."""
    build("phi3", tmp_path)
    model = compress_fp8(tmp_path, "block", (64, 16))
    llm = LLM(tmp_path, EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, dtype="float32"))
    assert llm.model_config.weight_quant.block == (64, 16)
    prompt = np.asarray(random_prompts(256, [40])[0], np.int32)
    with torch.no_grad():
        ref = model(torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(scored_in_chunks(llm, prompt, 16), ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("change, message", [
    (dict(activation_scheme="static"), "activation_scheme='static'"),
    (dict(scale_fmt="ue8m0"), "scale_fmt='ue8m0'"),
    (dict(expert_dtype="fp4"), "expert_dtype='fp4'"),
    (dict(modules_to_convert=["model.embed_tokens"]), "modules_to_convert"),
    (dict(weight_block_size=[128]), "two positive integers"),
    (dict(weight_block_size=[0, 128]), "two positive integers"),
    (dict(quant_method="bitsandbytes"), "quant_method 'bitsandbytes' are not supported"),
])
def test_fp8_variants_we_cannot_read_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        _llama(**change)


def test_the_table_keeps_projections_in_fp8_with_scales_in_our_layout():
    specs = {spec.name: spec for spec in weight_table(_llama(modules_to_not_convert=["lm_head", "v_proj"]))}
    fp8 = {name for name, spec in specs.items() if spec.dtype == FP8}
    assert fp8 == {f"layers.{n}" for n in ("wq", "wk", "wo", "w_gate", "w_up", "w_down")}  # v_proj skipped
    assert specs["embed"].dtype is None and specs["lm_head"].dtype is None and "layers.wv_scale" not in specs
    # One scale per out element and 16 in rows: wq [D, N, H] -> [D / 16, N, H]; wo [N, H, D] -> [N H / 16, D].
    assert (specs["layers.wq_scale"].shape, specs["layers.wq_scale"].axes) == \
        ((4, 4, 16), ("in_blocks", "heads", "head_dim"))
    assert (specs["layers.wo_scale"].shape, specs["layers.wo_scale"].hf_shape) == ((4, 64), (4, 4))
    assert specs["layers.w_down_scale"].shape == (8, 64)
    assert param_count(_llama()) == param_count(dataclasses.replace(_llama(), weight_quant=None))


def test_a_skip_list_naming_some_layers_only_or_a_ragged_in_dim_is_refused():
    with pytest.raises(ConfigError, match="some layers' wq in fp8 and others not"):
        weight_table(_llama(modules_to_not_convert=["model.layers.1.self_attn.q_proj"]))
    with pytest.raises(ConfigError, match="has 64 input columns, not a multiple of the fp8 block's 48"):
        weight_table(_llama(weight_block_size=[16, 48]))


def _quantize_ragged(w: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight [out, in] quantized with blocks whose rows do not divide `out` (the last block is short), as
    DeepSeek's format allows and transformers' quantizer does not write."""
    out, inp = w.shape
    scales = np.ones((math.ceil(out / rows), inp // cols), np.float32)
    values = np.zeros_like(w, dtype=ml_dtypes.float8_e4m3fn)
    for r in range(scales.shape[0]):
        for c in range(scales.shape[1]):
            block = w[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols]
            scales[r, c] = np.abs(block).max() / FP8_MAX
            values[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols] = (block / scales[r, c]).astype(values.dtype)
    return values, scales


def test_every_weight_dequantizes_to_the_checkpoints_values_with_ragged_blocks(tmp_path):
    """Blocks of 24 rows (q/k/v fused in Phi-3's qkv_proj, 128 rows: the last block is 8 rows, and blocks straddle
    q, k and v): each layer's weights as the forward pass sees them equal value x scale computed here in numpy."""
    build("phi3", tmp_path)
    tensors, expected = load_file(tmp_path / "model.safetensors"), {}
    for key in list(tensors):
        if key.endswith("proj.weight"):
            values, scales = _quantize_ragged(tensors[key].numpy(), 24, 16)
            expected[key] = values.astype(np.float32) * np.repeat(np.repeat(scales, 24, 0)[:values.shape[0]], 16, 1)
            tensors[key] = torch.from_numpy(values.view(np.uint8)).view(torch.float8_e4m3fn)
            tensors[key.replace(".weight", ".weight_scale_inv")] = torch.from_numpy(scales)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {**FP8_CONFIG, "weight_block_size": [24, 16]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    source = find_model(tmp_path)
    cfg = load_config(source)
    params = load_params(source, cfg, "float32", None)
    assert params["layers"]["wq"].dtype == jnp.uint8 and params["layers"]["wq_scale"].dtype == jnp.float32  # fp8 bits
    N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    for i in range(cfg.num_layers):
        layer = dequantized(jax.tree.map(lambda x: x[i], params["layers"]), cfg, jnp.float32)
        qkv = expected[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        ours = {"wq": qkv[:N * H].T.reshape(D, N, H), "wk": qkv[N * H:(N + K) * H].T.reshape(D, K, H),
                "wv": qkv[(N + K) * H:].T.reshape(D, K, H),
                "wo": expected[f"model.layers.{i}.self_attn.o_proj.weight"].T.reshape(N, H, D),
                "w_down": expected[f"model.layers.{i}.mlp.down_proj.weight"].T}
        gate_up = expected[f"model.layers.{i}.mlp.gate_up_proj.weight"]
        ours["w_gate"], ours["w_up"] = np.split(gate_up.T, 2, axis=1)
        for name, want in ours.items():
            np.testing.assert_array_equal(np.asarray(layer[name]), want, err_msg=f"layer {i} {name}")


def test_weights_take_about_half_the_bytes_of_bfloat16(tmp_path):
    build("llama3", tmp_path / "bf16", dtype=torch.bfloat16,
          config=dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4))
    shutil.copytree(tmp_path / "bf16", tmp_path / "fp8")
    quantize_fp8(tmp_path / "fp8", (128, 128))

    def projection_bytes(directory):
        source = find_model(directory)
        params = load_params(source, load_config(source), "bfloat16", None)["layers"]
        return sum(x.nbytes for name, x in params.items() if name.startswith("w"))

    ratio = projection_bytes(tmp_path / "fp8") / projection_bytes(tmp_path / "bf16")
    assert 0.5 < ratio < 0.5 * (1 + 4 / 128 * 1.01)  # one byte a weight, plus one float32 per 128 in rows


def test_a_projection_the_config_quantizes_but_the_checkpoint_does_not_is_named(tmp_path):
    build("llama3", tmp_path)
    quantize_fp8(tmp_path, (16, 16), skip=("lm_head", "v_proj"))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["lm_head"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    source = find_model(tmp_path)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.v_proj.weight' is F32, but config.json's "
                                              r"quantization_config makes it an fp8 weight.*modules_to_not_convert"):
        load_params(source, load_config(source), "float32", None)


def test_random_fp8_weights_are_quantized_draws():
    """A config .json alone gives random weights: an fp8 model's are the unquantized model's draws, quantized
    (each block's largest magnitude is fp8's largest, so nothing is lost to the range)."""
    cfg = _llama()
    plain = init_params(dataclasses.replace(cfg, weight_quant=None), jnp.float32, seed=3)["layers"]
    quant = init_params(cfg, jnp.float32, seed=3)["layers"]
    for name in ("wq", "wo", "w_down"):
        assert quant[name].dtype == jnp.uint8  # the bits of float8_e4m3fn values
        scale = quant[name + "_scale"]  # [L, in / 16, out...]
        values = np.abs(np.asarray(quant[name]).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
        values = values.reshape(*scale.shape[:2], 16, *scale.shape[2:])
        np.testing.assert_array_equal(values.max(axis=2), FP8_MAX)
    for i in range(cfg.num_layers):
        layer = dequantized(jax.tree.map(lambda x: x[i], quant), cfg, jnp.float32)
        for name in ("wq", "wk", "w_up"):
            want = np.asarray(plain[name][i])
            np.testing.assert_allclose(np.asarray(layer[name]), want, rtol=2**-4, atol=np.abs(want).max() * 2**-9)


def test_converted_to_orbax_and_served_in_another_dtype(tmp_path):
    """`jaxinfer convert` keeps the fp8 weights and their float32 scales whatever --dtype says (bfloat16 here), and
    loading it as float32 gives the weights the safetensors give: the same greedy tokens."""
    from jaxinfer import cli
    build("llama3", tmp_path / "hf")
    quantize_fp8(tmp_path / "hf", (16, 16))
    assert cli.main(["convert", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "conv"),
                     "--dtype", "bfloat16"]) == 0
    (hf_cfg, hf), (conv_cfg, conv) = (
        (cfg, load_params(source, cfg, "float32", None))
        for source in (find_model(tmp_path / "hf"), find_model(tmp_path / "conv")) for cfg in [load_config(source)])
    assert conv_cfg == hf_cfg
    for name in ("wq", "wq_scale", "w_down", "w_down_scale"):
        assert conv["layers"][name].dtype == hf["layers"][name].dtype
        np.testing.assert_array_equal(np.asarray(conv["layers"][name], np.float32),
                                      np.asarray(hf["layers"][name], np.float32))
    engine = EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, max_model_len=64, dtype="float32")
    prompts = random_prompts(256, [9, 17])
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    runs = [[o.outputs[0].token_ids for o in LLM(path, engine).generate(prompts, greedy, use_tqdm=False)]
            for path in (tmp_path / "hf", tmp_path / "conv")]
    assert runs[0] == runs[1]


def test_fp8_weights_are_not_written_back_as_safetensors(tmp_path):
    build("llama3", tmp_path / "hf")
    quantize_fp8(tmp_path / "hf", (16, 16))
    source = find_model(tmp_path / "hf")
    cfg = load_config(source)
    with pytest.raises(CheckpointError, match="fp8 weights are not written back"):
        checkpoint.save_safetensors(load_params(source, cfg, "float32", None), cfg, tmp_path / "hf", tmp_path / "out")


@pytest.mark.parametrize("family, block_in", [("llama3", 64), ("qwen3_moe", 16)])
def test_quantization_fp8_writes_the_values_transformers_quantizer_writes(tmp_path, family, block_in):
    """vLLM's `--quantization fp8` on a float32 checkpoint: every projection (an MoE's experts too) holds the fp8
    values (and, to the last bit, scales) transformers' quantizer writes for blocks of one out row by `block_in`
    in columns (the largest power of two to 128 dividing every in dim: 64 and 128 here; the experts' 48 too);
    routers, norms and embeddings are untouched."""
    build(family, tmp_path / "plain")
    shutil.copytree(tmp_path / "plain", tmp_path / "fp8")
    quantize_fp8(tmp_path / "fp8", (1, block_in))
    engine = EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, max_model_len=64, dtype="float32")
    online = LLM(tmp_path / "plain", dataclasses.replace(engine, quantization="fp8"))
    stored = LLM(tmp_path / "fp8", engine)
    assert online.model_config.weight_quant == WeightQuant((1, block_in), ("lm_head",))
    ours, theirs = online.runner.params, stored.runner.params
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(theirs)):
        assert a.dtype == b.dtype, path
        # XLA's 1 / (448 / amax) may differ from torch's in the last bit: scales to 2 ulp, values exactly.
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=str(path),
                                   rtol=2.5e-7 if "_scale" in str(path) else 0, atol=0)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = random_prompts(256, [5, 17])
    assert [o.outputs[0].token_ids for o in online.generate(prompts, greedy, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in stored.generate(prompts, greedy, use_tqdm=False)]


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ConfigError, match="quantization 'int4' is not one of None, fp8"):
        EngineConfig(quantization="int4")


def test_a_step_holds_no_widened_copy_of_the_fp8_weights():
    """The compiled decode step's scratch memory is the unquantized model's: each layer's weights widen inside the
    layer scan (held as fp8 values, XLA:CPU converted all layers' stacked weights to float16 before the scan, a
    copy of twice their bytes)."""
    engine = EngineConfig(max_slots=4, max_model_len=64, num_pages=20, dtype="float32")
    temp = {}
    for quantization in (None, "fp8"):
        llm = LLM(None, dataclasses.replace(engine, quantization=quantization))
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
        temp[quantization] = max(llm.runner._executable(layout).memory_analysis().temp_size_in_bytes
                                 for layout in llm.runner.layouts)  # the steps it compiled
        fp8_bytes = sum(x.nbytes for name, x in llm.runner.params["layers"].items() if x.dtype == jnp.uint8)
    assert fp8_bytes > 3e6  # the default model's projections: a float16 copy would be over 6 MB
    assert temp["fp8"] < temp[None] + fp8_bytes / 4


def test_convert_with_quantization_fp8_restores_what_quantizing_at_load_gives(tmp_path):
    """`jaxinfer convert -q fp8`: the orbax output holds the fp8 projections and names them in its config.json,
    so serving it restores the same weights `--quantization fp8` makes from the original at load."""
    from jaxinfer import cli
    build("llama3", tmp_path / "hf")
    assert cli.main(["convert", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "conv"),
                     "--dtype", "float32", "-q", "fp8"]) == 0
    assert json.loads((tmp_path / "conv" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    engine = EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, max_model_len=64, dtype="float32")
    converted = LLM(tmp_path / "conv", engine)
    at_load = LLM(tmp_path / "hf", dataclasses.replace(engine, quantization="fp8"))
    assert converted.model_config.weight_quant == at_load.model_config.weight_quant
    for a, b in zip(jax.tree.leaves(converted.runner.params), jax.tree.leaves(at_load.runner.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
