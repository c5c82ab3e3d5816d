"""Tiny random Hugging Face checkpoints of every supported family, built with transformers, and our prompt
logits to compare with theirs.

Weights use std ~ 1/sqrt(hidden) rather than HF's 0.02 so greedy decoding varies
and the top-2 logit margins are wide enough to compare tokens exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.125, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}

FAMILIES = {
    "llama2": (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    "llama2-bias": (transformers.LlamaConfig, dict(attention_bias=True)),
    "llama3": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    "llama3.2-tied": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=24)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, num_attention_heads=8)),
    "phi3": (transformers.Phi3Config, dict(sliding_window=24, pad_token_id=0)),  # fused qkv and gate_up tensors
    "granite": (transformers.GraniteConfig, dict(embedding_multiplier=4.0, residual_multiplier=0.5,
                                                 attention_multiplier=0.0625, logits_scaling=2.0,
                                                 tie_word_embeddings=True)),
    # Gemma: (1 + w) norms, a tanh GELU, embeddings times sqrt(D); Gemma 2/3 norm sublayer outputs too, interleave
    # sliding-window layers (a window of 12) with global ones; Gemma 2 caps logits, Gemma 3 gives its sliding
    # layers a RoPE of their own and q/k norms.
    "gemma": (transformers.GemmaConfig, dict(head_dim=16, pad_token_id=0)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=12,
                                               num_hidden_layers=3, attn_logit_softcapping=2.0,
                                               final_logit_softcapping=6.0, pad_token_id=0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=12, num_hidden_layers=3, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    # OLMo 2/3: norms after each sublayer only, q and k normed over all heads; OLMo 3 interleaves sliding layers.
    "olmo2": (transformers.Olmo2Config, dict(pad_token_id=0)),
    "olmo3": (transformers.Olmo3Config, dict(  # its global layers' RoPE scaled by YaRN, as the released model's
        sliding_window=12, num_hidden_layers=3, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 16.0, "rope_theta": 5e5,
                                            "original_max_position_embeddings": 32},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}})),
    # SmolLM3: every other layer here without RoPE (NoPE; every fourth in the released model).
    "smollm3": (transformers.SmolLM3Config, dict(no_rope_layer_interval=2, pad_token_id=0)),
    # Cohere (Command R) and Cohere 2 (Command R7B, A): LayerNorm, attention and MLP side by side, interleaved RoPE,
    # logits times logit_scale; Cohere 2 interleaves sliding layers (with RoPE) with global ones (without).
    "cohere": (transformers.CohereConfig, dict(logit_scale=0.25, pad_token_id=0)),
    "cohere-qk-norm": (transformers.CohereConfig, dict(logit_scale=0.25, use_qk_norm=True, pad_token_id=0)),  # R+
    "cohere2": (transformers.Cohere2Config, dict(logit_scale=0.25, sliding_window=12, num_hidden_layers=3,
                                                 layer_types=["sliding_attention", "full_attention",
                                                              "sliding_attention"], pad_token_id=0)),
    # StarCoder 2: LayerNorms with biases, a two-projection GELU MLP, biases on every projection, a sliding window.
    "starcoder2": (transformers.Starcoder2Config, dict(sliding_window=24, pad_token_id=0)),
    # Phi-2: LayerNorms with biases, attention and a two-projection MLP side by side, RoPE over part of each head,
    # a bias on every projection and on the logits.
    "phi": (transformers.PhiConfig, dict(pad_token_id=0)),
    # GLM-4 (glm: GLM-4-9B-chat-hf; glm4: GLM-4-0414, post-norms too): RoPE over adjacent pairs of the first half of
    # each head, gate and up fused in the checkpoint, q/k/v biases.
    "glm": (transformers.GlmConfig, dict(pad_token_id=0)),
    "glm4": (transformers.Glm4Config, dict(pad_token_id=0)),
    # Seed-OSS: biases on q/k/v and (attention_out_bias) on o. Ministral: Mistral's sliding window on some layers.
    "seed_oss": (transformers.SeedOssConfig, dict(head_dim=16, attention_bias=True, attention_out_bias=True)),
    "ministral": (transformers.MinistralConfig, dict(head_dim=16, sliding_window=12, num_hidden_layers=3, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention"])),
    # Helium: RoPE over adjacent pairs, norms weighing in float32. ERNIE 4.5: adjacent-pair RoPE, tied embeddings.
    "helium": (transformers.HeliumConfig, dict(head_dim=16, attention_bias=True, pad_token_id=0)),  # not 3: a prompt id
    "ernie4_5": (transformers.Ernie4_5Config, dict(head_dim=16)),
    # Arcee (AFM): an MLP of two projections with ReLU squared between.
    "arcee": (transformers.ArceeConfig, dict(mlp_bias=True)),
    # Apertus: an MLP of two projections with xIELU between (its learned scalars drawn per layer), q/k normed.
    "apertus": (transformers.ApertusConfig, dict(head_dim=16, pad_token_id=0)),
    # EXAONE 4.0: norms after each sublayer only, q/k normed head by head, sliding layers with RoPE and global
    # ones without.
    "exaone4": (transformers.Exaone4Config, dict(sliding_window=12, num_hidden_layers=3, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention"])),
    # HunYuan (dense): q and k normed after RoPE, RoPE's "dynamic" with a fixed alpha (static NTK frequencies).
    "hunyuan_v1_dense": (transformers.HunYuanDenseV1Config, dict(head_dim=16, pad_token_id=0, rope_parameters={
        "rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0})),
    # Mixtures of experts: 4 experts of 48, 2 a token (Mixtral renormalises their weights; Qwen3-MoE as
    # norm_topk_prob says; Qwen2-MoE adds a gated shared expert and q/k/v biases).
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    shared_expert_intermediate_size=80)),
    "olmoe": (transformers.OlmoeConfig, dict(num_experts=4, num_experts_per_tok=2, intermediate_size=48,
                                             pad_token_id=0)),  # q and k normed over all heads, as OLMo 2's
    # GraniteMoE: every layer's experts in one tensor (gate and up rows of one), Granite's scalings.
    "granitemoe": (transformers.GraniteMoeConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                                                      embedding_multiplier=4.0, residual_multiplier=0.5,
                                                      attention_multiplier=0.0625, logits_scaling=2.0)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    norm_topk_prob=True, head_dim=16)),
    # HunYuan-MoE (Hunyuan-A13B): HunYuan's attention, experts and an ungated shared MLP of one width, a float32
    # router.
    "hunyuan_v1_moe": (transformers.HunYuanMoEV1Config, dict(num_experts=4, moe_topk=2, intermediate_size=48,
                                                            head_dim=16, pad_token_id=0, rope_parameters={
        "rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0})),
    # MiniMax-M2: experts chosen by sigmoid scores plus a correction bias, q and k normed over all heads, RoPE over
    # half of each head (its `rotary_dim`).
    "minimax_m2": (transformers.MiniMaxM2Config, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                                                      head_dim=16, rotary_dim=8, pad_token_id=0)),
    # GLM-4.5: a leading dense layer (of intermediate_size), then experts chosen by sigmoid scores plus a correction
    # within the best of 2 groups, weighed times a routed scaling, an ungated shared MLP, a float32 router, q/k
    # biases and norms, RoPE over half of each head (its halves, not adjacent pairs).
    "glm4_moe": (transformers.Glm4MoeConfig, dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16, num_hidden_layers=3,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True, pad_token_id=0)),
    # ERNIE 4.5 MoE: a leading dense layer, then experts chosen by softmax weight plus a correction ([1, X] in
    # `moe_statics`), an ungated shared MLP, a float32 router; ERNIE's RoPE over adjacent pairs, tied embeddings.
    "ernie4_5_moe": (transformers.Ernie4_5_MoeConfig, dict(
        moe_num_experts=4, moe_k=2, moe_intermediate_size=48, head_dim=16, num_hidden_layers=3,
        moe_layer_start_index=1, moe_num_shared_experts=1)),
    # DeepSeek-V3 (Kimi K2, Moonlight): multi-head latent attention (a low-rank q, a KV latent and a RoPE'd key shared
    # by the heads, YaRN with DeepSeek's mscale), GLM-4.5's routing (the same router), a leading dense layer.
    "deepseek_v3": (transformers.DeepseekV3Config, dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, num_hidden_layers=3,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24, num_key_value_heads=4,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0})),
    # DeepSeek-V2: the latent attention with q straight from the hidden state (-Lite's), RoPE over adjacent pairs,
    # experts by softmax weight within the best groups, each scored by its best expert (group_limited_greedy).
    "deepseek_v2": (transformers.DeepseekV2Config, dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, num_hidden_layers=3,
        first_k_dense_replace=1, n_group=2, topk_group=1, topk_method="group_limited_greedy",
        routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, num_key_value_heads=4, n_shared_experts=1)),
    # GLM-4.7-Flash: DeepSeek-V3's latent attention and GLM's routing, its dense layers as `mlp_layer_types` says.
    "glm4_moe_lite": (transformers.Glm4MoeLiteConfig, dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, num_hidden_layers=3, n_group=2,
        topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=16,
        num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse"], pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # dots.llm1: GLM-4.5's routing (renormalised here; its class default is not), q/k norms, biases on q/k/v/o.
    "dots1": (transformers.Dots1Config, dict(
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=48, head_dim=16,
        num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, attention_bias=True)),
    # gpt-oss: attention sinks, sliding layers (every other), YaRN without truncation, biases on q/k/v/o, the router
    # and every expert, gate and up interleaved in one tensor, the clamped SwiGLU (a limit low enough to clamp here).
    "gpt_oss": (transformers.GptOssConfig, dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, head_dim=16, sliding_window=12,
        num_hidden_layers=3, swiglu_limit=0.5, pad_token_id=0,
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64, "rope_theta": 150000.0})),
}
# fp8 checkpoints: a family's weights quantized by transformers' own FineGrainedFP8 quantizer (quant_method "fp8")
# with a block size (None: one scale per tensor), or written as llm-compressor's compressed-tensors with a weight
# strategy (and static activation scales); the reference is transformers' model loaded from the fp8 files.
FP8_FAMILIES = {
    "llama3-fp8": ("llama3", (16, 16)),
    "phi3-fp8": ("phi3", (64, 16)),  # fused q/k/v and gate/up rows: k and v share scale blocks
    "qwen2-fp8-per-tensor": ("qwen2", None),  # biases, tied embeddings
    "qwen3_moe-fp8": ("qwen3_moe", (16, 16)),  # every expert's projections, the routers left unquantized
    "llama3-ct-channel": ("llama3", "channel"),  # vLLM's -FP8-dynamic checkpoints: a scale per output
    "qwen3_moe-ct-tensor-static": ("qwen3_moe", "tensor"),  # -FP8 (static): input scales beside, unread
}
FP8_SKIP = ["lm_head", "mlp.gate", "shared_expert_gate"]  # as the Hub's MoE releases list their routers


def build(family: str, directory, dtype=torch.float32, seed: int = 0, config: dict | None = None, **save_kwargs):
    """Save a random `family` checkpoint (its config updated by `config`) to `directory`; return the torch model
    (float32, eval). An FP8_FAMILIES name: the base family's checkpoint quantized, and transformers' model of it."""
    if family in FP8_FAMILIES:
        base, block = FP8_FAMILIES[family]
        build(base, directory, dtype, seed, config, **save_kwargs)
        if isinstance(block, str):
            return compress_fp8(Path(directory), block, static=family.endswith("static"))
        return quantize_fp8(Path(directory), block)
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**COMMON, **extra, **(config or {})})).eval()
    # Norms at 0 (Gemma's scale by 1 + w) or 1, biases at 0: make each one matter.
    if family.startswith(("gemma", "olmo", "cohere", "starcoder", "glm", "phi", "seed", "ministral", "helium",
                          "ernie", "arcee", "exaone", "hunyuan", "gpt", "minimax", "apertus",
                          "deepseek", "dots")):
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "norm" in name:
                    weight.normal_(0.0, 0.5)
    with torch.no_grad():  # transformers starts the projections' biases at 0: draw them, so that each one matters
        for name, weight in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                weight.normal_(0.0, 0.1)
            elif name.endswith("sinks"):  # gpt-oss's: as large as the attention logits, so that each one matters
                weight.normal_(0.0, 1.0)
            elif ".act_fn.alpha" in name:  # Apertus's xIELU: each layer's own slopes
                weight.normal_(0.0, 0.5)
        for name, buffer in model.named_buffers():  # MiniMax-M2's router correction: as large as the scores' spread
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None  # greedy parity runs the full length
    model.to(dtype).save_pretrained(directory, **save_kwargs)
    return model.float()


def quantize_fp8(directory: Path, block: tuple[int, int] | None, skip=tuple(FP8_SKIP)) -> torch.nn.Module:
    """Quantize a checkpoint's projections in place as transformers writes fp8 checkpoints (float8_e4m3fn values,
    a float32 `weight_scale_inv` per block); return transformers' float32 model loaded from it (dequantized)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": None if block is None else list(block),
                                     "modules_to_not_convert": list(skip)}
    quantizer = type("Quantizer", (), {"quantization_config": transformers.FineGrainedFP8Config(
        weight_block_size=block, modules_to_not_convert=list(skip))})()
    tensors = {}
    for key, value in load_file(directory / "model.safetensors").items():
        module = key.removesuffix(".weight")
        projection = key.endswith(".weight") and value.ndim == 2 and "embed" not in key and "norm" not in key
        if projection and transformers.quantizers.quantizers_utils.should_convert_module(module, list(skip)):
            tensors.update(Fp8Quantize(quantizer).convert({key: value}))
        else:
            tensors[key] = value
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def compress_fp8(directory: Path, strategy: str, block: tuple[int, int] | None = None,
                 ignore=("lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"), static: bool = False):
    """Rewrite a checkpoint's projections in place as llm-compressor's compressed-tensors fp8 checkpoints hold
    them (float8_e4m3fn values, a float32 `weight_scale` per tensor, output channel or block; with `static`, an
    `input_scale` per projection too); return transformers' float32 model of it, dequantized by the
    compressed-tensors library."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               **({"block_structure": list(block)} if block else {})}
    inputs = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
              "strategy": "tensor" if static else "token"}
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}},
        "ignore": list(ignore)}
    tensors = {}
    for key, value in load_file(directory / "model.safetensors").items():
        module = key.removesuffix(".weight")
        skipped = any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in ignore)
        if not key.endswith(".weight") or value.ndim != 2 or "embed" in key or "norm" in key or skipped:
            tensors[key] = value
            continue
        scale = _fp8_scales(value, strategy, block)
        full = scale.repeat_interleave(block[0], 0)[:value.shape[0]].repeat_interleave(block[1], 1) if block \
            else scale
        tensors[key] = (value / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[module + ".weight_scale"] = scale
        if static:
            tensors[module + ".input_scale"] = value.abs().amax().reshape(1) / 100
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()


def _fp8_scales(w: torch.Tensor, strategy: str, block) -> torch.Tensor:
    """Each scale's largest magnitude over fp8's largest: one per tensor [1], output channel [out, 1], or block."""
    if strategy == "tensor":
        return (w.abs().amax() / 448).reshape(1)
    if strategy == "channel":
        return w.abs().amax(dim=1, keepdim=True) / 448
    rows, cols = block
    padded = torch.nn.functional.pad(w, (0, 0, 0, -w.shape[0] % rows))
    return padded.abs().reshape(-1, rows, w.shape[1] // cols, cols).amax(dim=(1, 3)) / 448


def scored_in_chunks(llm, prompt: np.ndarray, chunk: int) -> np.ndarray:
    """Our prompt logits, the prompt prefilled `chunk` tokens at a time into 5 pages (fewer if the context is
    shorter) per KV cache group of scattered, descending ids (the pages go back to the pool after)."""
    groups, width = llm.runner.groups, llm.engine_config.pages_per_seq
    count = min(5, width)
    pages = llm.engine.scheduler.pages.allocate(count * groups)
    table = np.zeros((groups, width), np.int32)
    table[:, :count] = np.reshape(pages[::-1], (groups, count))
    try:
        return np.concatenate([llm.runner.score(prompt[s:s + chunk], s, table) for s in range(0, len(prompt), chunk)])
    finally:
        llm.engine.scheduler.pages.free(pages)


def random_prompts(vocab: int, lengths, seed: int = 7) -> list[list[int]]:
    """Token-id prompts of the given lengths (ids from 3: past bos and eos)."""
    rng = np.random.RandomState(seed)
    return [rng.randint(3, vocab, n).tolist() for n in lengths]
