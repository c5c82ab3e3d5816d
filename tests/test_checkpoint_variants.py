"""Checkpoints as users bring them: what `save_pretrained` writes for each supported variant loads and gives
transformers' outputs, and what we cannot serve (quantized, mismatched, half-written) is refused by name.

Config mapping is checked against transformers' own config classes on the same config.json; weights against
the torch state dict; a few variants end to end against `generate` (one engine compile each).
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_models import COMMON, FAMILIES, LLAMA3_ROPE, build, random_prompts, scored_in_chunks
from jaxinfer import cli
from jaxinfer.config import ConfigError, EngineConfig, ModelConfig, with_overrides
from jaxinfer.llm import LLM, SamplingParams
from jaxinfer.model import checkpoint
from jaxinfer.model.checkpoint import CheckpointError, find_model, load_config, load_params
from jaxinfer.model.weights import to_hf_tensors
from test_model_parity import CHUNK, PAGE, PROMPT_LENGTHS

VARIANTS = {  # variants the supported families ship that FAMILIES does not cover, as (config class, overrides)
    "llama-linear-headdim-bias": (transformers.LlamaConfig, dict(
        head_dim=32, attention_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4})),
    "qwen3-headdim128": (transformers.Qwen3Config, dict(head_dim=128)),
    # YaRN past a short pretraining length (prompts of 17 and 40 tokens, 12 more generated): Qwen's form, and
    # DeepSeek's (mscale / mscale_all_dim, beta_fast / beta_slow, no truncation).
    "qwen3-yarn": (transformers.Qwen3Config, dict(head_dim=32, num_attention_heads=8, rope_parameters={
        "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "rope_theta": 1e4})),
    "llama-yarn-mscale": (transformers.LlamaConfig, dict(rope_parameters={
        "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "rope_theta": 5e5,
        "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False})),
    # Phi-4-mini's RoPE: LongRoPE (pretrained on 32 positions here) over the first 3/4 of each head.
    "phi3-longrope-partial": (transformers.Phi3Config, dict(
        pad_token_id=0, original_max_position_embeddings=32, partial_rotary_factor=0.75, rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 32, "short_factor": [1.0, 1.02, 1.05, 1.1, 1.3, 1.6],
            "long_factor": [1.0, 1.4, 2.5, 5.0, 9.0, 16.0]})),
}
NEW_TOKENS = 12


def _build(name, directory, **kwargs):
    with pytest.MonkeyPatch.context() as mp:  # FAMILIES drives the parity suite: add to it only meanwhile
        mp.setitem(FAMILIES, name, VARIANTS[name])
        return build(name, directory, **kwargs)


def _load(directory, dtype="float32"):
    source = find_model(directory)
    cfg = load_config(source)
    return cfg, load_params(source, cfg, dtype, None)


def _edit_tensors(directory: Path, edit) -> Path:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


def _greedy_matches_transformers(directory, model):
    engine = EngineConfig(max_slots=2, page_size=PAGE, prefill_chunk=CHUNK, max_model_len=64, dtype="float32")
    prompts = random_prompts(COMMON["vocab_size"], PROMPT_LENGTHS)[-2:]  # 17 and 40 tokens: several chunks and pages
    outputs = LLM(directory, engine).generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                                      ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens"


# Config mapping: against transformers' config classes.

def _hf_config(hf: dict):
    return transformers.AutoConfig.for_model(**hf)


def _assert_maps_like_transformers(hf: dict):
    ours, theirs = ModelConfig.from_hf(hf), _hf_config(hf)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads  # as modeling_*.py
    window = theirs.sliding_window if "sliding_attention" in (getattr(theirs, "layer_types", None) or []) \
        or hf["model_type"] == "mistral" else None
    assert (ours.head_dim, ours.num_kv_heads, ours.rms_norm_eps, ours.rope.theta, ours.tie_word_embeddings,
            ours.sliding_window) == (head_dim, theirs.num_key_value_heads, theirs.rms_norm_eps,
                                     theirs.rope_parameters["rope_theta"], theirs.tie_word_embeddings, window)
    return ours


def _saved_config(config_cls, tmp_path, **overrides) -> dict:
    config_cls(**{**COMMON, **overrides}).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("config_cls, overrides, window", [
    (transformers.MistralConfig, dict(sliding_window=None), None),
    (transformers.MistralConfig, dict(sliding_window=4096), 4096),
    (transformers.Qwen2Config, dict(use_sliding_window=False, sliding_window=32), None),
    (transformers.Qwen3Config, dict(head_dim=128, hidden_size=64), None),
    (transformers.LlamaConfig, dict(head_dim=32), None),
])
def test_saved_configs_map_like_transformers(tmp_path, config_cls, overrides, window):
    assert _assert_maps_like_transformers(_saved_config(config_cls, tmp_path, **overrides)).sliding_window == window


def test_configs_written_by_transformers_4_map_alike(tmp_path):
    """4.x wrote `rope_theta` + `rope_scaling` + `torch_dtype`, and Qwen kept `sliding_window` when unused."""
    hf = _saved_config(transformers.Qwen2Config, tmp_path, rope_parameters={**LLAMA3_ROPE}, dtype="bfloat16")
    rope = dict(hf["rope_parameters"])
    old = {k: v for k, v in hf.items() if k not in ("rope_parameters", "dtype")}
    old.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype=hf["dtype"], sliding_window=4096)
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(old).dtype == "bfloat16" and ModelConfig.from_hf(old).rope.kind == "llama3"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "phi3", "mixtral", "olmo2", "smollm3"])
def test_missing_optional_fields_take_transformers_defaults(tmp_path, family):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig,
           "phi3": transformers.Phi3Config, "mixtral": transformers.MixtralConfig,  # eps 1e-5 where absent
           "olmo2": transformers.Olmo2Config, "smollm3": transformers.SmolLM3Config}[family]  # theta 1e6, 2e6
    hf = _saved_config(cls, tmp_path, **({"pad_token_id": 0} if family == "phi3" else {}))
    for name in ("rms_norm_eps", "rope_parameters", "head_dim", "tie_word_embeddings", "hidden_act"):
        hf.pop(name, None)
    _assert_maps_like_transformers(hf)


@pytest.mark.parametrize("change, message", [
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quant_method 'gptq' are not supported"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), "'awq'"),
    (dict(quantization_config={"quant_method": "compressed-tensors"}), "compressed-tensors checkpoints of format None"),
    (dict(model_type="gemma3n"), "'gemma3n'"),
    (dict(hidden_act="gelu"), "'gelu'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "'dynamic'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "'yarn' is missing required field 'factor'"),
    (dict(partial_rotary_factor=0.75), "partial_rotary_factor=0.75 is not supported"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor=0.5"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention"] * 2), "sliding-window"),
])
def test_unsupported_configs_are_refused_at_load(tmp_path, change, message):
    hf = _saved_config(transformers.Qwen3Config, tmp_path)
    hf.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf)


GEMMA_7B = {"model_type": "gemma", "hidden_act": "gelu", "hidden_size": 3072, "intermediate_size": 24576,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
            "max_position_embeddings": 8192, "rope_theta": 10000.0, "vocab_size": 256000}  # as the Hub has it
GEMMA3_4B = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106],
             "torch_dtype": "bfloat16", "mm_tokens_per_image": 256,  # the Hub's text_config: what differs only
             "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                             "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                             "sliding_window": 1024},
             "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                               "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                               "patch_size": 14, "vision_use_head": False}}


@pytest.mark.parametrize("hf", [GEMMA_7B, "gemma-2-9b", "gemma-3-1b", GEMMA3_4B,
                                {"model_type": "gemma3_text", "num_hidden_layers": 8, "hidden_size": 64,
                                 "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                        "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                                 "layer_types": ["sliding_attention", "full_attention"] * 4, "sliding_window": 1024,
                                 "vocab_size": 256, "intermediate_size": 128, "num_attention_heads": 4,
                                 "head_dim": 16, "max_position_embeddings": 512}],
                         ids=["gemma-7b", "gemma-2-9b", "gemma-3-1b", "gemma-3-4b-multimodal",
                              "gemma-3-as-transformers-5-writes"])
def test_gemma_configs_map_like_transformers(hf):
    """Gemma's Hub configs (Gemma 1's `gelu` that means the tanh GELU, Gemma 2/3 without `layer_types`, Gemma 3's
    `rope_local_base_freq`, the multimodal Gemma 3's sparse `text_config`) and transformers 5's (RoPE by layer
    type) read as transformers' classes read them."""
    if isinstance(hf, str):
        hf = json.loads((Path(__file__).resolve().parent.parent / "configs" / f"{hf}.json").read_text())
    ours, theirs = ModelConfig.from_hf(hf), _hf_config(hf)
    if hf["model_type"] == "gemma3":  # served as its language model
        assert (ours.dtype, ours.eos_token_ids) == ("bfloat16", (1, 106))
        theirs = theirs.text_config
        assert (ours.vocab_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim,
                ours.max_position_embeddings) == (theirs.vocab_size, theirs.num_hidden_layers,
                                                  theirs.num_attention_heads, theirs.num_key_value_heads,
                                                  theirs.head_dim, theirs.max_position_embeddings)
    assert ours.activation == getattr(theirs, "hidden_activation", None) or theirs.hidden_act
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.embedding_multiplier == theirs.hidden_size ** 0.5
    if hf["model_type"] == "gemma":
        assert not ours.sliding_layers and ours.sliding_window is None and ours.attention_multiplier is None
        return
    assert ours.sliding_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert ours.sliding_window == theirs.sliding_window
    assert ours.attention_multiplier == theirs.query_pre_attn_scalar ** -0.5
    assert (ours.attn_softcap, ours.final_softcap) == (theirs.attn_logit_softcapping, theirs.final_logit_softcapping)
    ropes = theirs.rope_parameters
    if "full_attention" in ropes:
        ropes = ropes["full_attention"]
        local = theirs.rope_parameters["sliding_attention"]
        assert (ours.local_rope.theta, ours.local_rope.kind) == (local["rope_theta"], local["rope_type"])
    assert (ours.rope.theta, ours.rope.kind, ours.rope.factor) == (ropes["rope_theta"], ropes["rope_type"],
                                                                   ropes.get("factor", 1.0))


@pytest.mark.parametrize("fields", [dict(no_rope_layers=[1, 1, 0, 1, 1, 0]), dict(no_rope_layer_interval=3),
                                    dict(use_sliding_window=True, sliding_window=16)])
def test_smollm3_configs_map_like_transformers(tmp_path, fields):
    """SmolLM3's layers without RoPE (`no_rope_layers`, 0 for none, or every `no_rope_layer_interval`-th) and its
    optional sliding layers (the NoPE ones, unless `layer_types` says otherwise) read as transformers reads them,
    and write back as they were read."""
    hf = _saved_config(transformers.SmolLM3Config, tmp_path, num_hidden_layers=6, **fields)
    for derived in ("no_rope_layers", "layer_types"):  # as a config that leaves them to their defaults
        if derived not in fields:
            hf.pop(derived)
    ours, theirs = ModelConfig.from_hf(hf), _hf_config(hf)
    assert ours.rope_layers == tuple(bool(r) for r in theirs.no_rope_layers)
    sliding = tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert (ours.sliding_layers, ours.sliding_window) == ((sliding, 16) if any(sliding) else ((), None))
    assert ModelConfig.from_hf(ours.to_hf()) == ours


OLMO3_SHAPED = {"model_type": "olmo3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
                "num_attention_heads": 4, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_theta": 5e5,
                "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                                 "attention_factor": 1.2, "beta_fast": 32, "beta_slow": 1},
                "sliding_window": 4096, "vocab_size": 256}  # OLMo 3's layout in the Hub's spelling, tiny


@pytest.mark.parametrize("hf", [OLMO3_SHAPED, {**OLMO3_SHAPED, "model_type": "olmo2", "rope_scaling": None}],
                         ids=["olmo3", "olmo2"])
def test_olmo_configs_map_like_transformers(hf):
    """OLMo 3's sliding layers (3 of every 4 without `layer_types`), YaRN on its global layers only, and OLMo 2's
    single RoPE, as transformers reads them; the config writes back as it was read."""
    ours, theirs = ModelConfig.from_hf(hf), _hf_config(hf)
    assert (ours.qk_norm, ours.qk_norm_over_heads, ours.pre_norms, ours.post_norms) == (True, True, False, True)
    ropes = theirs.rope_parameters
    if hf["model_type"] == "olmo3":
        assert ours.sliding_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
        assert (ours.local_rope.kind, ours.local_rope.theta) == ("default", ropes["sliding_attention"]["rope_theta"])
        ropes = ropes["full_attention"]
        assert (ours.rope.factor, ours.rope.original_max_position, ours.rope.attention_factor) == (8.0, 8192, 1.2)
    assert (ours.rope.kind, ours.rope.theta) == (ropes["rope_type"], ropes["rope_theta"])
    assert ModelConfig.from_hf(ours.to_hf()) == ours


TINY_TOWER = dict(hidden_size=16, intermediate_size=32)
VISION_TOWERS = {  # tiny ones, for the multimodal checkpoints whose language model is served: (config, model,
    # top-level fields, vision config, text config fields beside the family's)
    "gemma3": (transformers.Gemma3Config, transformers.Gemma3ForConditionalGeneration, dict(mm_tokens_per_image=4),
               dict(TINY_TOWER, model_type="siglip_vision_model", num_hidden_layers=1, num_attention_heads=2,
                    image_size=28, patch_size=14), {}),
    "mistral": (transformers.Mistral3Config, transformers.Mistral3ForConditionalGeneration, {},
                dict(TINY_TOWER, model_type="pixtral", num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                     image_size=28, patch_size=14), {}),
    # The Qwen VLs' multimodal RoPE: sections of the 8 (qwen2) or 16 (qwen3) frequencies.
    "qwen2": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration, {},
              dict(TINY_TOWER, depth=1, num_heads=2, out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2), dict(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})),
    "qwen3": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration, {},
              dict(TINY_TOWER, depth=1, num_heads=2, out_hidden_size=64, patch_size=16, deepstack_visual_indexes=[0],
                   num_position_embeddings=16),
              dict(rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True})),
    "qwen3_moe": (transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration, {},
                  dict(TINY_TOWER, depth=1, num_heads=2, out_hidden_size=64, patch_size=16,
                       deepstack_visual_indexes=[0], num_position_embeddings=16),
                  dict(rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})),
}


def _with_vision(family: str, directory: Path, moved: bool, tied: bool):
    """A tiny multimodal checkpoint of a language model `family` (as the Hub's Gemma 3 4B and up, Mistral Small
    3.1: untied), saved with the Hub's keys (`language_model.model.*`, `vision_tower.*`), as transformers 5 writes
    them, or `moved` under `model.` (`model.language_model.*`), as transformers 4.52-4.57 wrote them."""
    _, extra = FAMILIES[family]
    config, model_cls, fields, vision, text = VISION_TOWERS[family]
    torch.manual_seed(0)
    model = model_cls(config(text_config={**COMMON, **extra, **text}, vision_config=vision, tie_word_embeddings=tied,
                             **fields)).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    if moved:
        _edit_tensors(directory, lambda tensors: tensors.update(
            {("" if k.startswith("language_model.lm_head") else "model.") + k.replace("language_model.model.",
             "language_model.").replace("language_model.lm_head", "lm_head"): tensors.pop(k) for k in list(tensors)}))
    return model


MISTRAL_SMALL_3_1 = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
                     "torch_dtype": "bfloat16", "image_token_index": 10, "spatial_merge_size": 2,
                     "text_config": {"head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
                                     "intermediate_size": 32768, "max_position_embeddings": 131072,
                                     "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
                                     "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
                                     "sliding_window": None, "vocab_size": 131072},
                     "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "num_hidden_layers": 24,
                                       "num_attention_heads": 16, "head_dim": 64, "image_size": 1540,
                                       "patch_size": 14, "intermediate_size": 4096}}  # as the Hub has it


def test_mistral_small_3_1s_config_maps_its_language_model_like_transformers():
    """Its text_config read as transformers' Mistral3Config reads it; the head is untied (the checkpoint holds
    language_model.lm_head.weight: transformers 5 unties it on finding that, 4.x by text_config's default)."""
    ours, theirs = ModelConfig.from_hf(MISTRAL_SMALL_3_1), _hf_config(MISTRAL_SMALL_3_1).text_config
    assert (ours.model_type, ours.dtype, ours.tie_word_embeddings, ours.sliding_window) == ("mistral", "bfloat16",
                                                                                           False, None)
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.vocab_size,
            ours.rope.theta, ours.rms_norm_eps) == (theirs.hidden_size, theirs.num_hidden_layers,
                                                   theirs.num_attention_heads, theirs.num_key_value_heads,
                                                   theirs.head_dim, theirs.vocab_size,
                                                   theirs.rope_parameters["rope_theta"], theirs.rms_norm_eps)


QWEN2_5_VL_FLAT = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                   "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
                   "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
                   "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 256, "eos_token_id": 7,
                   "bos_token_id": 1,
                   "vision_config": {"depth": 1, "hidden_size": 16, "out_hidden_size": 64}}  # 4.x's flat layout


def test_a_qwen_vl_config_maps_its_language_model_like_transformers():
    """Qwen2.5-VL's Hub configs (transformers 4.x: the text fields at the top, `mrope` scaling) and what
    transformers 5 writes (a `text_config`) give the same text model, with the multimodal RoPE read as plain RoPE
    and the text fields as transformers reads them."""
    ours, theirs = ModelConfig.from_hf(QWEN2_5_VL_FLAT), _hf_config(QWEN2_5_VL_FLAT).text_config
    assert (ours.model_type, ours.rope.kind, ours.rope.theta, ours.dtype, ours.eos_token_ids) == (
        "qwen2", "default", 1e6, "bfloat16", (7,))
    assert (ours.hidden_size, ours.num_kv_heads, ours.max_position_embeddings, ours.tie_word_embeddings) == (
        theirs.hidden_size, theirs.num_key_value_heads, theirs.max_position_embeddings, True)
    assert ModelConfig.from_hf(transformers.Qwen2_5_VLConfig(**QWEN2_5_VL_FLAT).to_dict()) == ours


@pytest.mark.parametrize("family, moved, tied, norm, tower", [
    ("gemma3", False, True, "language_model.model.norm.weight", "vision_tower."),
    ("gemma3", True, True, "model.language_model.norm.weight", "model.vision_tower."),
    ("mistral", False, False, "language_model.model.norm.weight", "vision_tower."),
    ("mistral", True, False, "model.language_model.norm.weight", "model.vision_tower."),
    ("qwen2", False, True, "model.norm.weight", "visual."),  # Qwen2.5-VL
    ("qwen3", False, False, "model.language_model.norm.weight", "model.visual."),  # Qwen3-VL
    ("qwen3_moe", False, False, "model.language_model.norm.weight", "model.visual."),  # Qwen3-VL-MoE
])
def test_a_multimodal_checkpoint_serves_its_language_model(tmp_path, family, moved, tied, norm, tower):
    """Gemma 3 4B and up, Mistral Small 3.1/3.2, Qwen2.5-VL and Qwen3-VL (dense and MoE) are multimodal checkpoints:
    their language model loads (from each key layout; untied heads too), its vision tower is left alone, and text
    prompts get transformers' logits and greedy tokens (the Qwen VLs' multimodal RoPE included). Qwen3-VL-MoE's
    experts are in one tensor a layer, loaded from transformers 5's layout and, transposed, from the Hub's."""
    model = _with_vision(family, tmp_path, moved, tied)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert norm in keys and any(k.startswith(tower) for k in keys)
    assert tied or any(k.endswith("lm_head.weight") for k in keys)
    engine = EngineConfig(max_slots=2, page_size=PAGE, prefill_chunk=CHUNK, max_model_len=64, dtype="float32")
    llm = LLM(tmp_path, engine)
    prompt = np.asarray(random_prompts(COMMON["vocab_size"], PROMPT_LENGTHS)[-1], np.int32)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(scored_in_chunks(llm, prompt, CHUNK), ref, atol=2e-4, rtol=0)
    _greedy_matches_transformers(tmp_path, model)
    if family == "qwen3_moe":  # the Hub's layout: gate_up_proj [X, D, 2F], down_proj [X, F, D]
        _edit_tensors(tmp_path, lambda tensors: tensors.update(
            {k: v.transpose(1, 2).contiguous() for k, v in tensors.items() if ".mlp.experts." in k}))
        assert load_file(tmp_path / "model.safetensors")[
            "model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 96)
        hub = load_file(tmp_path / "model.safetensors")
        np.testing.assert_allclose(scored_in_chunks(LLM(tmp_path, engine), prompt, CHUNK), ref, atol=2e-4, rtol=0)
        cfg = load_config(find_model(tmp_path))  # written back in the Hub's layout, halves side by side
        written = to_hf_tensors(load_params(find_model(tmp_path), cfg, "float32", None), cfg)
        key = "model.layers.0.mlp.experts.gate_up_proj"
        np.testing.assert_array_equal(written[key], hub["model.language_model." + key[len("model."):]].numpy())


def test_generation_config_eos_list_is_merged(tmp_path):
    build("llama3", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    assert load_config(find_model(tmp_path)).eos_token_ids == (2, 7, 9)


# Weights: against the torch state dict.

@pytest.mark.parametrize("disk", [torch.float32, torch.bfloat16, torch.float16])
def test_each_disk_dtype_loads_as_each_engine_dtype_exactly(tmp_path, disk):
    model = build("qwen3", tmp_path, dtype=disk)
    cfg = load_config(find_model(tmp_path))
    assert cfg.dtype == str(disk).removeprefix("torch.")
    for engine in ("float32", "bfloat16", "float16"):
        ours = to_hf_tensors(_load(tmp_path, engine)[1], cfg)
        assert set(ours) == set(model.state_dict())
        for key, value in model.state_dict().items():
            want = value.to(disk).to(getattr(torch, engine))
            assert ours[key].dtype == (ml_dtypes.bfloat16 if engine == "bfloat16" else np.dtype(engine)), key
            np.testing.assert_array_equal(ours[key].astype(np.float32), want.float().numpy(), err_msg=key)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded")
    build("llama3.2-tied", directory, max_shard_size="20KB")
    return directory


def test_sharded_checkpoint_loads_like_single_file(sharded, tmp_path):
    assert len({*json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()}) > 2
    build("llama3.2-tied", tmp_path)
    jax.tree.map(np.testing.assert_array_equal, _load(sharded)[1], _load(tmp_path)[1])


def test_index_naming_a_missing_shard_names_the_file(sharded, tmp_path):
    shutil.copytree(sharded, tmp_path / "m")
    shard = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard} named in the index does not exist"):
        _load(tmp_path / "m")


def test_tensor_in_the_index_but_not_in_its_shard_is_named(sharded, tmp_path):
    shutil.copytree(sharded, tmp_path / "m")
    key = "model.layers.1.mlp.up_proj.weight"
    shard = tmp_path / "m" / json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"'{key}'.*does not contain"):
        _load(tmp_path / "m")


def test_stale_index_beside_a_resaved_single_file_is_ignored_as_transformers_does(tmp_path):
    build("llama3", tmp_path, max_shard_size="20KB")
    model = build("llama3", tmp_path, seed=1)  # save_pretrained removes the old shards but not their index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = to_hf_tensors(_load(tmp_path)[1], load_config(find_model(tmp_path)))
    np.testing.assert_array_equal(ours["lm_head.weight"], model.state_dict()["lm_head.weight"].numpy())


def test_tied_checkpoint_with_a_copy_of_the_embedding_as_lm_head_loads(tmp_path):
    build("llama3.2-tied", tmp_path)
    _edit_tensors(tmp_path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    _load(tmp_path)


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path):
    """transformers 5 then leaves the two untied (4.x tied them): which one the user meant is unclear."""
    build("llama3.2-tied", tmp_path)
    _edit_tensors(tmp_path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1))
    with pytest.raises(CheckpointError, match="tie_word_embeddings.*'lm_head.weight' differs"):
        _load(tmp_path)


def test_rotary_inv_freq_buffers_are_ignored(tmp_path):
    build("llama3", tmp_path)
    _edit_tensors(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    _load(tmp_path)


@pytest.mark.parametrize("key", ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"])
@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.float8_e4m3fn, "F8_E4M3"),
                                         (torch.float8_e5m2, "F8_E5M2")])
def test_quantized_tensors_are_refused_by_name(tmp_path, key, dtype, name):
    """Quantized weights whose config lost its quantization_config must not be cast to floats (int8), nor fail
    inside numpy (fp8, which numpy cannot read): the tensor and its dtype are named. lm_head.weight is also read by
    the tied-head check, before any other weight."""
    build("llama3.2-tied", tmp_path)
    source = "model.embed_tokens.weight" if key == "lm_head.weight" else key
    _edit_tensors(tmp_path, lambda t: t.__setitem__(key, t[source].to(dtype)))
    with pytest.raises(CheckpointError, match=f"'{key}' is {name}, not 16/32/64-bit floating point"):
        _load(tmp_path)


# Whole variants end to end, and `jaxinfer convert`.

def test_converted_variant_is_bit_identical_and_generates_like_transformers(tmp_path):
    """Linear rope, head_dim != hidden/heads, attention biases, bfloat16 on disk; through `jaxinfer convert`."""
    model = _build("llama-linear-headdim-bias", tmp_path / "hf", dtype=torch.bfloat16)
    assert cli.main(["convert", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "conv"),
                     "--dtype", "float32"]) == 0
    cfg, params = _load(tmp_path / "hf")
    assert (cfg.head_dim, cfg.rope.kind, cfg.qkv_bias, cfg.o_bias) == (32, "linear", True, True)
    converted_cfg, converted = _load(tmp_path / "conv")
    assert converted_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, converted, params)
    _greedy_matches_transformers(tmp_path / "conv", model)


def test_qwen3_head_dim_128_on_a_small_hidden_generates_like_transformers(tmp_path):
    model = _build("qwen3-headdim128", tmp_path, dtype=torch.float16)
    _greedy_matches_transformers(tmp_path, model)


@pytest.mark.parametrize("drop", [(), ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                                      "logits_scaling")])
def test_granite_scalings_map_like_transformers(tmp_path, drop):
    config_cls, extra = FAMILIES["granite"]
    hf = _saved_config(config_cls, tmp_path, **extra)
    for name in drop:
        hf.pop(name)
    ours, theirs = ModelConfig.from_hf(hf), _hf_config(hf)
    names = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
    assert [getattr(ours, n) for n in names] == [getattr(theirs, n) for n in names]
    assert ModelConfig.from_hf(ours.to_hf()) == ours


@pytest.mark.parametrize("variant", ["qwen3-yarn", "llama-yarn-mscale"])
def test_yarn_scaled_models_match_transformers(tmp_path, variant):
    model = _build(variant, tmp_path)
    cfg, _ = _load(tmp_path)
    assert cfg.rope.kind == "yarn" and cfg.rope.attention_factor > 1
    llm = LLM(tmp_path, EngineConfig(max_slots=2, page_size=PAGE, prefill_chunk=CHUNK, max_model_len=64,
                                     dtype="float32"))
    prompt = np.asarray(random_prompts(COMMON["vocab_size"], [40])[0], np.int32)  # past the 32 pretrained
    with torch.no_grad():
        ref = model(torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(scored_in_chunks(llm, prompt, CHUNK), ref, atol=2e-4, rtol=0)
    _greedy_matches_transformers(tmp_path, model)


@pytest.mark.parametrize("max_model_len, prompt_len", [(32, 17), (64, 40)])
def test_longrope_with_a_partial_rotary_factor_matches_transformers(tmp_path, max_model_len, prompt_len):
    """Phi-4-mini's RoPE. An engine whose context stays within the 32 pretrained positions takes the short
    factors, one that may pass them the long ones (vLLM's choice); transformers picks by the length of each
    forward pass. So a 17-token prompt (29 tokens with its output) under the first and a 40-token one under the
    second get transformers' logits and greedy tokens; RoPE rotates 12 of the 16 head dimensions."""
    model = _build("phi3-longrope-partial", tmp_path)
    engine = EngineConfig(max_slots=2, page_size=PAGE, prefill_chunk=CHUNK, max_model_len=max_model_len,
                          dtype="float32")
    llm = LLM(tmp_path, engine)
    rope = llm.model_config.rope
    assert (rope.kind, rope.long, rope.rotary_dim(llm.model_config.head_dim)) == ("longrope", max_model_len > 32, 12)
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(512 / 32) / math.log(32)))
    prompt = random_prompts(COMMON["vocab_size"], [prompt_len])[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt], dtype=torch.long)).logits[0].numpy()
        tokens = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
    np.testing.assert_allclose(scored_in_chunks(llm, np.asarray(prompt, np.int32), CHUNK), ref, atol=2e-4, rtol=0)
    out = llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == tokens


@pytest.mark.parametrize("seq_len", [None, 33])
def test_longrope_frequencies_are_transformers(seq_len):
    """Both factor sets, the attention factor, and the config written back as transformers reads it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from jaxinfer.model.transformer import rope_frequencies
    theirs = transformers.Phi3Config(**{**COMMON, **VARIANTS["phi3-longrope-partial"][1]})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](theirs, "cpu", seq_len=seq_len)
    ours = ModelConfig.from_hf(theirs.to_dict()).for_context(64 if seq_len else 32)
    np.testing.assert_allclose(rope_frequencies(ours.rope, ours.head_dim), inv_freq.numpy(), rtol=1e-6, atol=0)
    assert ours.rope.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    assert ModelConfig.from_hf(ours.to_hf()) == ModelConfig.from_hf(theirs.to_dict())


@pytest.mark.parametrize("name", ["su", "yarn"])
def test_phi3s_older_names_of_longrope_map_as_transformers_maps_them(name):
    overrides = VARIANTS["phi3-longrope-partial"][1]
    hf = {**COMMON, **overrides, "model_type": "phi3"}
    hf["rope_parameters"] = {**overrides["rope_parameters"], "rope_type": name}
    theirs = transformers.Phi3Config(**{k: v for k, v in hf.items() if k != "model_type"})
    assert theirs.rope_parameters["rope_type"] == "longrope"
    ours = ModelConfig.from_hf(hf).rope
    assert ours == ModelConfig.from_hf(theirs.to_dict()).rope and ours.kind == "longrope"


@pytest.mark.parametrize("change, message", [
    (dict(partial_rotary_factor=0.7), "rotate 11 of the 16"),
    (dict(long_factor=[1.0, 2.0]), "long_factor has 2 entries; the 12 rotated head dimensions need 6"),
    (dict(short_factor=None), "missing required field 'short_factor'"),
])
def test_longrope_configs_that_cannot_work_are_refused(change, message):
    overrides = VARIANTS["phi3-longrope-partial"][1]
    hf = {**COMMON, **overrides, "model_type": "phi3"}
    hf["rope_parameters"] = {**overrides["rope_parameters"], **change}
    hf["partial_rotary_factor"] = hf["rope_parameters"]["partial_rotary_factor"]
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128},  # 512 / 128, as DeepSeek-V3
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.25, "beta_fast": 8, "beta_slow": 0.5},
    {"rope_type": "yarn", "factor": 40.0, "mscale": 0.9, "mscale_all_dim": 0.8, "original_max_position_embeddings": 64},
])
def test_yarn_frequencies_and_attention_factor_are_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from jaxinfer.model.transformer import rope_frequencies
    theirs = transformers.Qwen2Config(**{**COMMON, "rope_parameters": {**rope, "rope_theta": 1e6}})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
    ours = ModelConfig.from_hf(theirs.to_dict())
    np.testing.assert_allclose(rope_frequencies(ours.rope, ours.head_dim), inv_freq.numpy(), rtol=1e-6, atol=0)
    assert ours.rope.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    assert ModelConfig.from_hf(ours.to_hf()) == ours  # the config bench offline hands transformers


@pytest.mark.parametrize("config_cls, overrides, longest, source", [
    (transformers.Qwen3Config, dict(max_position_embeddings=40960, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}),
     131072, "yarn's original_max_position_embeddings=32768 x factor=4"),  # Qwen3's long-context recipe
    (transformers.LlamaConfig, dict(max_position_embeddings=2048, rope_parameters={
        "rope_type": "linear", "factor": 8.0, "rope_theta": 1e4}), 16384, "max_position_embeddings=2048 x linear"),
    (transformers.LlamaConfig, dict(max_position_embeddings=8192, rope_parameters={**LLAMA3_ROPE}), 8192,
     "max_position_embeddings=8192"),
])
def test_the_longest_context_is_derived_as_vllm_derives_it(config_cls, overrides, longest, source):
    cfg = ModelConfig.from_hf(config_cls(**{**COMMON, **overrides}).to_dict())
    assert cfg.max_length == longest
    assert EngineConfig(max_model_len=longest).resolve(cfg, "cpu").max_model_len == longest
    assert EngineConfig().resolve(cfg, "cpu").max_model_len == 4096  # the default stays capped
    with pytest.raises(ConfigError, match=f"max_model_len={longest + 1} exceeds the model's longest context, "
                                          f"{longest} \\({source}"):
        EngineConfig(max_model_len=longest + 1).resolve(cfg, "cpu")


def test_hf_overrides_turn_yarn_on_as_a_config_json_would(tmp_path):
    """vLLM's --hf-overrides '{"rope_scaling": {yarn}}' over a transformers-5 config (rope_parameters, theta
    inside): the engine generates what transformers does with yarn written into config.json."""
    model = _build("qwen3-yarn", tmp_path / "yarn")
    shutil.copytree(tmp_path / "yarn", tmp_path / "plain")
    hf = json.loads((tmp_path / "plain" / "config.json").read_text())
    yarn = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": hf["rope_parameters"]["rope_theta"]}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(hf))
    engine = EngineConfig(max_slots=2, page_size=PAGE, prefill_chunk=CHUNK, max_model_len=64, dtype="float32",
                          hf_overrides={"rope_scaling": yarn})
    llm = LLM(tmp_path / "plain", engine)
    assert llm.model_config == load_config(find_model(tmp_path / "yarn"))
    prompts = random_prompts(COMMON["vocab_size"], PROMPT_LENGTHS)[-2:]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref
    plain = LLM(tmp_path / "plain", dataclasses.replace(engine, hf_overrides=None))
    assert plain.model_config.rope.kind == "default"  # the overrides, not the files, made the difference


def test_hf_overrides_scale_gemma_3s_global_layers_only(tmp_path):
    """A `rope_scaling` override on a config transformers 5 wrote with Gemma 3's RoPE by layer type scales the
    global layers' RoPE, keeping their theta and the sliding layers' RoPE, as transformers reads the Hub's form."""
    hf = _saved_config(transformers.Gemma3TextConfig, tmp_path, head_dim=16, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
    scaling = {"rope_type": "linear", "factor": 8.0}
    ours = ModelConfig.from_hf(with_overrides(hf, {"rope_scaling": scaling}))
    theirs = transformers.Gemma3TextConfig(**{**COMMON, "head_dim": 16, "rope_theta": 5e5, "rope_local_base_freq": 2e4,
                                              "rope_scaling": scaling}).rope_parameters
    global_theta = theirs["full_attention"]["rope_theta"]
    assert (ours.rope.kind, ours.rope.factor, ours.rope.theta) == ("linear", 8.0, global_theta)
    assert (ours.local_rope.kind, ours.local_rope.theta) == ("default", theirs["sliding_attention"]["rope_theta"])
    assert ours.longest_context[0] == 8 * COMMON["max_position_embeddings"]


def test_hf_overrides_flag_reaches_the_engine_on_every_command(monkeypatch):
    from jaxinfer.server import run
    seen = {}
    monkeypatch.setattr(run, "serve", lambda model, engine, *args, **kwargs: seen.setdefault("serve", engine) and 0)
    value = '{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 8192}'
    assert cli.main(["serve", "--hf-overrides", value, "--skip-warmup"]) == 0
    assert seen["serve"].hf_overrides == json.loads(value)
    for command in (["serve"], ["generate", "hi"], ["bench", "offline"], ["bench", "profile", "--output", "x"],
                    ["eval", "perplexity", "--input", "x"]):
        assert cli.build_parser().parse_args(command + ["--hf-overrides", value]).hf_overrides == json.loads(value)
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(command + ["--hf-overrides", "[1, 2]"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("conv")
    build("llama3", directory / "hf")
    cfg, params = _load(directory / "hf")
    checkpoint.save_orbax(params, "float32", directory / "hf", directory / "conv")
    return directory


def test_interrupted_reconversion_is_refused(converted, tmp_path, monkeypatch):
    shutil.copytree(converted / "conv", tmp_path / "conv")
    build("llama3", tmp_path / "other", seed=1)
    cfg, params = _load(tmp_path / "other")

    def interrupted(source, output):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_copy_side_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_orbax(params, "float32", tmp_path / "other", tmp_path / "conv")
    with pytest.raises(CheckpointError, match="unfinished `jaxinfer convert`.*convert again"):
        _load(tmp_path / "conv")


def test_converted_weights_that_do_not_match_config_are_refused(converted, tmp_path):
    shutil.copytree(converted / "conv", tmp_path / "conv")
    hf = json.loads((tmp_path / "conv" / "config.json").read_text())
    (tmp_path / "conv" / "config.json").write_text(json.dumps({**hf, "intermediate_size": 96}))
    message = r"do not match its config.json: layers.w_down is \(2, 128, 64\) there, the config needs \(2, 96, 64\)"
    with pytest.raises(CheckpointError, match=message + "; convert again"):
        _load(tmp_path / "conv")
