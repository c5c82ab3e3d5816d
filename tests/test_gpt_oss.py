"""gpt-oss beyond the parity suite's float checkpoint (tests/test_model_parity.py): its MXFP4 experts, as the Hub
ships them and held so, against transformers' own dequantization of the same files; writing the weights back;
refusals."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_models import build, random_prompts, scored_in_chunks
from jaxinfer.config import ConfigError, EngineConfig, ModelConfig
from jaxinfer.llm import LLM, SamplingParams
from jaxinfer.model.checkpoint import find_model, load_config, load_params
from jaxinfer.model.safetensors_io import CheckpointError
from jaxinfer.model.weights import load_safetensors, param_count, to_hf_tensors
from jaxinfer.sharding import mesh_problems

MXFP4_CONFIG = {"intermediate_size": 64}  # MXFP4 blocks of 32 along every expert input (64 and 64)


def _to_mxfp4(directory, seed: int = 0) -> None:
    """Replace the checkpoint's expert weights by random MXFP4 blocks and scales (any bytes are valid codes; scales
    near 2**-4 keep the weights about the float model's size), and say so in config.json, as the Hub's files do."""
    rng = np.random.RandomState(seed)
    tensors = load_file(directory / "model.safetensors")
    for key in [k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))]:
        experts, inputs, outputs = tensors.pop(key).shape
        tensors[key + "_blocks"] = torch.from_numpy(rng.randint(0, 256, (experts, outputs, inputs // 32, 16),
                                                                dtype=np.uint8))
        tensors[key + "_scales"] = torch.from_numpy(rng.randint(121, 125, (experts, outputs, inputs // 32),
                                                                dtype=np.uint8))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    build("gpt_oss", directory, config=MXFP4_CONFIG)
    _to_mxfp4(directory)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    return directory, reference


def test_mxfp4_experts_match_transformers_dequantized(mxfp4):
    """Prompt logits and greedy tokens against transformers' model of the same MXFP4 files, which it dequantizes
    itself (its Mxfp4Config(dequantize=True)): the block layout, the nibble order, the scale bias and the
    transpose are all theirs to get right."""
    directory, reference = mxfp4
    llm = LLM(directory, EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, max_model_len=64, dtype="float32"))
    assert llm.model_config.mxfp4
    prompts = random_prompts(llm.model_config.vocab_size, (5, 29))
    with torch.no_grad():
        ref = reference(torch.tensor([prompts[-1]])).logits[0].numpy()
    np.testing.assert_allclose(scored_in_chunks(llm, np.asarray(prompts[-1], np.int32), 16), ref, atol=2e-4, rtol=0)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                          min_new_tokens=12)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected


def test_mxfp4_experts_stay_four_bit(mxfp4):
    """The experts are held as their bytes (half a byte a weight, an exponent byte per block of 32), not widened
    at load: the layer scan widens them."""
    directory, _ = mxfp4
    llm = LLM(directory, EngineConfig(max_slots=1, page_size=8, max_model_len=32, dtype="float32"))
    layers = llm.engine.executor.runner.params["layers"]
    cfg = llm.model_config
    X, D, F, L = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    assert layers["w_gate"].dtype == jnp.uint8 and layers["w_gate"].shape == (L, X, D // 32, 16, F)
    assert layers["w_down"].shape == (L, X, F // 32, 16, D) and layers["w_down_exponent"].shape == (L, X, F // 32, D)
    assert param_count(cfg) == param_count(dataclasses.replace(cfg, mxfp4=False))


def test_mxfp4_converts_to_orbax_as_stored(mxfp4, tmp_path):
    """`jaxinfer convert` keeps the MXFP4 bytes (its config.json says so), and they load back equal."""
    from jaxinfer import cli
    directory, _ = mxfp4
    assert cli.main(["convert", "--model", str(directory), "--output", str(tmp_path / "conv"),
                     "--dtype", "bfloat16"]) == 0
    (cfg, params), (conv_cfg, conv) = ((cfg, load_params(source, cfg, "float32", None))
                                       for source in (find_model(directory), find_model(tmp_path / "conv"))
                                       for cfg in [load_config(source)])
    assert conv_cfg == cfg and cfg.mxfp4
    for name in ("w_gate", "w_gate_exponent", "w_down", "w_down_exponent"):
        assert conv["layers"][name].dtype == jnp.uint8
        np.testing.assert_array_equal(conv["layers"][name], params["layers"][name])


def test_weights_write_back_as_the_checkpoint_has_them(tmp_path):
    """Interleaved gate and up columns, biases of every expert, sinks: our tensors written back equal the
    checkpoint's, key for key."""
    build("gpt_oss", tmp_path)
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    written = to_hf_tensors(load_safetensors(tmp_path, cfg, np.float32), cfg)
    original = {key: value.numpy() for key, value in load_file(tmp_path / "model.safetensors").items()}
    assert written.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="MXFP4 checkpoints are supported for gpt_oss"):
        ModelConfig.from_hf({**_llama(), "quantization_config": {"quant_method": "mxfp4"}})
    build("gpt_oss", tmp_path)
    with pytest.raises(ConfigError, match="experts in one tensor"):
        LLM(tmp_path, EngineConfig(max_slots=1, page_size=8, max_model_len=32, dtype="float32", quantization="fp8"))
    packed = tmp_path / "packed"
    build("gpt_oss", packed, config=MXFP4_CONFIG)
    _to_mxfp4(packed)
    tensors = load_file(packed / "model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj_blocks"
    tensors[key] = tensors[key].to(torch.int16)
    save_file(tensors, packed / "model.safetensors")
    with pytest.raises(CheckpointError, match="blocks and scales are U8"):
        LLM(packed, EngineConfig(max_slots=1, page_size=8, max_model_len=32, dtype="float32"))
    cfg = ModelConfig.from_json(packed / "config.json")
    with pytest.raises(CheckpointError, match="MXFP4 weights are not written back"):
        to_hf_tensors({}, cfg)
    assert "intermediate_size=64 makes 2 MXFP4 blocks of 32, not a multiple of the 'model' axis (4)" in \
        mesh_problems((1, 4), heads=4, kv_heads=2, mlp=64, vocab=256, slots=4, pages=None, devices=4, mlp_blocks=2)


def _llama() -> dict:
    return dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64)
