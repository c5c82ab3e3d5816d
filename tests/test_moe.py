"""Mixtures of experts (Mixtral, Qwen1.5/2-MoE, Qwen3-MoE, GLM-4.5, ...): config mapping against transformers' config
classes, the router against a numpy reference, strict per-expert loading, leading dense layers, the engine's batch
invariance. Logits and greedy
tokens against transformers are tests/test_model_parity.py's (the families are in tests/hf_models.py); sharding
is test_mesh_variants.py's."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_models import COMMON, FAMILIES, build, random_prompts
from jaxinfer.config import ConfigError, EngineConfig, ModelConfig
from jaxinfer.llm import LLM, SamplingParams
from jaxinfer.model.checkpoint import CheckpointError, find_model, load_config, load_params
from jaxinfer.model.transformer import expert_weights
from jaxinfer.model.weights import to_hf_tensors
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
    ("qwen3_moe", dict(decoder_sparse_step=2), r"decoder_sparse_step=2.*dense layers must lead"),
    ("qwen2_moe", dict(mlp_only_layers=[1]), r"mlp_only_layers=\[1\]"),
    ("qwen2_moe", dict(mlp_only_layers=[0, 1]), "2 leading dense layers leave no mixture-of-experts layer of the 2"),
    ("glm4_moe", dict(n_group=3), "n_group=3 and topk_group=1 do not fit 4 experts"),
    ("glm4_moe", dict(n_group=4, topk_group=1), "n_group=4 and topk_group=1 do not fit 4 experts, 2 a token"),
    ("glm4_moe", dict(first_k_dense_replace=3), "3 leading dense layers leave no mixture-of-experts layer"),
    ("ernie4_5_moe", dict(moe_layer_interval=2), "moe_layer_interval=2 is not supported: the mixture-of-experts"),
    ("ernie4_5_moe", dict(moe_layer_end_index=1), "moe_layer_end_index=1 and moe_layer_interval=1 is not supported"),
    ("ernie4_5_moe", dict(moe_layer_start_index=3), "moe_layer_start_index=3"),
    ("ernie4_5_moe", dict(use_bias=True), "ernie4_5_moe with use_bias=true is not supported"),
    ("deepseek_v3", dict(topk_method="group_limited_greedy"), "topk_method='group_limited_greedy' is not supported"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func='softmax' is not supported"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias=true is not supported"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), r"topk_method='noaux_tc' is not supported \(greedy, group_limited"),
    ("glm4_moe_lite", dict(mlp_layer_types=["dense", "sparse", "dense"]), r"mlp_layer_types \['dense', 'sparse', "
                                                                          r"'dense'\] is not supported"),
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


def _built(tmp_path_factory, family: str):
    directory = tmp_path_factory.mktemp(family)
    build(family, directory)
    return directory


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return _built(tmp_path_factory, "qwen2_moe")


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
    assert ModelConfig.from_hf(_saved_dict("deepseek_v3")).mlp_field == "moe_intermediate_size"


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    return _built(tmp_path_factory, "qwen3_moe")


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


# ---- GLM-4.5 (glm4_moe) and leading dense layers ----

@pytest.mark.parametrize("family, overrides", [
    ("glm4_moe", {}),
    ("glm4_moe", dict(n_group=1, topk_group=1, first_k_dense_replace=2, use_qk_norm=False, n_shared_experts=2,
                      routed_scaling_factor=1.0, norm_topk_prob=False)),
    ("dots1", {}), ("dots1", dict(attention_bias=False, norm_topk_prob=False, first_k_dense_replace=0))])
def test_glm_routed_models_map_like_transformers(tmp_path, family, overrides):
    """Every routing field of GLM-4.5 and dots.llm1 as transformers' modeling code reads it, the layers it makes
    dense, their attention's norms and biases."""
    hf = _saved(tmp_path, family, **overrides)
    c, ours = transformers.AutoConfig.for_model(**hf), ModelConfig.from_hf(hf)
    model = transformers.AutoModelForCausalLM.from_config(c)
    gate = model.model.layers[-1].mlp.gate
    assert (ours.num_experts, ours.experts_per_token, ours.norm_topk_prob, ours.router_groups,
            ours.router_topk_groups, ours.routed_scaling) == (gate.num_experts, gate.top_k, gate.norm_topk_prob,
                                                              gate.num_group, gate.topk_group,
                                                              gate.routed_scaling_factor)
    dense = [type(layer.mlp).__name__.endswith("MLP") for layer in model.model.layers]
    assert dense == [i < ours.dense_layers for i in range(ours.num_layers)]
    shared = model.model.layers[-1].mlp.shared_experts
    assert (ours.intermediate_size, ours.shared_expert_size) == \
        (model.model.layers[-1].mlp.experts.intermediate_dim, shared.intermediate_size)
    assert ours.dense_intermediate_size == (model.model.layers[0].mlp.intermediate_size if any(dense) else 0)
    attention = model.model.layers[0].self_attn
    biases = (attention.q_proj.bias is not None, attention.o_proj.bias is not None)
    assert (ours.qk_norm, ours.qkv_bias, ours.o_bias) == (hasattr(attention, "q_norm"), *biases)
    assert ours.rope.rotary_dim(ours.head_dim) == model.model.rotary_emb.inv_freq.shape[0] * 2
    assert ModelConfig.from_hf(ours.to_hf()) == dataclasses.replace(ours, mtp_layers=0)


def test_glm4_moe_without_optional_fields_takes_transformers_defaults(tmp_path):
    hf = _saved(tmp_path, "glm4_moe")
    for name in ("n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace",
                 "n_shared_experts", "rope_parameters", "rms_norm_eps", "num_nextn_predict_layers"):
        hf.pop(name)
    c, ours = transformers.AutoConfig.for_model(**hf), ModelConfig.from_hf(hf)
    assert (ours.router_groups, ours.router_topk_groups, ours.routed_scaling, ours.norm_topk_prob, ours.dense_layers,
            ours.shared_expert_size // ours.intermediate_size, ours.rope.partial_rotary_factor, ours.rms_norm_eps,
            ours.mtp_layers) == (c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob,
                                 c.first_k_dense_replace, c.n_shared_experts,
                                 c.rope_parameters["partial_rotary_factor"], c.rms_norm_eps,
                                 c.num_nextn_predict_layers)


@pytest.mark.parametrize("groups, topk_groups, k, scaling, v2", [
    (4, 2, 3, 2.5, False), (2, 1, 2, 1.0, False), (8, 3, 4, 1.5, False), (4, 2, 3, 1.5, True), (8, 1, 2, 16.0, True)])
def test_group_limited_routing(groups, topk_groups, k, scaling, v2):
    """Group-limited routers against numpy. GLM-4.5's (DeepSeek-V3's): groups scored by their two best corrected
    sigmoid scores, experts chosen by corrected score within the best groups, weighed by their scores renormalised
    times the scaling. DeepSeek-V2's (`v2`): softmax weights, groups scored by their best, never renormalised."""
    X = 16
    cfg = ModelConfig(model_type="deepseek_v2" if v2 else "glm4_moe", vocab_size=8, hidden_size=16,
                      intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                      max_position_embeddings=32, num_experts=X, experts_per_token=k, norm_topk_prob=not v2,
                      router_scoring="softmax" if v2 else "sigmoid", router_correction=not v2, router_logits_f32=True,
                      router_groups=groups, router_topk_groups=topk_groups, routed_scaling=scaling,
                      router_group_score="max" if v2 else "top2")
    rng = np.random.default_rng(groups * 10 + k)
    y = rng.standard_normal((3, 7, 16)).astype(np.float32)
    router, correction = rng.standard_normal((16, X)).astype(np.float32), rng.normal(0, 0.3, X).astype(np.float32)
    got = np.asarray(expert_weights({"router": jnp.asarray(router), "router_correction": jnp.asarray(correction)},
                                    cfg, jnp.asarray(y)))
    logits = (y @ router).astype(np.float64)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) if v2 else 1 / (1 + np.exp(-logits))
    want = np.zeros_like(scores)
    for index in np.ndindex(*scores.shape[:2]):
        choice = (scores[index] + (0 if v2 else correction)).reshape(groups, -1)
        best = np.argsort(-np.sort(choice, axis=1)[:, -(1 if v2 else 2):].sum(1))[:topk_groups]
        masked = np.full_like(choice, -np.inf)
        masked[best] = choice[best]
        top = np.argsort(-masked.ravel())[:k]
        want[index + (top,)] = scores[index + (top,)] / (1 if v2 else scores[index + (top,)].sum()) * scaling
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert ((got > 0).sum(-1) == k).all()


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    return _built(tmp_path_factory, "glm4_moe")


def test_leading_dense_layers_load_as_a_stack_of_their_own(glm_dir):
    source = find_model(glm_dir)
    cfg = load_config(source)
    params = load_params(source, cfg, "bfloat16", None)
    tensors = load_file(glm_dir / "model.safetensors")
    dense, sparse = params["dense_layers"], params["layers"]
    assert dense["w_gate"].shape == (1, 64, 128) and "router" not in dense
    assert sparse["w_gate"].shape == (2, 4, 64, 48) and sparse["wq"].shape[0] == 2
    np.testing.assert_array_equal(np.asarray(dense["w_down"][0], np.float32),
                                  tensors["model.layers.0.mlp.down_proj.weight"].T.bfloat16().float())
    np.testing.assert_array_equal(np.asarray(sparse["w_up"][1, 3], np.float32),
                                  tensors["model.layers.2.mlp.experts.3.up_proj.weight"].T.bfloat16().float())
    np.testing.assert_array_equal(np.asarray(dense["wq"][0], np.float32).reshape(64, 64),
                                  tensors["model.layers.0.self_attn.q_proj.weight"].T.bfloat16().float())
    # The router and its correction stay float32 in a bfloat16 model, as transformers keeps them.
    assert sparse["router"].dtype == sparse["router_correction"].dtype == jnp.float32
    np.testing.assert_array_equal(sparse["router"][0], tensors["model.layers.1.mlp.gate.weight"].T)
    np.testing.assert_array_equal(sparse["router_correction"][1],
                                  tensors["model.layers.2.mlp.gate.e_score_correction_bias"])


def test_multi_token_prediction_layers_are_left_unread(glm_dir, tmp_path):
    """The Hub's GLM-4.5 files carry their next-token-prediction layer after the last (layer 46 of 46); it is not
    loaded. A tensor of a layer past it is still named."""
    config = json.loads((glm_dir / "config.json").read_text())

    def mtp(t, layer):
        for name in ("eh_proj.weight", "enorm.weight", "self_attn.q_proj.weight"):
            t[f"model.layers.{layer}.{name}"] = t["model.layers.0.self_attn.q_proj.weight"].clone()
    load = _broken(glm_dir, tmp_path / "mtp", lambda t: mtp(t, 3))
    assert config["num_nextn_predict_layers"] == 1 and load()["layers"]["wq"].shape[0] == 2
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) 'model\.layers\.4\.eh_proj\.weight'"):
        _broken(glm_dir, tmp_path / "past", lambda t: mtp(t, 4))()


@pytest.mark.parametrize("family, config, expect", [
    ("qwen3_moe", dict(mlp_only_layers=[0], num_hidden_layers=3), dict(dense_layers=1, dense_intermediate_size=128)),
    ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 1e4}),
     dict(q_lora_rank=0, rope_interleaved=False)),
    ("deepseek_v2", dict(topk_method="greedy", n_group=None, topk_group=None, q_lora_rank=16),
     dict(router_groups=1, q_lora_rank=16)),  # DeepSeek-V2's (not -Lite's) low-rank q, every expert in reach
])
def test_variants_decode_what_transformers_decodes(tmp_path, family, config, expect):
    """Variants the parity families do not take: Qwen-MoE's mlp_only_layers=[0] (a dense MLP of intermediate_size
    first, experts after); DeepSeek-V3's latent attention with q straight from the hidden state (Moonlight's), RoPE
    over halves and no scaling; DeepSeek-V2's with a low-rank q and greedy routing. Greedy tokens against
    transformers."""
    model = build(family, tmp_path, config=config)
    llm = LLM(tmp_path, EngineConfig(max_slots=2, page_size=8, prefill_chunk=16, dtype="float32", max_model_len=64))
    assert {name: getattr(llm.model_config, name) for name in expect} == expect
    prompts = random_prompts(COMMON["vocab_size"], (9, 40), seed=5)
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10,
                                 min_new_tokens=10)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref
    llm.engine.check_idle()


def test_a_mesh_names_the_dense_layers_width_it_cannot_split():
    said = mesh_problems((1, 8), heads=8, kv_heads=2, mlp=48, vocab=256, slots=8, pages=None, devices=8,
                         mlp_name="moe_intermediate_size", dense_mlp=100)
    assert said == ["intermediate_size=100 is not a multiple of the 'model' axis (8)"]


def test_leading_dense_layers_are_written_back_under_their_own_keys(glm_dir):
    source = find_model(glm_dir)
    cfg = load_config(source)
    written = to_hf_tensors(load_params(source, cfg, "float32", None), cfg)
    tensors = load_file(glm_dir / "model.safetensors")
    assert written.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(written[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("overrides", [
    {}, dict(moe_layer_start_index=0, moe_layer_end_index=-1, moe_num_shared_experts=0),
    dict(moe_layer_start_index=2, moe_layer_end_index=2, moe_num_shared_experts=2)])
def test_ernie_moe_maps_like_transformers(tmp_path, overrides):
    """ERNIE 4.5 MoE's sparse layers, experts, shared experts and widths as transformers' modeling code builds them."""
    hf = _saved(tmp_path, "ernie4_5_moe", **overrides)
    ours = ModelConfig.from_hf(hf)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
    sparse = [type(layer.mlp).__name__ == "Ernie4_5_MoeSparseMoeBlock" for layer in model.model.layers]
    assert sparse == [i >= ours.dense_layers for i in range(ours.num_layers)]
    moe = model.model.layers[-1].mlp
    shared = moe.shared_experts.intermediate_size if moe.shared_experts is not None else 0
    assert (ours.num_experts, ours.experts_per_token, ours.intermediate_size, ours.shared_expert_size) == \
        (moe.num_experts, moe.top_k, moe.experts.intermediate_dim, shared)
    if ours.dense_layers:
        assert ours.dense_intermediate_size == model.model.layers[0].mlp.intermediate_size
    assert ours.router_correction and ours.rope_interleaved and ours.tie_word_embeddings
    assert ModelConfig.from_hf(ours.to_hf()) == ours


def test_ernie_moe_leaves_its_multi_token_prediction_tensors_unread(tmp_path):
    """The Hub's ERNIE 4.5 MoE files carry `mtp_*` modules beside the model (transformers ignores them)."""
    build("ernie4_5_moe", tmp_path / "ernie")

    def mtp(t):
        t["model.mtp_linear_proj.0.weight"] = t["model.layers.0.self_attn.q_proj.weight"].clone()
        t["model.mtp_emb_norm.0.weight"] = t["model.norm.weight"].clone()
    params = _broken(tmp_path / "ernie", tmp_path / "mtp", mtp)()
    assert params["dense_layers"]["w_up"].shape == (1, 64, 128)
    assert params["layers"]["router_correction"].shape == (2, 4)


# ---- DeepSeek-V3 (deepseek_v3): multi-head latent attention beside GLM-4.5's routing ----

@pytest.mark.parametrize("family, overrides", [
    ("deepseek_v3", {}), ("glm4_moe_lite", {}), ("deepseek_v2", {}),
    ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    ("glm4_moe_lite", dict(mlp_layer_types=None, num_hidden_layers=4)),  # its default: the first layer dense
])
def test_latent_attention_models_map_like_transformers(tmp_path, family, overrides):
    """MLA's dims, its softmax scale (YaRN's mscale squared in it) and the routing as transformers' modeling objects
    hold them; the pool's one head is the latent and the RoPE'd key."""
    hf = _saved(tmp_path, family, **overrides)
    ours = ModelConfig.from_hf(hf)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
    attention, gate = model.model.layers[-1].self_attn, model.model.layers[-1].mlp.gate
    assert (ours.kv_lora_rank, ours.q_lora_rank or None, ours.qk_nope_dim, ours.qk_rope_dim, ours.v_head_dim) == \
        (attention.kv_lora_rank, attention.q_lora_rank, attention.qk_nope_head_dim, attention.qk_rope_head_dim,
         attention.v_head_dim)
    assert ours.attention_multiplier == pytest.approx(attention.scaling, rel=1e-12)
    assert (ours.head_dim, ours.num_kv_heads) == (ours.kv_lora_rank + ours.qk_rope_dim, 1)
    assert ours.rope_interleaved == getattr(model.config, "rope_interleave", True)  # DeepSeek-V2's always are
    dense = [type(layer.mlp).__name__.endswith("MLP") for layer in model.model.layers]
    assert (ours.router_groups, ours.router_topk_groups, ours.routed_scaling, ours.rms_norm_eps) == \
        (gate.num_group, gate.topk_group, gate.routed_scaling_factor, model.config.rms_norm_eps)
    assert dense == [i < ours.dense_layers for i in range(ours.num_layers)]
    back = ModelConfig.from_hf(ours.to_hf())
    assert back == dataclasses.replace(ours, mtp_layers=0, attention_multiplier=back.attention_multiplier)
    assert back.attention_multiplier == pytest.approx(ours.attention_multiplier, rel=1e-12)
