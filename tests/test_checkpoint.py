"""Configs, the weight table, loading (strict, sharded, any dtype), saving and orbax conversion."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_models import build
from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.model.checkpoint import CheckpointError, find_model, load_config, load_params, save_orbax, save_safetensors
from jaxinfer.model.transformer import Batch, KVPool, forward, logits
from jaxinfer.model.weights import init_params, param_count, to_hf_tensors

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Parameter counts as published on the models' Hugging Face pages (safetensors metadata).
PUBLISHED_PARAMS = {
    "gemma-2-9b": 9_241_705_984,
    "gemma-3-1b": 999_885_952,
    "gpt-oss-20b": 20_914_757_184,  # the model card's 20.91B (HF's metadata counts its MXFP4 bytes, not values)
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "mistral-7b-v0.3": 7_248_023_552,
    "mixtral-8x7b": 46_702_792_704,
    "phi-4": 14_659_507_200,
    "qwen1.5-moe-a2.7b": 14_315_784_192,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_have_published_sizes(name):
    cfg = ModelConfig.from_json(CONFIGS / f"{name}.json")
    abstract = jax.eval_shape(lambda: init_params(cfg, jnp.bfloat16))  # allocates nothing
    assert sum(x.size for x in jax.tree.leaves(abstract)) == param_count(cfg) == PUBLISHED_PARAMS[name]


def test_every_preset_is_checked():
    assert {p.stem for p in CONFIGS.glob("*.json")} == set(PUBLISHED_PARAMS)


def _llama_hf(**changes):
    hf = json.loads((CONFIGS / "smollm2-135m.json").read_text())
    hf.update(changes)
    return hf


def test_unknown_model_type_names_it_and_lists_supported():
    with pytest.raises(ConfigError, match=r"'gpt2'.*llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf(_llama_hf(model_type="gpt2"))


def test_missing_field_is_named():
    hf = _llama_hf()
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="missing required field 'hidden_size'"):
        ModelConfig.from_hf(hf)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ConfigError, match="unsupported rope scaling type 'dynamic'.*linear, llama3, yarn, longrope"):
        ModelConfig.from_hf(_llama_hf(rope_scaling={"rope_type": "dynamic", "factor": 4.0}))


def test_rope_scaling_in_both_config_spellings():
    old = ModelConfig.from_hf(json.loads((CONFIGS / "llama-3.1-8b.json").read_text()))
    hf = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    hf["rope_parameters"] = {**hf.pop("rope_scaling"), "rope_theta": hf.pop("rope_theta")}
    assert ModelConfig.from_hf(hf) == old
    assert old.rope.kind == "llama3" and old.rope.factor == 8.0 and old.rope.theta == 500000.0


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    build("llama3", directory)
    return directory


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def _load(directory):
    source = find_model(directory)
    return load_params(source, load_config(source), "float32", None)


def test_missing_tensor_is_named(llama_dir, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    bad = _broken_copy(llama_dir, tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        _load(bad)


def test_wrong_shape_is_named(llama_dir, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight"
    bad = _broken_copy(llama_dir, tmp_path / "m", lambda t: t.__setitem__(key, torch.zeros(8, 64)))
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(8, 64\), expected \(32, 64\)"):
        _load(bad)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    key = "model.layers.2.mlp.up_proj.weight"  # a third layer the config does not have
    bad = _broken_copy(llama_dir, tmp_path / "m", lambda t: t.__setitem__(key, torch.zeros(128, 64)))
    with pytest.raises(CheckpointError, match=f"unexpected tensor.*'{key}'"):
        _load(bad)


def test_corrupt_file_is_reported(llama_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(llama_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(bad)


def test_garbage_header_is_reported(llama_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(llama_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        _load(bad)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        find_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_precision_checkpoint_loads_exactly(tmp_path, dtype):
    model = build("qwen3", tmp_path, dtype=dtype, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg = load_config(find_model(tmp_path))
    ours = to_hf_tensors(_load(tmp_path), cfg)
    reference = {k: v.to(dtype).float().numpy() for k, v in model.state_dict().items()}
    assert not cfg.tie_word_embeddings and set(ours) == set(reference)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)


def _our_logits(params, cfg, tokens):
    T = len(tokens)
    kv = KVPool(*(jnp.zeros((cfg.num_layers, cfg.num_kv_heads, 3, 16, cfg.head_dim)) for _ in range(2)))
    batch = Batch(jnp.asarray([tokens]), jnp.arange(T)[None], jnp.asarray([[[1, 2]]]))
    h, _ = forward(params, cfg, batch, kv)
    return np.asarray(logits(params, cfg, h))[0]


@pytest.mark.parametrize("preset, overrides", [
    ("qwen3-0.6b", {}),
    ("phi-4", {}),  # fused qkv_proj and gate_up_proj tensors, written back whole
    ("mixtral-8x7b", {"num_local_experts": 4}),
    ("qwen1.5-moe-a2.7b", {"num_experts": 5, "moe_intermediate_size": 40, "shared_expert_intermediate_size": 72}),
    ("qwen3-30b-a3b", {"num_experts": 10, "moe_intermediate_size": 40}),
    # the 7 tokens reach past a window of 4 in the sliding layers; Gemma 3's are every other one here
    ("gemma-2-9b", {"sliding_window": 4}),
    ("gemma-3-1b", {"sliding_window": 4, "sliding_window_pattern": 2}),
    # interleaved gate and up columns, biases on every expert, sinks; a window of 4 on the first of two layers
    ("gpt-oss-20b", {"num_local_experts": 4, "sliding_window": 4, "layer_types": ["sliding_attention",
                                                                               "full_attention"]}),
])
def test_saved_weights_load_in_transformers(tmp_path, preset, overrides):
    """Our random init written in HF layout gives HF the same logits: the table's layouts hold both ways
    (per-expert and fused tensors included)."""
    source = find_model(CONFIGS / f"{preset}.json")
    cfg = ModelConfig.from_hf({**json.loads(source.config_path.read_text()), "hidden_size": 64,
                               "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, **overrides})
    params = init_params(cfg, jnp.float32, seed=3)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg.to_hf()))
    save_safetensors(params, cfg, tmp_path / "src", tmp_path / "out", max_shard_bytes=50_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = [5, 17, 99, 3, 64, 120, 7]
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(_our_logits(params, cfg, tokens), ref, atol=1e-4, rtol=0)


def test_orbax_conversion_round_trips(llama_dir, tmp_path):
    source = find_model(llama_dir)
    cfg = load_config(source)
    params = _load(llama_dir)
    save_orbax(params, "float32", llama_dir, tmp_path / "conv")
    restored = load_params(find_model(tmp_path / "conv"), cfg, "float32", None)
    jax.tree.map(np.testing.assert_array_equal, params, restored)
    assert load_config(find_model(tmp_path / "conv")) == cfg
