"""Tiny random Hugging Face checkpoints of every supported family, built with transformers, and our prompt
logits to compare with theirs.

Weights use std ~ 1/sqrt(hidden) rather than HF's 0.02 so greedy decoding varies
and the top-2 logit margins are wide enough to compare tokens exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

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
    # Mixtures of experts: 4 experts of 48, 2 a token (Mixtral renormalises their weights; Qwen3-MoE as
    # norm_topk_prob says; Qwen2-MoE adds a gated shared expert and q/k/v biases).
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    shared_expert_intermediate_size=80)),
    "olmoe": (transformers.OlmoeConfig, dict(num_experts=4, num_experts_per_tok=2, intermediate_size=48,
                                             pad_token_id=0)),  # q and k normed over all heads, as OLMo 2's
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    norm_topk_prob=True, head_dim=16)),
}


def build(family: str, directory, dtype=torch.float32, seed: int = 0, config: dict | None = None, **save_kwargs):
    """Save a random `family` checkpoint (its config updated by `config`) to `directory`; return the torch model
    (float32, eval)."""
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**COMMON, **extra, **(config or {})})).eval()
    # Norms at 0 (Gemma's scale by 1 + w) or 1, biases at 0: make each one matter.
    if family.startswith(("gemma", "olmo", "cohere", "starcoder", "glm", "phi")):
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "norm" in name:
                    weight.normal_(0.0, 0.5)
    with torch.no_grad():  # transformers starts the projections' biases at 0: draw them, so that each one matters
        for name, weight in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name:
                weight.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None  # greedy parity runs the full length
    model.to(dtype).save_pretrained(directory, **save_kwargs)
    return model.float()


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
