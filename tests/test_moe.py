"""Mixtures of experts (Mixtral, Qwen1.5/2-MoE, Qwen3-MoE): config mapping against transformers' config classes,
the router against a numpy reference, strict per-expert loading, the engine's batch invariance. Logits and greedy
tokens against transformers are tests/test_model_parity.py's (the families are in tests/hf_models.py); sharding
is test_mesh_variants.py's."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.torch import load_file, save_file

from hf_models import COMMON, FAMILIES, build, random_prompts
from jaxinfer.config import ConfigError, EngineConfig, ModelConfig
from jaxinfer.llm import LLM, SamplingParams
from jaxinfer.model.checkpoint import CheckpointError, find_model, load_config, load_params
from jaxinfer.model.transformer import expert_weights
from jaxinfer.sharding import mesh_problems


def _saved(tmp_path, family, **overrides) -> dict:
    config_cls, extra = FAMILIES[family]
    config_cls(**{**COMMON, **extra, **overrides}).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def _saved_dict(family: str) -> dict:
    config_cls, extra = FAMILIES[family]
    return config_cls(**{**COMMON, **extra}).to_dict()


def _theirs(hf: dict) -> tuple:
    """(experts, per token, renormalised, width, shared width) as transformers' modeling code reads them."""
    c = transformers.AutoConfig.for_model(**hf)
    if hf["model_type"] == "mixtral":
        return c.num_local_experts, c.num_experts_per_tok, True, c.intermediate_size, 0
    width = c.intermediate_size if hf["model_type"] == "olmoe" else c.moe_intermediate_size
    return (c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, width,
            getattr(c, "shared_expert_intermediate_size", 0))


def _ours(hf: dict) -> tuple:
    m = ModelConfig.from_hf(hf)
    return m.num_experts, m.experts_per_token, m.norm_topk_prob, m.intermediate_size, m.shared_expert_size


@pytest.mark.parametrize("family, overrides", [
    ("mixtral", {}),
    ("mixtral", dict(num_local_experts=8, num_experts_per_tok=1)),
    ("qwen2_moe", {}),
    ("qwen2_moe", dict(norm_topk_prob=True, shared_expert_intermediate_size=16)),
    ("qwen3_moe", {}),
    ("qwen3_moe", dict(norm_topk_prob=False, num_experts=6, num_experts_per_tok=3)),
    ("olmoe", {}),
    ("olmoe", dict(norm_topk_prob=True, num_experts=6, num_experts_per_tok=3)),
])
def test_saved_configs_map_like_transformers(tmp_path, family, overrides):
    hf = _saved(tmp_path, family, **overrides)
    assert _ours(hf) == _theirs(hf)
    assert ModelConfig.from_hf(ModelConfig.from_hf(hf).to_hf()) == ModelConfig.from_hf(hf)  # bench offline writes it


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_hub_spelling_and_missing_optional_fields_map_like_transformers(tmp_path, family):
    """The Hub's Qwen configs say `num_experts` (transformers 5 writes `num_local_experts`); fields left out take
    transformers' defaults."""
    hf = _saved(tmp_path, family)
    hf["num_experts"] = hf.pop("num_local_experts", None) or hf["num_experts"]
    for name in ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "qkv_bias"):
        hf.pop(name, None)
    assert _ours(hf) == _theirs(hf)
    ours = ModelConfig.from_hf(hf)
    assert (ours.qkv_bias, ours.qk_norm) == ((True, False) if family == "qwen2_moe" else (False, True))


@pytest.mark.parametrize("family, change, message", [
    ("qwen3_moe", dict(decoder_sparse_step=2), r"decoder_sparse_step=2.*every layer must be a mixture of experts"),
    ("qwen2_moe", dict(mlp_only_layers=[1]), r"mlp_only_layers=\[1\]"),
    ("mixtral", dict(num_experts_per_tok=5), "num_experts_per_tok=5 must be between 1 and the 4 experts"),
    ("qwen3_moe", dict(num_experts_per_tok=0), "num_experts_per_tok=0 must be between 1"),
    ("mixtral", dict(num_local_experts=None), "missing required field 'num_local_experts'"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=None), "'shared_expert_intermediate_size'"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0 is not supported"),
    ("minimax_m2", dict(scoring_func="softmax"), "scoring_func='softmax' is not supported"),
    ("minimax_m2", dict(attn_type_list=[0, 1]), "linear-attention layers"),
    ("hunyuan_v1_moe", dict(moe_topk=[2, 1]), r"moe_topk differing between layers \(\[1, 2\]\)"),
])
def test_unsupported_or_broken_configs_are_refused(tmp_path, family, change, message):
    hf = _saved(tmp_path, family)
    hf.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf)


def test_minimax_m2_reads_its_rotary_dim_as_transformers_does(tmp_path):
    """The released MiniMax-M2 configs give partial RoPE as `rotary_dim` (64 of 128), which transformers turns
    into partial_rotary_factor; a saved config writes the factor, and both read the same."""
    hf = _saved(tmp_path, "minimax_m2")
    assert ModelConfig.from_hf(hf).rope.partial_rotary_factor == 0.5
    hub = {**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6}, "rotary_dim": 8}
    assert transformers.AutoConfig.for_model(**hub).rope_parameters["partial_rotary_factor"] == 0.5
    assert ModelConfig.from_hf(hub) == ModelConfig.from_hf(hf)


def test_hunyuan_moe_reads_its_per_layer_counts(tmp_path):
    """Hunyuan-A13B's config gives num_experts and moe_topk per layer; one value throughout reads as that value."""
    hf = _saved(tmp_path, "hunyuan_v1_moe")
    listed = {**hf, "num_experts": [4, 4], "moe_topk": [2, 2]}
    assert ModelConfig.from_hf(listed) == ModelConfig.from_hf(hf)
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.shared_expert_size, cfg.shared_expert_gated) == \
        (4, 2, 48, False)


def test_qwen_moe_without_an_expert_count_is_named(tmp_path):
    hf = _saved(tmp_path, "qwen3_moe")
    hf.pop("num_local_experts", None), hf.pop("num_experts", None)
    with pytest.raises(ConfigError, match="missing required field 'num_experts'"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("experts, k, norm", [(4, 2, True), (8, 1, False), (6, 3, False), (5, 5, True)])
def test_expert_weights_are_the_routers_top_k(experts, k, norm):
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=32, num_experts=experts,
                      experts_per_token=k, norm_topk_prob=norm)
    rng = np.random.default_rng(experts * 10 + k)
    y = rng.standard_normal((2, 5, 16)).astype(np.float32)
    router = rng.standard_normal((16, experts)).astype(np.float32)
    got = np.asarray(expert_weights({"router": jnp.asarray(router)}, cfg, jnp.asarray(y)))
    logits = (y @ router).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros_like(probs)
    for index in np.ndindex(*probs.shape[:2]):
        top = np.argsort(-probs[index])[:k]
        want[index + (top,)] = probs[index + (top,)] / (probs[index + (top,)].sum() if norm else 1.0)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert ((got > 0).sum(-1) == k).all()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2_moe")
    build("qwen2_moe", directory)
    return directory


def _broken(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    source = find_model(dst)
    return lambda: load_params(source, load_config(source), "float32", None)


def test_experts_load_stacked_in_order(moe_dir):
    source = find_model(moe_dir)
    cfg = load_config(source)
    params = load_params(source, cfg, "float32", None)["layers"]
    tensors = load_file(moe_dir / "model.safetensors")
    assert params["w_gate"].shape == (2, 4, 64, 48) and params["w_down"].shape == (2, 4, 48, 64)
    np.testing.assert_array_equal(params["w_gate"][1, 3], tensors["model.layers.1.mlp.experts.3.gate_proj.weight"].T)
    np.testing.assert_array_equal(params["w_down"][0, 2], tensors["model.layers.0.mlp.experts.2.down_proj.weight"].T)
    np.testing.assert_array_equal(params["router"][1], tensors["model.layers.1.mlp.gate.weight"].T)
    np.testing.assert_array_equal(params["shared_expert_gate"][0],
                                  tensors["model.layers.0.mlp.shared_expert_gate.weight"][0])


def test_a_missing_expert_is_named(moe_dir, tmp_path):
    load = _broken(moe_dir, tmp_path / "b", lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight'"):
        load()


def test_an_expert_beyond_num_experts_is_named(moe_dir, tmp_path):
    def extra(t):
        t["model.layers.0.mlp.experts.4.up_proj.weight"] = t["model.layers.0.mlp.experts.3.up_proj.weight"].clone()
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) 'model\.layers\.0\.mlp\.experts\.4\.up_proj"):
        _broken(moe_dir, tmp_path / "b", extra)()


def test_an_expert_of_the_wrong_width_is_named(moe_dir, tmp_path):
    def narrow(t):
        key = "model.layers.0.mlp.experts.1.down_proj.weight"
        t[key] = t[key][:, :40].clone()
    with pytest.raises(CheckpointError, match=r"experts\.1\.down_proj\.weight' has shape \(64, 40\), "
                                              r"expected \(64, 48\)"):
        _broken(moe_dir, tmp_path / "b", narrow)()



def test_a_mesh_names_the_expert_widths_it_cannot_split():
    said = mesh_problems((1, 8), heads=8, kv_heads=2, mlp=44, vocab=256, slots=8, pages=None, devices=8,
                         mlp_name="moe_intermediate_size", shared_mlp=20)
    assert said == ["moe_intermediate_size=44 is not a multiple of the 'model' axis (8)",
                    "shared_expert_intermediate_size=20 is not a multiple of the 'model' axis (8)"]
    assert ModelConfig.from_hf(_saved_dict("qwen2_moe")).mlp_field == "moe_intermediate_size"
    assert ModelConfig.from_hf(_saved_dict("mixtral")).mlp_field == "intermediate_size"


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_moe")
    build("qwen3_moe", directory)
    return directory


def test_engine_outputs_do_not_depend_on_the_batch(qwen3_moe_dir):
    """Greedy tokens and their logprobs, bit for bit, alone and in a batch that packs prompts into one chunk;
    the tokens also in a batch that preempts (a pool too small for the load: a recomputed sequence's KV comes
    from a prefill, not the decode steps that first wrote it, which moves its logprobs by ~1e-6, for dense
    models too). Every page and slot comes back."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = random_prompts(COMMON["vocab_size"], (1, 9, 17, 5, 30, 40), seed=3)
    engine = EngineConfig(max_slots=3, page_size=8, prefill_chunk=16, dtype="float32", max_model_len=64,
                          num_pages=14, max_prefill_seqs=2)
    llm = LLM(qwen3_moe_dir, engine)
    run = lambda batch: [(o.outputs[0].token_ids, [[(t, lp.logprob) for t, lp in sorted(step.items())]  # noqa: E731
                                                   for step in o.outputs[0].logprobs])
                         for o in llm.generate(batch, params, use_tqdm=False)]
    alone = [run([p])[0] for p in prompts]
    assert run(prompts[:4]) == alone[:4]
    assert llm.engine.stats().preemptions == 0
    assert [tokens for tokens, _ in run(prompts)] == [tokens for tokens, _ in alone]
    assert llm.engine.stats().preemptions > 0
    llm.engine.check_idle()
