"""Frozen configuration dataclasses.

`ModelConfig` is an explicit mapping of a Hugging Face `config.json` for the
Llama family (Llama 2/3/3.1/3.2, Mistral, Ministral, Qwen2/2.5, Qwen3, Phi-2, Phi-3/Phi-4, Granite 3, Gemma 1/2/3,
SmolLM3, OLMo 2/3, Cohere 1/2, StarCoder 2, GLM-4, Seed-OSS, Helium, ERNIE 4.5, Arcee, EXAONE 4.0, HunYuan;
the language models of multimodal checkpoints: Gemma 3 4B+, Mistral Small 3.1/3.2, Qwen2/2.5/3-VL) and its
mixture-of-experts kin (Mixtral, Qwen1.5/2-MoE, Qwen3-MoE, OLMoE, GraniteMoE), with fp8 weights where a checkpoint
has them. `EngineConfig` holds the serving knobs (slots, pages, chunking, dtype). Host code only: this module must
not import JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
OLMO_MODEL_TYPES = ("olmo2", "olmo3")
COHERE_MODEL_TYPES = ("cohere", "cohere2")
GLM_MODEL_TYPES = ("glm", "glm4")
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "granite", "smollm3", "starcoder2",
                     "seed_oss", "ministral", "helium", "arcee", "exaone4", "ernie4_5", "hunyuan_v1_dense",
                     "apertus") + \
    GEMMA_MODEL_TYPES + OLMO_MODEL_TYPES + COHERE_MODEL_TYPES + GLM_MODEL_TYPES
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")  # multi-head latent attention
# the families whose experts' width is `moe_intermediate_size` (the others': `intermediate_size`)
MOE_WIDTH_FIELD = ("qwen2_moe", "qwen3_moe", "glm4_moe", "ernie4_5_moe", "dots1") + MLA_MODEL_TYPES
FUSED_PROJECTIONS = ("phi3",)  # q/k/v in one checkpoint tensor, the MLP's gate and up in another
FUSED_GATE_UP = GLM_MODEL_TYPES  # the MLP's gate and up in one checkpoint tensor
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss", "minimax_m2",
                   "hunyuan_v1_moe", "glm4_moe", "ernie4_5_moe", "deepseek_v2", "deepseek_v3", "glm4_moe_lite",
                   "dots1")
SUPPORTED_MODEL_TYPES = DENSE_MODEL_TYPES + MOE_MODEL_TYPES
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "ntk_alpha")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "relu2")  # relu2: relu(x) ** 2 (Arcee's)
# Activations with weights of their own in each layer, for the families whose checkpoints carry them
FAMILY_ACTIVATIONS = {"apertus": ("xielu",),  # xIELU (Apertus): learned alpha_p, alpha_n, beta, eps
                      "gpt_oss": ("swigluoai",)}  # gpt-oss's clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`)
# transformers' class defaults where head_dim is absent; else hidden / heads
DEFAULT_HEAD_DIM = {"qwen3": 128, "qwen3_moe": 128, "seed_oss": 128, "helium": 128, "ernie4_5": 128}
# transformers' class defaults where rms_norm_eps is absent; else 1e-6
RMS_NORM_EPS_DEFAULTS = {"phi3": 1e-5, "mixtral": 1e-5, "olmo2": 1e-5, "olmo3": 1e-5, "olmoe": 1e-5, "cohere": 1e-5,
                         "cohere2": 1e-5, "starcoder2": 1e-5, "phi": 1e-5, "helium": 1e-8, "arcee": 1e-5,
                         "exaone4": 1e-5, "ernie4_5": 1e-5, "glm4_moe": 1e-5, "ernie4_5_moe": 1e-5,
                         "glm4_moe_lite": 1e-5,
                         "apertus": 1e-5}  # Cohere's, StarCoder 2's, Phi-2's LayerNorm
NORM_EPS_FIELD = {"cohere": "layer_norm_eps", "cohere2": "layer_norm_eps", "starcoder2": "norm_epsilon",
                  "phi": "layer_norm_eps"}
# ... and rope_theta's, where a config names none; else 10,000
ROPE_THETA_DEFAULTS = {"mixtral": 1e6, "smollm3": 2e6, "helium": 1e5, "ernie4_5": 5e5, "ernie4_5_moe": 5e5,
                       "gpt_oss": 1.5e5, "apertus": 1.2e7}
# ... and partial_rotary_factor's (GLM's classes turn half of each head); else 1
PARTIAL_ROTARY_DEFAULTS = {"glm": 0.5, "glm4": 0.5, "glm4_moe": 0.5}
# transformers' Gemma3TextConfig defaults: the Hub's multimodal Gemma 3 configs (4B and up) give their
# text_config only the fields that differ.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1,
    "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1e6,
    "rope_local_base_freq": 1e4}


class ConfigError(ValueError):
    """A checkpoint config that jaxinfer cannot serve, with the reason."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    beta_fast: float = 32.0  # yarn: rotations past which a frequency is kept (extrapolated)
    beta_slow: float = 1.0  # yarn: rotations under which a frequency is divided by `factor` (interpolated)
    truncate: bool = True  # yarn: the ramp between the two starts and ends on whole dimensions
    attention_factor: float = 1.0  # yarn, longrope: cos and sin are scaled by it (so attention logits by its square)
    partial_rotary_factor: float = 1.0  # the share of each head's dimensions RoPE rotates (the first ones)
    short_factor: tuple[float, ...] = ()  # longrope: each frequency's divisor for contexts up to the pretraining's,
    long_factor: tuple[float, ...] = ()  # ... and beyond it
    long: bool = False  # longrope: the long factors are in use (`ModelConfig.for_context`)
    alpha: float = 1.0  # ntk_alpha (HunYuan's "dynamic" with a fixed alpha): theta times alpha ** (R / (R - 2))

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """A checkpoint's fp8 weights: each linear projection is float8_e4m3fn values and a float32 scale per block of
    `block` (rows of its out dimension, columns of its in dimension; None: the whole dimension), value x scale
    being the weight. Two formats: quant_method "fp8" (transformers' FineGrainedFP8Config: Qwen3's and DeepSeek's
    -FP8 releases; scales `weight_scale_inv`) and "compressed-tensors" (llm-compressor's float-quantized
    checkpoints, vLLM's -FP8 and -FP8-dynamic: scales `weight_scale`, per tensor, channel or block). Embeddings, the
    LM head, routers and the modules `skip` matches (modules_to_not_convert, or compressed-tensors' `ignore`)
    stay unquantized. Activations stay in the model's dtype (W8A16): a checkpoint's static activation scales
    (`input_scales`) are left unread."""

    block: tuple[int | None, int | None] = (128, 128)
    skip: tuple[str, ...] = ()  # patterns as transformers matches modules_to_not_convert (weights.py)
    method: str = "fp8"  # the checkpoint's quant_method
    input_scales: bool = False  # compressed-tensors: each projection has an `input_scale` (static activations)

    @property
    def scale_key(self) -> str:
        """The suffix of a projection's scale tensor in the checkpoint, in place of `weight`."""
        return "weight_scale_inv" if self.method == "fp8" else "weight_scale"

    def describe(self) -> str:
        rows, cols = self.block
        return "per tensor" if self.block == (None, None) else "per channel" if self.block == (1, None) else \
            f"blocks of {rows or 'all'} x {cols or 'all'}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of one decoder-only transformer of the Llama family."""

    model_type: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F: the MLP's width; in a mixture-of-experts model, each expert's
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    qk_norm_over_heads: bool = False  # q and k normed over all their heads at once (OLMo), not head by head
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # the checkpoint's stored dtype
    num_experts: int = 0  # X: routed experts in every layer's MLP (0: a dense MLP)
    experts_per_token: int = 0  # each token's output sums its top experts' (of the router's softmax)
    norm_topk_prob: bool = False  # the chosen experts' weights renormalised to sum to one
    shared_expert_size: int = 0  # width of an expert every token also runs, gated by a sigmoid (Qwen2-MoE)
    shared_expert_gated: bool = True  # False: the shared expert's output is added as it is (HunYuan-MoE's)
    router_logits_f32: bool = False  # the router's logits stay float32 (HunYuan-MoE's router is float32)
    # Granite's scalings: of the embeddings, of each sublayer's output before the residual sum, the attention
    # logits' (None: 1 / sqrt(head_dim)), and the divisor of the final logits. Gemma's embeddings are times
    # sqrt(hidden_size), its attention logits (Gemma 2/3) over sqrt(query_pre_attn_scalar).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    activation: str = "silu"  # of the MLP's gate: one of SUPPORTED_ACTIVATIONS
    # Gemma's: RMSNorm scales by 1 + weight, in float32; Gemma 2/3 also norm each sublayer's output, cap
    # attention and final logits at +-cap by cap * tanh(x / cap), and interleave sliding-window layers with
    # global ones, Gemma 3 giving those its own RoPE. OLMo 2/3 norm each sublayer's output but not its input.
    norm_plus_one: bool = False
    norm_scale_f32: bool = False  # the norm's weight multiplies in float32, then rounds (Gemma, OLMo); Llama's after
    pre_norms: bool = True  # each sublayer's input is normed
    post_norms: bool = False  # each sublayer's output is normed before the residual sum
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_layers: tuple[bool, ...] = ()  # the layers that attend through `sliding_window`; (): every layer
    local_rope: RopeConfig | None = None  # the sliding layers' RoPE, where it is not `rope`
    rope_layers: tuple[bool, ...] = ()  # the layers whose q and k RoPE rotates (SmolLM3 skips every 4th); (): all
    # Cohere's (Command R, R7B, A): LayerNorm (centred, no bias; in float32) for RMSNorm, attention and MLP reading
    # one normed input side by side (one norm a layer), and RoPE turning adjacent pairs of a head's dimensions
    # (GPT-J's) rather than its two halves.
    layer_norm: bool = False
    parallel_block: bool = False
    rope_interleaved: bool = False
    # StarCoder 2's: LayerNorms with a bias, an MLP of two projections (act(y W_up + b_up) W_down + b_down) rather
    # than a gated one, with biases as its attention has them.
    norm_bias: bool = False
    gated_mlp: bool = True
    mlp_bias: bool = False
    lm_head_bias: bool = False  # Phi-2's: the logits' own bias
    qk_norm_after_rope: bool = False  # HunYuan's: q and k RoPE-turned, then normed
    # gpt-oss's: a learned logit per query head in each attention softmax ("sinks"), biases on the router and on
    # every expert's projections, and its experts' clamped SwiGLU (activation "swigluoai": gate clamped above at
    # `swiglu_limit`, up within +-limit, (up + 1) * gate * sigmoid(alpha * gate))
    attn_sinks: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # MiniMax-M2's (and DeepSeek-V3's) routing: experts chosen by sigmoid scores plus a fixed correction bias per
    # expert, weighed by their sigmoid scores alone ("sigmoid"; "softmax": the softmax's top, the rest's)
    router_scoring: str = "softmax"
    router_correction: bool = False  # chosen by score plus a per-expert bias (MiniMax-M2, GLM-4.5, DeepSeek, ERNIE)
    # GLM-4.5's (and DeepSeek-V3's): the experts split in `router_groups` groups, a token choosing among those of its
    # `router_topk_groups` best groups only (a group scored by its two best choices); the chosen experts' weights
    # times `routed_scaling`
    router_groups: int = 1
    router_topk_groups: int = 1
    router_group_score: str = "top2"  # a group's score: its two best experts' sum ("max": its best, DeepSeek-V2's)
    routed_scaling: float = 1.0
    # The first `dense_layers` layers have a dense MLP of `dense_intermediate_size` in place of the experts (GLM-4.5's
    # first_k_dense_replace, Qwen-MoE's mlp_only_layers when they lead): scanned as a stack of their own
    dense_layers: int = 0
    dense_intermediate_size: int = 0
    mtp_layers: int = 0  # the checkpoint's multi-token-prediction layers after the last: their tensors not loaded
    # DeepSeek-V3's multi-head latent attention (MLA; 0: none): q through a rank-`q_lora_rank` projection (0: straight
    # from the hidden state), keys and values from a normed `kv_lora_rank` latent plus `qk_rope_dim` RoPE'd dims
    # shared by every head. The pool holds the latent and the RoPE'd key as one KV head of head_dim =
    # kv_lora_rank + qk_rope_dim; each head's q is taken into the latent (its key part of kv_b_proj absorbed) and
    # its output out of it (the value part), so attention is multi-query over the latent.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_dim: int = 0  # each head's q/k dims without RoPE
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    vision_tower: bool = False  # the checkpoint is multimodal: its vision tower's tensors are left unread
    weight_quant: WeightQuant | None = None  # fp8 projections (None: every weight in `dtype`)
    mxfp4: bool = False  # the checkpoint's experts are MXFP4 (gpt-oss's): held so, widened inside the layer scan
    fused_experts: bool = False  # Qwen3-VL-MoE's: every layer's experts in one gate_up_proj and one down_proj

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def max_length(self) -> int:
        return self.longest_context[0]

    @property
    def longest_context(self) -> tuple[int, str]:
        """The longest context the model serves, as vLLM derives it, and where it comes from: with yarn scaling
        its pretraining length times its factor, with linear scaling max_position_embeddings times the factor,
        else max_position_embeddings."""
        if self.rope.kind == "yarn":
            return (int(self.rope.original_max_position * self.rope.factor),
                    f"yarn's original_max_position_embeddings={self.rope.original_max_position} x "
                    f"factor={self.rope.factor:g}")
        if self.rope.kind == "linear":
            return (int(self.max_position_embeddings * self.rope.factor),
                    f"max_position_embeddings={self.max_position_embeddings} x linear factor={self.rope.factor:g}")
        return self.max_position_embeddings, f"max_position_embeddings={self.max_position_embeddings}"

    def for_context(self, max_model_len: int) -> "ModelConfig":
        """The model as an engine of `max_model_len` runs it: LongRoPE's long factors where the context may pass
        the pretraining length, its short ones where it may not, for every sequence alike (vLLM's choice since
        its #27431; transformers switches by the length of each forward pass)."""
        if self.rope.kind != "longrope":
            return self
        return dataclasses.replace(self, rope=dataclasses.replace(
            self.rope, long=max_model_len > self.rope.original_max_position))

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None for one that attends to the whole context."""
        return self.sliding_window if not self.sliding_layers or self.sliding_layers[layer] else None

    @property
    def mlp_field(self) -> str:
        """The config.json field of `intermediate_size` (the Qwen MoEs name their experts' width apart)."""
        return "moe_intermediate_size" if self.model_type in MOE_WIDTH_FIELD else "intermediate_size"

    @property
    def mlp_width(self) -> int:
        """Activations a token holds in its MLP: the dense mixture of experts computes all of theirs."""
        return max(self.intermediate_size * max(self.num_experts, 1) + self.shared_expert_size,
                   self.dense_intermediate_size)

    def dense_part(self) -> "ModelConfig":
        """The model of the leading dense-MLP layers (`dense_layers`): the same attention, a dense MLP."""
        return dataclasses.replace(self, num_experts=0, experts_per_token=0,
                                   intermediate_size=self.dense_intermediate_size, shared_expert_size=0,
                                   router_scoring="softmax", router_groups=1, router_topk_groups=1,
                                   router_group_score="top2", routed_scaling=1.0,
                                   dense_layers=0, dense_intermediate_size=0,
                                   router_bias=False, expert_bias=False, mxfp4=False, fused_experts=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.experts_per_token} must be between 1 and the "
                              f"{self.num_experts} experts")
        if self.num_experts % self.router_groups or not 1 <= self.router_topk_groups <= self.router_groups or \
                self.experts_per_token > self.router_topk_groups * (self.num_experts // self.router_groups):
            raise ConfigError(f"n_group={self.router_groups} and topk_group={self.router_topk_groups} do not fit "
                              f"{self.num_experts} experts, {self.experts_per_token} a token: the groups must split "
                              "the experts evenly and the chosen groups hold at least the experts chosen")
        if not 0 <= self.dense_layers < self.num_layers:
            raise ConfigError(f"{self.dense_layers} leading dense layers leave no mixture-of-experts layer of the "
                              f"{self.num_layers}")
        rotated = self.rope.rotary_dim(self.head_dim)
        if rotated < 2 or rotated % 2:
            raise ConfigError(f"RoPE would rotate {rotated} of the {self.head_dim} head dimensions "
                              f"(partial_rotary_factor={self.rope.partial_rotary_factor}): it needs an even number")
        for name in ("short_factor", "long_factor"):
            factors = getattr(self.rope, name)
            if self.rope.kind == "longrope" and len(factors) != rotated // 2:
                raise ConfigError(f"longrope's {name} has {len(factors)} entries; the {rotated} rotated head "
                                  f"dimensions need {rotated // 2}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Map a parsed Hugging Face config.json; fails naming what is missing or unsupported."""
        vision_tower = hf.get("model_type") in MULTIMODAL_LANGUAGE_MODELS
        fused_experts = hf.get("model_type") == "qwen3_vl_moe"  # its experts in one tensor a layer
        hf = _language_model(hf)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; jaxinfer supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        quantization = hf.get("quantization_config")
        mxfp4 = isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"
        if mxfp4 and model_type != "gpt_oss":
            raise ConfigError(f"MXFP4 checkpoints are supported for gpt_oss's experts only, not {model_type}")
        weight_quant = None if mxfp4 else _weight_quant(quantization)
        get = _field_getter(hf, model_type)
        act = _activation(hf, model_type)
        if act not in SUPPORTED_ACTIVATIONS + FAMILY_ACTIVATIONS.get(model_type, ()):
            raise ConfigError(f"unsupported hidden_act {act!r} for {model_type}; supported: "
                              f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if hf.get("mlp_bias") and model_type != "arcee":  # Arcee's MLP has no gate: our two-projection MLP's biases
            raise ConfigError("mlp_bias=true is not supported (no released Llama-family model uses it)")
        if model_type in ("ernie4_5", "ernie4_5_moe") and hf.get("use_bias"):
            raise ConfigError(f"{model_type} with use_bias=true is not supported (biases on a gated MLP; no released "
                              "ERNIE 4.5 model uses them)")
        num_heads = get("num_attention_heads")
        hidden = get("hidden_size")
        head_dim = hf.get("head_dim") or DEFAULT_HEAD_DIM.get(model_type) or hidden // num_heads
        kv_heads = hf.get("num_key_value_heads") or num_heads
        if model_type in MLA_MODEL_TYPES:  # the pool's one head: the latent and the RoPE'd key
            head_dim, kv_heads = get("kv_lora_rank") + get("qk_rope_head_dim"), 1
        attention_bias = bool(hf.get("use_bias", True) if model_type == "starcoder2"  # StarCoder 2: biases everywhere
                              else model_type == "phi" or
                              hf.get("attention_bias", model_type in GLM_MODEL_TYPES + ("seed_oss", "gpt_oss")))
        moe = _moe_from_hf(hf, model_type, get)
        rope = _rope_from_hf(_layer_rope(hf, "full_attention") if model_type in LAYER_TYPE_ROPES else hf)
        if model_type == "minimax_m2" and hf.get("rotary_dim") and rope.partial_rotary_factor == 1.0:
            rope = dataclasses.replace(rope, partial_rotary_factor=hf["rotary_dim"] / head_dim)  # its older field
        if rope.partial_rotary_factor != 1.0 and \
                model_type not in ("phi", "phi3", "minimax_m2", "glm4_moe") + GLM_MODEL_TYPES:
            raise ConfigError(f"partial_rotary_factor={rope.partial_rotary_factor} is not supported for "
                              f"{model_type}: only Phi-2's, Phi-4-mini's, GLM's and MiniMax-M2's turn part of each "
                              "head")
        return cls(
            **_family_fields(hf, model_type, get),
            activation=act,
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=moe.pop("intermediate_size", None) or get("intermediate_size"),
            **moe,
            num_layers=get("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=get("max_position_embeddings"),
            rms_norm_eps=float(hf.get(NORM_EPS_FIELD.get(model_type, "rms_norm_eps"),
                                      RMS_NORM_EPS_DEFAULTS.get(model_type, 1e-6))),
            rope=rope,
            # Gemma's, SmolLM3's, Cohere's and StarCoder 2's classes tie them unless told otherwise; the others do not.
            tie_word_embeddings=bool(hf.get("tie_word_embeddings",
                                            model_type in GEMMA_MODEL_TYPES + COHERE_MODEL_TYPES +
                                            ("smollm3", "starcoder2", "ernie4_5", "ernie4_5_moe"))),
            # Qwen2 always has q/k/v biases and no o bias, Qwen2-MoE as `qkv_bias` says (true unless sent);
            # the others follow attention_bias.
            qkv_bias=(model_type == "qwen2" or attention_bias if model_type != "qwen2_moe"
                      else bool(hf.get("qkv_bias", True))),
            # Seed-OSS: `attention_out_bias` apart; Helium's o_proj never has one.
            o_bias=bool(hf.get("attention_out_bias")) if model_type == "seed_oss" else
            model_type not in ("qwen2", "qwen2_moe", "helium", "glm4_moe") + GLM_MODEL_TYPES and attention_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text", "olmoe", "exaone4", "hunyuan_v1_dense",
                                   "hunyuan_v1_moe", "minimax_m2", "apertus", "dots1") +
            OLMO_MODEL_TYPES or
            (model_type in ("cohere", "glm4_moe") and bool(hf.get("use_qk_norm"))),
            sliding_window=_sliding_window(hf, model_type),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            vision_tower=vision_tower,
            weight_quant=weight_quant,
            mxfp4=mxfp4,
            fused_experts=fused_experts,
        )

    @classmethod
    def from_json(cls, path: str | Path, overrides: dict | None = None) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e
        return cls.from_hf(with_overrides(hf, overrides or {}))

    def to_hf(self) -> dict[str, Any]:
        """The config.json a Hugging Face loader reads back to this config."""
        hf = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.activation,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": None,  # else Phi-3's class default, 32000, which a small vocabulary lacks
            "torch_dtype": self.dtype,
        }
        if self.model_type == "qwen2_moe":
            hf["qkv_bias"] = self.qkv_bias
        elif self.model_type != "qwen2":
            hf["attention_bias"] = self.qkv_bias
        hf.update(_moe_to_hf(self))
        if self.rope.kind != "default":
            hf["rope_scaling"] = _rope_to_hf(self.rope)
        if self.rope.kind == "longrope":
            hf["original_max_position_embeddings"] = self.rope.original_max_position
        if self.rope.partial_rotary_factor != 1.0:
            hf["partial_rotary_factor"] = self.rope.partial_rotary_factor
        if self.sliding_window is not None:
            hf["sliding_window"] = self.sliding_window
            hf["use_sliding_window"] = True
        hf.update(_family_to_hf(self))
        if self.weight_quant is not None:
            hf["quantization_config"] = _weight_quant_to_hf(self.weight_quant)
        if self.mxfp4:
            hf["quantization_config"] = {"quant_method": "mxfp4"}
        return hf


HF_OVERRIDES_HELP = "JSON object laid over the checkpoint's config.json, as vLLM's, e.g. " \
                    "'{\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0, " \
                    "\"original_max_position_embeddings\": 32768}}' (with --max-model-len up to 131072)"


def json_object_arg(text: str) -> dict:
    """An argparse type: a flag whose value is a JSON object (`--hf-overrides`, `--structured-outputs-config`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r:.80}")
    return value


def with_overrides(hf: dict, overrides: dict) -> dict:
    """config.json with vLLM's `--hf-overrides` laid over it, field by field. A `rope_scaling` given there
    replaces the scaling of a config that transformers 5 wrote as `rope_parameters` (keeping its rope_theta),
    as it would in the 4.x spelling."""
    merged = {**hf, **overrides}
    if "rope_scaling" in overrides and "rope_parameters" in hf and "rope_parameters" not in overrides:
        params = hf["rope_parameters"] or {}
        layers = "full_attention" in params  # Gemma 3's, by layer type: a scaling is the global layers'
        theta = (params["full_attention"] if layers else params).get("rope_theta")
        scaled = {**({} if theta is None else {"rope_theta": theta}), **(overrides["rope_scaling"] or {})}
        merged["rope_parameters"] = {**params, "full_attention": scaled} if layers else scaled
    return merged


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM",
                  "granite": "GraniteForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                  "olmo3": "Olmo3ForCausalLM", "olmoe": "OlmoeForCausalLM", "cohere": "CohereForCausalLM",
                  "cohere2": "Cohere2ForCausalLM", "starcoder2": "Starcoder2ForCausalLM", "glm": "GlmForCausalLM",
                  "glm4": "Glm4ForCausalLM", "phi": "PhiForCausalLM", "seed_oss": "SeedOssForCausalLM",
                  "ministral": "MinistralForCausalLM", "helium": "HeliumForCausalLM", "arcee": "ArceeForCausalLM",
                  "exaone4": "Exaone4ForCausalLM", "ernie4_5": "Ernie4_5ForCausalLM",
                  "granitemoe": "GraniteMoeForCausalLM", "hunyuan_v1_dense": "HunYuanDenseV1ForCausalLM",
                  "gpt_oss": "GptOssForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM",
                  "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM", "apertus": "ApertusForCausalLM",
                  "glm4_moe": "Glm4MoeForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
                  "deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM",
                  "deepseek_v2": "DeepseekV2ForCausalLM", "dots1": "Dots1ForCausalLM"}


def _moe_from_hf(hf: dict, model_type: str, get) -> dict:
    """The expert fields of a mixture-of-experts config. Mixtral's experts are `intermediate_size` wide and
    their weights always renormalised; the Qwen MoEs name the width `moe_intermediate_size` (OLMoE keeps
    `intermediate_size`), and every layer must be sparse (the layers are scanned as one stack)."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    if model_type == "hunyuan_v1_moe":
        return _hunyuan_moe_from_hf(hf, get)
    if model_type in _NOAUX_DEFAULTS:
        return _glm4_moe_from_hf(hf, get, model_type)
    if model_type == "ernie4_5_moe":
        return _ernie_moe_from_hf(hf, get)
    if model_type == "deepseek_v2":
        return _deepseek_v2_moe_from_hf(hf, get)
    if model_type == "minimax_m2" and hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"minimax_m2 with scoring_func={hf['scoring_func']!r} is not supported (only sigmoid)")
    # Always renormalised: GraniteMoE's and gpt-oss's softmax over the top logits is the renormalised softmax;
    # MiniMax-M2 renormalises its sigmoid scores.
    if model_type in ("mixtral", "granitemoe", "gpt_oss", "minimax_m2"):
        return dict(num_experts=get("num_local_experts"), experts_per_token=get("num_experts_per_tok"),
                    norm_topk_prob=True, router_scoring="sigmoid" if model_type == "minimax_m2" else "softmax",
                    router_correction=model_type == "minimax_m2")
    step, dense_layers = hf.get("decoder_sparse_step", 1), sorted(hf.get("mlp_only_layers") or [])
    if step != 1 or dense_layers != list(range(len(dense_layers))):
        raise ConfigError(f"{model_type} with dense MLP layers among the sparse ones (decoder_sparse_step={step}, "
                          f"mlp_only_layers={dense_layers}) is not supported: dense layers must lead (layers 0 to "
                          "k - 1), the rest be mixtures of experts")
    experts = hf.get("num_experts") or hf.get("num_local_experts")  # transformers 5 writes the second
    if not experts:
        raise ConfigError(f"config.json for model_type {model_type!r} is missing required field 'num_experts'")
    fields = dict(intermediate_size=get("intermediate_size" if model_type == "olmoe" else "moe_intermediate_size"),
                  num_experts=experts,
                  experts_per_token=get("num_experts_per_tok"), norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    if model_type == "qwen2_moe":
        fields["shared_expert_size"] = get("shared_expert_intermediate_size")
    if dense_layers:  # Qwen's dense layers are `intermediate_size` wide
        fields.update(dense_layers=len(dense_layers), dense_intermediate_size=get("intermediate_size"))
    return fields


def _deepseek_v2_moe_from_hf(hf: dict, get) -> dict:
    """DeepSeek-V2 (and -Lite)'s experts as transformers' DeepseekV2TopkRouter chooses them: by softmax weight (in
    float32), all experts ("greedy") or within the best `topk_group` of `n_group` groups, a group scored by its best
    ("group_limited_greedy"); weighed by their softmax weights times `routed_scaling_factor`, never renormalised
    (transformers reads no norm_topk_prob for V2); `n_shared_experts` ungated shared experts; the first
    `first_k_dense_replace` layers dense."""
    method, width = hf.get("topk_method") or "greedy", get("moe_intermediate_size")
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"deepseek_v2 with topk_method={method!r} is not supported (greedy, group_limited_greedy)")
    grouped, dense = method == "group_limited_greedy", hf.get("first_k_dense_replace", 0)
    return dict(intermediate_size=width, num_experts=get("n_routed_experts"),
                experts_per_token=get("num_experts_per_tok"), norm_topk_prob=False,
                shared_expert_size=width * hf.get("n_shared_experts", 2), shared_expert_gated=False,
                router_logits_f32=True, router_groups=get("n_group") if grouped else 1,
                router_topk_groups=get("topk_group") if grouped else 1, router_group_score="max",
                routed_scaling=float(hf.get("routed_scaling_factor", 1.0)), dense_layers=dense,
                dense_intermediate_size=get("intermediate_size") if dense else 0)


def _leading_dense(types: list[str]) -> int:
    """How many layers of `mlp_layer_types` ("dense" / "sparse") lead densely; only leading ones are supported."""
    dense = types.index("sparse") if "sparse" in types else len(types)
    if set(types) - {"dense", "sparse"} or "dense" in types[dense:]:
        raise ConfigError(f"mlp_layer_types {types} is not supported: dense layers must lead, the rest be sparse")
    return dense


def _ernie_moe_from_hf(hf: dict, get) -> dict:
    """ERNIE 4.5 MoE (21B-A3B, 300B-A47B): layer i is sparse when (i + 1) % moe_layer_interval == 0 and it lies in
    [moe_layer_start_index, moe_layer_end_index] (-1: the last), which must make the dense layers lead; `moe_k` of
    `moe_num_experts` chosen by softmax weight plus a correction bias, weighed by their softmax weights renormalised;
    `moe_num_shared_experts` ungated shared experts as one MLP; the router in float32. Its multi-token-prediction
    tensors (`mtp*`) are not loaded."""
    layers, interval = get("num_hidden_layers"), hf.get("moe_layer_interval", 1)
    start, end = hf.get("moe_layer_start_index", 1), hf.get("moe_layer_end_index", -1)
    end = layers - 1 if end == -1 else end
    sparse = [i for i in range(layers) if (i + 1) % interval == 0 and start <= i <= end]
    if not sparse or sparse != list(range(sparse[0], layers)):
        raise ConfigError(f"ernie4_5_moe with moe_layer_start_index={start}, moe_layer_end_index={end} and "
                          f"moe_layer_interval={interval} is not supported: the mixture-of-experts layers must be the "
                          "last ones, after any dense layers")
    width = get("moe_intermediate_size")
    return dict(intermediate_size=width, num_experts=get("moe_num_experts"), experts_per_token=get("moe_k"),
                norm_topk_prob=True, shared_expert_size=width * hf.get("moe_num_shared_experts", 2),
                shared_expert_gated=False, router_correction=True, router_logits_f32=True, dense_layers=sparse[0],
                dense_intermediate_size=get("intermediate_size") if sparse[0] else 0)


# transformers' defaults of the noaux_tc routers' fields: (first_k_dense_replace, n_group, topk_group,
# routed_scaling_factor, norm_topk_prob)
_NOAUX_DEFAULTS = {"glm4_moe": (1, 1, 1, 1.0, True), "deepseek_v3": (3, 8, 4, 2.5, True),
                   "glm4_moe_lite": (1, 1, 1, 1.8, True), "dots1": (0, 1, 1, 1.0, False)}


def _glm4_moe_from_hf(hf: dict, get, model_type: str) -> dict:
    """GLM-4.5/4.6 (and -Air), and DeepSeek-V3's experts (Kimi K2's, Moonlight's; GLM-4.7-Flash's; dots.llm1's):
    `first_k_dense_replace` leading dense layers of `intermediate_size` (GLM-4.7-Flash: its `mlp_layer_types`), the
    rest `n_routed_experts` experts of `moe_intermediate_size` chosen by sigmoid scores plus a correction bias within
    the best `topk_group` of `n_group` groups (DeepSeek's topk_method "noaux_tc"), weighed by their scores
    (renormalised) times `routed_scaling_factor`, and `n_shared_experts` ungated shared experts as one MLP; the router
    in float32. The checkpoint's multi-token-prediction layers (`num_nextn_predict_layers`, after the last) are not
    loaded."""
    for field, supported in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
        if hf.get(field, supported) != supported:
            raise ConfigError(f"{model_type} with {field}={hf[field]!r} is not supported (only {supported!r})")
    first_dense, groups, topk_groups, scaling, norm = _NOAUX_DEFAULTS[model_type]
    width, dense = get("moe_intermediate_size"), hf.get("first_k_dense_replace", first_dense)
    if model_type == "glm4_moe_lite":
        dense = _leading_dense(hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (get("num_hidden_layers") - 1))
    return dict(intermediate_size=width, num_experts=get("n_routed_experts"),
                experts_per_token=get("num_experts_per_tok"), norm_topk_prob=bool(hf.get("norm_topk_prob", norm)),
                shared_expert_size=width * hf.get("n_shared_experts", 1), shared_expert_gated=False,
                router_scoring="sigmoid", router_correction=True, router_logits_f32=True,
                router_groups=hf.get("n_group", groups) or 1, router_topk_groups=hf.get("topk_group", topk_groups) or 1,
                routed_scaling=float(hf.get("routed_scaling_factor", scaling)),
                dense_layers=dense, dense_intermediate_size=get("intermediate_size") if dense else 0,
                mtp_layers=hf.get("num_nextn_predict_layers", 1) or 0)


def _hunyuan_moe_from_hf(hf: dict, get) -> dict:
    """HunYuan-MoE (Hunyuan-A13B): every layer a mixture of `num_experts` experts of `intermediate_size`, `moe_topk`
    a token (renormalised), and a shared MLP of the same width added ungated; the router in float32. The Hub's
    configs give the counts per layer: they must be one value, as transformers' class reads the first."""
    def uniform(name):
        value = get(name)
        values = set(value) if isinstance(value, list) else {value}
        if len(values) != 1:
            raise ConfigError(f"hunyuan_v1_moe with {name} differing between layers ({sorted(values)}) is not "
                              "supported: every layer must be alike")
        return values.pop()
    return dict(num_experts=uniform("num_experts"), experts_per_token=uniform("moe_topk"), norm_topk_prob=True,
                shared_expert_size=get("intermediate_size"), shared_expert_gated=False, router_logits_f32=True)


def _family_fields(hf: dict, model_type: str, get) -> dict:
    """The fields only some families set: Granite's and Gemma's scalings, SmolLM3's and OLMo's layers."""
    if model_type in ("granite", "granitemoe"):
        return _granite_from_hf(hf)
    if model_type in GEMMA_MODEL_TYPES:
        return _gemma_from_hf(hf, model_type, get)
    if model_type == "smollm3":
        return _smollm3_from_hf(hf, get)
    if model_type in OLMO_MODEL_TYPES + ("olmoe",):
        return _olmo_from_hf(hf, model_type, get)
    if model_type in COHERE_MODEL_TYPES:
        return _cohere_from_hf(hf, model_type, get)
    if model_type == "starcoder2":
        return dict(layer_norm=True, norm_bias=True, gated_mlp=False, mlp_bias=bool(hf.get("use_bias", True)))
    if model_type in GLM_MODEL_TYPES:  # GLM-4: RoPE over adjacent pairs of the first half; GLM-4-0414 post-norms too
        return dict(rope_interleaved=True, post_norms=model_type == "glm4")
    if model_type in ("helium", "ernie4_5", "ernie4_5_moe"):  # RoPE over adjacent pairs; Helium's norm in float32
        return dict(rope_interleaved=True, norm_scale_f32=model_type == "helium")
    if model_type in ("arcee", "apertus"):  # two projections, no gate
        return dict(gated_mlp=False, mlp_bias=bool(hf.get("mlp_bias")))
    if model_type == "ministral":
        types = hf.get("layer_types") or []
        return dict(sliding_layers=tuple(t == "sliding_attention" for t in types)) if hf.get("sliding_window") \
            and "full_attention" in types else {}
    if model_type == "exaone4":
        return _exaone4_from_hf(hf, get)
    if model_type in ("hunyuan_v1_dense", "hunyuan_v1_moe"):  # q and k normed after their RoPE, not before
        return dict(qk_norm_after_rope=True)
    if model_type == "gpt_oss":
        return _gpt_oss_from_hf(hf)
    if model_type in MLA_MODEL_TYPES:
        return _mla_from_hf(hf, get, model_type)
    if model_type == "minimax_m2":  # q and k normed over all heads at once; every layer full attention
        if any(kind != 1 for kind in hf.get("attn_type_list") or []):
            raise ConfigError("minimax_m2 with linear-attention layers (attn_type_list entries other than 1) is not "
                              "supported")
        return dict(qk_norm_over_heads=True)
    if model_type == "phi":
        if hf.get("qk_layernorm"):
            raise ConfigError("phi with qk_layernorm=true is not supported (no released Phi-1/1.5/2 uses it)")
        return dict(layer_norm=True, norm_bias=True, parallel_block=True, gated_mlp=False, mlp_bias=True,
                    lm_head_bias=True)
    return {}


def _mla_from_hf(hf: dict, get, model_type: str) -> dict:
    """DeepSeek-V3's attention fields. Its softmax scale, 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim) (times
    YaRN's mscale squared where the scaling gives `mscale_all_dim`), becomes `attention_multiplier`, since every
    attention path divides by the square root of the pool's head_dim."""
    if hf.get("attention_bias"):
        raise ConfigError(f"{model_type} with attention_bias=true is not supported (no released model uses it)")
    nope, rope = get("qk_nope_head_dim"), get("qk_rope_head_dim")
    scale = (nope + rope) ** -0.5
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if (params.get("rope_type") or params.get("type") or "default") != "default" and params.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"])) ** 2
    return dict(kv_lora_rank=get("kv_lora_rank"), q_lora_rank=hf.get("q_lora_rank") or 0, qk_nope_dim=nope,
                qk_rope_dim=rope, v_head_dim=get("v_head_dim"), attention_multiplier=scale,
                rope_interleaved=bool(hf.get("rope_interleave", True)))


def _mla_to_hf(cfg: "ModelConfig") -> dict:
    """`_mla_from_hf`'s fields; a YaRN softmax scale as the `mscale_all_dim` that gives it."""
    hf = {"kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank or None, "qk_nope_head_dim": cfg.qk_nope_dim,
          "qk_rope_head_dim": cfg.qk_rope_dim, "v_head_dim": cfg.v_head_dim, "rope_interleave": cfg.rope_interleaved,
          "num_key_value_heads": cfg.num_heads}
    mscale = math.sqrt(cfg.attention_multiplier * (cfg.qk_nope_dim + cfg.qk_rope_dim) ** 0.5)
    if cfg.rope.kind == "yarn" and cfg.rope.factor > 1 and abs(mscale - 1) > 1e-12:
        hf["rope_scaling"] = {**_rope_to_hf(cfg.rope),
                              "mscale_all_dim": (mscale - 1) / (0.1 * math.log(cfg.rope.factor))}
    return hf


def _weight_quant(quantization) -> WeightQuant | None:
    """config.json's quantization_config: the fp8 weights we read, or a ConfigError naming what we cannot."""
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method == "compressed-tensors":
        return _compressed_tensors(quantization)
    if method != "fp8":
        raise ConfigError(f"quantized checkpoints of quant_method {method!r} are not supported (only fp8 weights: "
                          "quant_method 'fp8', or 'compressed-tensors' float-quantized); use the unquantized "
                          "float16/bfloat16/float32 weights")
    refused = {"activation_scheme": ("dynamic",), "scale_fmt": ("float",), "expert_dtype": ("fp8",),
               "fmt": ("e4m3", "float8_e4m3fn")}  # two spellings of the one format
    for field, allowed in refused.items():
        value = quantization.get(field, allowed[0])
        if value not in allowed:
            raise ConfigError(f"fp8 checkpoints with {field}={value!r} are not supported (only {allowed[0]!r})")
    if quantization.get("modules_to_convert"):
        raise ConfigError("fp8 checkpoints with modules_to_convert (quantized embeddings) are not supported")
    block = quantization.get("weight_block_size")
    skip = quantization.get("modules_to_not_convert") or quantization.get("ignored_layers") or ()
    return WeightQuant((None, None) if block is None else _block(block, "weight_block_size"), tuple(skip))


def _block(block, field: str) -> tuple[int, int]:
    if not isinstance(block, (list, tuple)) or len(block) != 2 or \
            not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
        raise ConfigError(f"{field} must be two positive integers, got {block!r}")
    return tuple(block)


CT_STRATEGIES = {"tensor": (None, None), "channel": (1, None)}  # compressed-tensors' weight strategies (and block)


def _compressed_tensors(quantization: dict) -> WeightQuant:
    """llm-compressor's fp8 checkpoints: one config group over every Linear, static symmetric 8-bit float weights
    (per tensor, channel or block), activations in 8-bit floats or none."""
    fmt, status = quantization.get("format"), quantization.get("quantization_status", "compressed")
    if fmt != "float-quantized":
        raise ConfigError(f"compressed-tensors checkpoints of format {fmt!r} are not supported (only "
                          "'float-quantized': fp8 weights)")
    if status != "compressed":
        raise ConfigError(f"compressed-tensors checkpoints with quantization_status {status!r} are not supported "
                          "(only 'compressed')")
    if quantization.get("kv_cache_scheme"):
        raise ConfigError("compressed-tensors' kv_cache_scheme (KV cache scales) is not supported")
    groups = list((quantization.get("config_groups") or {}).values())
    if len(groups) != 1 or groups[0].get("targets") != ["Linear"]:
        raise ConfigError("compressed-tensors checkpoints are supported with one config group whose targets are "
                          f"['Linear'], not {[g.get('targets') for g in groups]}")
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations")
    scheme = (weights.get("num_bits"), weights.get("type"), weights.get("symmetric", True), weights.get("dynamic"))
    if scheme != (8, "float", True, False) or weights.get("strategy") not in (*CT_STRATEGIES, "block"):
        raise ConfigError(f"compressed-tensors weights {weights} are not supported (only static, symmetric 8-bit "
                          "floats per tensor, channel or block)")
    if inputs is not None and (inputs.get("num_bits"), inputs.get("type")) != (8, "float"):
        raise ConfigError(f"compressed-tensors input_activations {inputs} are not supported (8-bit floats or none)")
    if groups[0].get("output_activations"):
        raise ConfigError("compressed-tensors output_activations are not supported")
    strategy = weights["strategy"]
    block = _block(weights.get("block_structure"), "block_structure") if strategy == "block" else \
        CT_STRATEGIES[strategy]
    # `ignore`: module names, or regexes after "re:" (e.g. MoE routers, "re:.*mlp.gate$").
    skip = tuple(p[3:] if p.startswith("re:") else re.escape(p) for p in quantization.get("ignore") or ())
    return WeightQuant(block, skip, "compressed-tensors", inputs is not None and not inputs.get("dynamic", False))


def _weight_quant_to_hf(quant: WeightQuant) -> dict:
    if quant.method == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "modules_to_not_convert": list(quant.skip),
                "weight_block_size": None if quant.block == (None, None) else list(quant.block)}
    strategy = next((name for name, block in CT_STRATEGIES.items() if block == quant.block), "block")
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               **({"block_structure": list(quant.block)} if strategy == "block" else {})}
    inputs = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not quant.input_scales,
              "strategy": "tensor" if quant.input_scales else "token"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}},
            "ignore": ["re:" + p for p in quant.skip]}


def _family_to_hf(cfg: "ModelConfig") -> dict:
    """The config.json fields of `_family_fields`' families."""
    if cfg.kv_lora_rank:
        return _mla_to_hf(cfg)
    if cfg.model_type in ("granite", "granitemoe"):
        return dict(embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.residual_multiplier,
                    attention_multiplier=cfg.attention_multiplier, logits_scaling=cfg.logits_scaling)
    if cfg.model_type in GEMMA_MODEL_TYPES:
        return _gemma_to_hf(cfg)
    if cfg.model_type == "olmo3":
        return _layer_types_to_hf(cfg)
    if cfg.model_type == "smollm3":
        return {"no_rope_layers": [int(r) for r in cfg.rope_layers], "use_sliding_window": bool(cfg.sliding_layers),
                "layer_types": _layer_types_to_hf(cfg)["layer_types"] or None}
    if cfg.model_type == "starcoder2":
        return {"use_bias": cfg.qkv_bias, "norm_epsilon": cfg.rms_norm_eps}
    if cfg.model_type == "phi":
        return {"layer_norm_eps": cfg.rms_norm_eps, "qk_layernorm": False}
    if cfg.model_type in COHERE_MODEL_TYPES:
        hf = {"logit_scale": 1 / cfg.logits_scaling, "layer_norm_eps": cfg.rms_norm_eps, "use_qk_norm": cfg.qk_norm}
        return {**hf, **_layer_types_to_hf(cfg)} if cfg.model_type == "cohere2" else hf
    if cfg.model_type == "seed_oss":
        return {"attention_out_bias": cfg.o_bias}
    if cfg.model_type in ("arcee", "apertus"):
        return {"mlp_bias": cfg.mlp_bias}
    if cfg.model_type == "gpt_oss":
        return {"swiglu_alpha": cfg.swiglu_alpha, "swiglu_limit": cfg.swiglu_limit,
                "layer_types": _layer_types_to_hf(cfg)["layer_types"] or ["full_attention"] * cfg.num_layers}
    if cfg.model_type in ("ministral", "exaone4"):
        every = ["sliding_attention" if cfg.sliding_window is not None else "full_attention"] * cfg.num_layers
        return _layer_types_to_hf(cfg) if cfg.sliding_layers else {"layer_types": every}
    return {}


def _gpt_oss_from_hf(hf: dict) -> dict:
    """gpt-oss: attention sinks, biased router and experts, the clamped SwiGLU, norms weighing in float32 (transformers
    keeps them so), and sliding layers as `layer_types` says (its default when absent: every other from the first)."""
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return dict(attn_sinks=True, router_bias=True, expert_bias=True, norm_scale_f32=True,
                swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                sliding_layers=tuple(t == "sliding_attention" for t in types) if hf.get("sliding_window") else ())


def _granite_from_hf(hf: dict) -> dict:
    # transformers' GraniteConfig defaults are all 1.0, the attention multiplier's too (not 1 / sqrt(head_dim)).
    return {name: float(hf.get(name, 1.0)) for name in
            ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")}


# Multimodal checkpoints whose language model jaxinfer serves for text: that model's type, and transformers'
# defaults for the fields `text_config` leaves out (Gemma 3's Hub configs leave out most).
MULTIMODAL_LANGUAGE_MODELS = {"gemma3": ("gemma3_text", GEMMA3_TEXT_DEFAULTS), "mistral3": ("mistral", {}),
                              "qwen2_vl": ("qwen2", {}), "qwen2_5_vl": ("qwen2", {}), "qwen3_vl": ("qwen3", {}),
                              "qwen3_vl_moe": ("qwen3_moe", {})}


def _language_model(hf: dict) -> dict:
    """The config of the language model a multimodal checkpoint holds, which jaxinfer serves as a text model (its
    vision tower is not loaded): Gemma 3 (4B and up), Mistral Small 3.1/3.2 (mistral3), Qwen2-VL, Qwen2.5-VL and
    Qwen3-VL keep it in `text_config` (the Qwen VLs' older configs at the top level), with the stop ids and dtype
    at the top level. Whether the head is tied is the top level's to say where it says so, as transformers 5
    reads these models. The Qwen VLs' multimodal RoPE (`mrope_section`) rotates a text token by its one position in
    every section: plain RoPE."""
    if hf.get("model_type") not in MULTIMODAL_LANGUAGE_MODELS:
        return hf
    model_type, defaults = MULTIMODAL_LANGUAGE_MODELS[hf["model_type"]]
    text = hf.get("text_config") or {k: v for k, v in hf.items() if k != "vision_config"}
    top = {name: hf[name] for name in ("eos_token_id", "bos_token_id", "dtype", "torch_dtype")
           if hf.get(name) is not None and name not in text}
    tied = {} if hf.get("tie_word_embeddings") is None else {"tie_word_embeddings": hf["tie_word_embeddings"]}
    ropes = {name: _text_rope(text[name]) for name in ("rope_scaling", "rope_parameters") if text.get(name)}
    return {**defaults, **top, **text, "model_type": model_type, **tied, **ropes}


def _text_rope(rope: dict) -> dict:
    """A multimodal RoPE (`mrope_section`) as text tokens see it: its theta, unscaled."""
    if "mrope_section" not in rope:
        return rope
    return {"rope_type": "default", **({"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {})}


def _activation(hf: dict, model_type: str) -> str:
    """The MLP's activation. Gemma 2/3 name it `hidden_activation`; Gemma 1's checkpoints say `gelu` where they
    mean its tanh approximation, which transformers and vLLM use instead."""
    if model_type == "gpt_oss":  # its experts' own SwiGLU, whatever hidden_act says (transformers ignores it)
        return "swigluoai"
    if model_type in GEMMA_MODEL_TYPES:
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if act == "gelu" and model_type == "gemma" else act
    act = hf.get("hidden_act", "silu")
    return "gelu_pytorch_tanh" if act == "gelu_new" else act  # Phi-2's: the same tanh approximation


def _gemma_from_hf(hf: dict, model_type: str, get) -> dict:
    """Gemma's scalings: embeddings times sqrt(hidden_size); attention logits over sqrt(query_pre_attn_scalar)
    (Gemma 2/3; head_dim's in Gemma 1), capped where the config says; the sliding layers and their RoPE."""
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{model_type} with use_bidirectional_attention (an embedding model) is not supported")
    fields = dict(norm_plus_one=True, norm_scale_f32=True, embedding_multiplier=float(get("hidden_size")) ** 0.5)
    if model_type == "gemma":
        return fields
    fields.update(post_norms=True, attention_multiplier=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                  attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
                  sliding_layers=tuple(t == "sliding_attention" for t in _gemma_layer_types(hf, model_type)))
    if model_type == "gemma3_text":
        fields["local_rope"] = _rope_from_hf(_layer_rope(hf, "sliding_attention"))
    return fields


def _smollm3_from_hf(hf: dict, get) -> dict:
    """SmolLM3's layers without position encoding (`no_rope_layers[i]` is 0; by default every
    `no_rope_layer_interval`-th, 4), and with `use_sliding_window` its sliding layers, as `layer_types` says (by
    default the NoPE ones), as transformers reads them."""
    layers = get("num_hidden_layers")
    interval = int(hf.get("no_rope_layer_interval") or 4)
    rope = [bool(r) for r in hf.get("no_rope_layers") or [(i + 1) % interval != 0 for i in range(layers)]]
    fields = {"rope_layers": tuple(rope)}
    if hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        types = hf.get("layer_types") or ["full_attention" if r else "sliding_attention" for r in rope]
        fields["sliding_layers"] = tuple(t == "sliding_attention" for t in types)
    return fields


def _cohere_from_hf(hf: dict, model_type: str, get) -> dict:
    """Cohere (Command R) and Cohere 2 (Command R7B, A): LayerNorm, parallel blocks, interleaved RoPE, logits times
    `logit_scale`; Cohere 2's sliding layers (3 of every `sliding_window_pattern`, 4, by default) alone turn RoPE,
    its global layers none. Command R+'s q/k LayerNorms (`use_qk_norm`) are read with the other fields."""
    if model_type == "cohere2" and hf.get("use_qk_norm"):
        raise ConfigError("cohere2 with use_qk_norm=true is not supported (transformers' Cohere 2 has no q/k norms)")
    fields = dict(layer_norm=True, parallel_block=True, rope_interleaved=True,
                  logits_scaling=1 / float(hf.get("logit_scale", 0.0625)))
    if model_type == "cohere2":
        period = int(hf.get("sliding_window_pattern") or 4)
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % period else "full_attention"
                                          for i in range(get("num_hidden_layers"))]
        sliding = tuple(t == "sliding_attention" for t in types)
        fields.update(sliding_layers=sliding, rope_layers=sliding)
    return fields


def _exaone4_from_hf(hf: dict, get) -> dict:
    """EXAONE 4.0: OLMo 2's norms after each sublayer only (Llama's RMSNorm), q and k normed head by head; with a
    sliding window, its sliding layers (3 of every `sliding_window_pattern`, 4, or as the pattern's letters say,
    L local and G global) alone turn RoPE, its global layers none."""
    fields = dict(pre_norms=False, post_norms=True)
    if hf.get("sliding_window") is None:
        return fields
    layers, pattern = get("num_hidden_layers"), hf.get("sliding_window_pattern", 4)
    types = hf.get("layer_types") or [
        "sliding_attention" if (pattern[i % len(pattern)] == "L" if isinstance(pattern, str) else (i + 1) % pattern)
        else "full_attention" for i in range(layers)]
    sliding = tuple(t == "sliding_attention" for t in types)
    return {**fields, "sliding_layers": sliding, "rope_layers": sliding}


def _olmo_from_hf(hf: dict, model_type: str, get) -> dict:
    """OLMo 2/3: norms after each sublayer only (weight times the float32 norm), q and k normed over all heads;
    OLMo 3's sliding layers (3 of every 4 by default) with a RoPE of their own, unscaled. OLMoE: Llama's norms,
    but q and k normed over all heads too; its optional clipping of q, k and v is refused."""
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"{model_type} with clip_qkv={hf['clip_qkv']} is not supported")
    if model_type == "olmoe":
        return dict(qk_norm_over_heads=True)
    fields = dict(norm_scale_f32=True, pre_norms=False, post_norms=True, qk_norm_over_heads=True)
    if model_type == "olmo3":
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 4 else "full_attention"
                                          for i in range(get("num_hidden_layers"))]
        fields.update(sliding_layers=tuple(t == "sliding_attention" for t in types),
                      local_rope=_rope_from_hf(_layer_rope(hf, "sliding_attention")))
    return fields


def _gemma_layer_types(hf: dict, model_type: str) -> list[str]:
    """`layer_types`, or where a Hub config lacks it, transformers' default: every other layer sliding from the
    first in Gemma 2, five of every `sliding_window_pattern` (6) in Gemma 3."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    period = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(hf["num_hidden_layers"])]


# Models whose RoPE is set per layer type (transformers 5's `rope_parameters` keyed by it), with the Hub's
# spelling of the sliding layers' theta and each type's default theta.
LAYER_TYPE_ROPES = {"gemma3_text": ("rope_local_base_freq", 1e4, 1e6), "olmo3": ("rope_theta", 5e5, 5e5)}


def _layer_rope(hf: dict, layer_type: str) -> dict:
    """The RoPE of one layer type (Gemma 3, OLMo 3), as a config `_rope_from_hf` reads. transformers 5 writes
    `rope_parameters` keyed by layer type; the Hub's configs give the global layers `rope_theta` and
    `rope_scaling`, the sliding layers their own theta (Gemma 3's `rope_local_base_freq`) and no scaling."""
    local_key, local_theta, global_theta = LAYER_TYPE_ROPES[hf["model_type"]]
    params, length = hf.get("rope_parameters") or {}, {"max_position_embeddings": hf.get("max_position_embeddings")}
    if layer_type in params:
        return {"rope_parameters": params[layer_type], **length}
    if layer_type == "sliding_attention":
        return {"rope_theta": hf.get(local_key, local_theta), **length}
    return {"rope_theta": hf.get("rope_theta", global_theta), "rope_scaling": hf.get("rope_scaling"), **length}


def _gemma_to_hf(cfg: "ModelConfig") -> dict:
    hf = {"hidden_activation": cfg.activation}
    if cfg.model_type == "gemma":
        return hf
    hf.update(query_pre_attn_scalar=round(cfg.attention_multiplier ** -2), attn_logit_softcapping=cfg.attn_softcap,
              final_logit_softcapping=cfg.final_softcap)
    return {**hf, **_layer_types_to_hf(cfg)}


def _layer_types_to_hf(cfg: "ModelConfig") -> dict:
    """`layer_types`, and the RoPE of each layer type where the sliding layers have their own (Gemma 3, OLMo 3)."""
    hf = {"layer_types": ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]}
    if cfg.local_rope is not None:
        def params(rope: RopeConfig) -> dict:
            scaling = _rope_to_hf(rope) if rope.kind != "default" else {"rope_type": "default"}
            return {"rope_theta": rope.theta, **scaling}
        hf["rope_parameters"] = {"full_attention": params(cfg.rope), "sliding_attention": params(cfg.local_rope)}
    return hf


def _moe_to_hf(cfg: "ModelConfig") -> dict:
    if cfg.model_type == "deepseek_v2":
        return {"n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
                "moe_intermediate_size": cfg.intermediate_size, "intermediate_size": cfg.dense_intermediate_size,
                "n_shared_experts": cfg.shared_expert_size // cfg.intermediate_size,
                "first_k_dense_replace": cfg.dense_layers, "routed_scaling_factor": cfg.routed_scaling,
                "topk_method": "group_limited_greedy" if cfg.router_groups > 1 else "greedy",
                "n_group": cfg.router_groups, "topk_group": cfg.router_topk_groups}
    if cfg.model_type in _NOAUX_DEFAULTS:
        return {"mlp_layer_types": ["dense"] * cfg.dense_layers + ["sparse"] * (cfg.num_layers - cfg.dense_layers),
                "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
                "moe_intermediate_size": cfg.intermediate_size, "intermediate_size": cfg.dense_intermediate_size,
                "n_shared_experts": cfg.shared_expert_size // cfg.intermediate_size,
                "first_k_dense_replace": cfg.dense_layers, "n_group": cfg.router_groups,
                "topk_group": cfg.router_topk_groups, "routed_scaling_factor": cfg.routed_scaling,
                "norm_topk_prob": cfg.norm_topk_prob, "use_qk_norm": cfg.qk_norm, "num_nextn_predict_layers": 0}
    if cfg.model_type == "hunyuan_v1_moe":
        return {"num_experts": cfg.num_experts, "moe_topk": cfg.experts_per_token}
    if cfg.model_type == "ernie4_5_moe":
        return {"moe_num_experts": cfg.num_experts, "moe_k": cfg.experts_per_token,
                "moe_intermediate_size": cfg.intermediate_size, "intermediate_size": cfg.dense_intermediate_size,
                "moe_num_shared_experts": cfg.shared_expert_size // cfg.intermediate_size,
                "moe_layer_start_index": cfg.dense_layers, "moe_layer_end_index": cfg.num_layers - 1,
                "moe_layer_interval": 1}
    if cfg.model_type in ("mixtral", "granitemoe", "gpt_oss", "minimax_m2"):
        return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token}
    if cfg.model_type not in MOE_MODEL_TYPES:
        return {}
    hf = {"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
          cfg.mlp_field: cfg.intermediate_size, "norm_topk_prob": cfg.norm_topk_prob,
          "decoder_sparse_step": 1, "mlp_only_layers": list(range(cfg.dense_layers))}
    if cfg.dense_layers:
        hf["intermediate_size"] = cfg.dense_intermediate_size
    if cfg.shared_expert_size:
        hf["shared_expert_intermediate_size"] = cfg.shared_expert_size
    return hf


def _field_getter(hf: dict, model_type: str):
    def get(name):
        if hf.get(name) is None:
            raise ConfigError(f"config.json for model_type {model_type!r} is missing required field {name!r}")
        return hf[name]
    return get


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _rope_from_hf(hf: dict) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    default = ROPE_THETA_DEFAULTS.get(hf.get("model_type"), 1e4)
    theta = float(merged.get("rope_theta", hf.get("rope_theta", default)))
    kind = merged.get("rope_type") or merged.get("type") or "default"
    # Phi-3's first configs called it su, some yarn; transformers' Phi3Config reads both as longrope
    kind = "longrope" if kind == "su" or (kind == "yarn" and hf.get("model_type") == "phi3") else kind
    # HunYuan's checkpoints say dynamic with a fixed alpha: static frequencies, as transformers reads them
    kind = "ntk_alpha" if kind == "dynamic" and merged.get("alpha") else kind
    partial = float(merged.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
                    or PARTIAL_ROTARY_DEFAULTS.get(hf.get("model_type"), 1.0))
    if not 0 < partial <= 1:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {partial}")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported rope scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return dataclasses.replace(_scaling_from_hf(hf, merged, kind, theta), partial_rotary_factor=partial)


def _scaling_from_hf(hf: dict, merged: dict, kind: str, theta: float) -> RopeConfig:
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "longrope":
        return _longrope_from_hf(hf, merged, theta)
    if kind == "ntk_alpha":
        return RopeConfig(theta=theta, kind=kind, alpha=float(merged["alpha"]))
    if "factor" not in merged:
        raise ConfigError(f"rope scaling type {kind!r} is missing required field 'factor'")
    if kind == "yarn":
        return _yarn_from_hf(hf, merged, theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=float(merged["factor"]))
    for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if name not in merged:
            raise ConfigError(f"rope scaling type 'llama3' is missing required field {name!r}")
    return RopeConfig(theta=theta, kind=kind, factor=float(merged["factor"]),
                      low_freq_factor=float(merged["low_freq_factor"]),
                      high_freq_factor=float(merged["high_freq_factor"]),
                      original_max_position=int(merged["original_max_position_embeddings"]))


def _yarn_from_hf(hf: dict, merged: dict, theta: float) -> RopeConfig:
    """YaRN as transformers reads it: the pretraining length defaults to max_position_embeddings, a null factor
    to max_position_embeddings over it, beta_fast / beta_slow to 32 / 1, and the attention factor, unless given,
    to 0.1 ln(factor) + 1 (DeepSeek's mscale / mscale_all_dim form where both are given)."""
    original = int(hf.get("original_max_position_embeddings") or merged.get("original_max_position_embeddings")
                   or hf["max_position_embeddings"])
    factor = float(merged.get("factor") or hf["max_position_embeddings"] / original)
    attention_factor = merged.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = merged.get("mscale"), merged.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return RopeConfig(theta=theta, kind="yarn", factor=factor, original_max_position=original,
                      beta_fast=float(merged.get("beta_fast") or 32), beta_slow=float(merged.get("beta_slow") or 1),
                      truncate=bool(merged.get("truncate", True)), attention_factor=float(attention_factor))


def _longrope_from_hf(hf: dict, merged: dict, theta: float) -> RopeConfig:
    """LongRoPE (Phi-3.5, Phi-4-mini) as transformers reads it: per-frequency divisors for contexts up to the
    pretraining length and beyond; the attention factor, unless given, sqrt(1 + ln(factor) / ln(pretraining
    length)), the factor max_position_embeddings over the pretraining length unless given."""
    for name in ("short_factor", "long_factor"):
        if not merged.get(name):
            raise ConfigError(f"rope scaling type 'longrope' is missing required field {name!r}")
    original = int(merged.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                   or hf["max_position_embeddings"])
    factor = float(merged.get("factor") or hf["max_position_embeddings"] / original)
    attention_factor = merged.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeConfig(theta=theta, kind="longrope", factor=factor, original_max_position=original,
                      attention_factor=float(attention_factor), short_factor=tuple(map(float, merged["short_factor"])),
                      long_factor=tuple(map(float, merged["long_factor"])))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_to_hf(rope: RopeConfig) -> dict:
    out = {"rope_type": rope.kind, "factor": rope.factor}
    if rope.kind == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position)
    if rope.kind == "yarn":
        out.update(original_max_position_embeddings=rope.original_max_position, beta_fast=rope.beta_fast,
                   beta_slow=rope.beta_slow, truncate=rope.truncate, attention_factor=rope.attention_factor)
    if rope.kind == "longrope":
        out.update(original_max_position_embeddings=rope.original_max_position, attention_factor=rope.attention_factor,
                   short_factor=list(rope.short_factor), long_factor=list(rope.long_factor))
    if rope.kind == "ntk_alpha":
        out.update(rope_type="dynamic", alpha=rope.alpha)
    return out


def _sliding_window(hf: dict, model_type: str) -> int | None:
    window = hf.get("sliding_window")
    if model_type == "smollm3":
        return window if hf.get("use_sliding_window") else None
    if model_type in ("mistral", "mixtral", "phi3", "gemma2", "gemma3_text", "olmo3", "cohere2", "starcoder2",
                      "ministral", "exaone4", "gpt_oss"):
        return window  # null in Mistral v0.2+ and Phi-4, 4096 in Mistral v0.1, 2047 in Phi-3-mini, 4096 in Gemma 2
    layer_types = hf.get("layer_types") or []
    uses_window = hf.get("use_sliding_window", False) or "sliding_attention" in layer_types
    if uses_window:
        raise ConfigError(f"sliding-window attention for model_type {model_type!r} is not supported")
    return None


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """How the layers' KV shares the page pool [Lg, K, P, Z, H]. Each KV cache group is `width` (Lg) layers of one
    attention kind, with a block table of its own over one shared pool of pages: a page id names Lg layers'
    worth of KV. A group whose layers slide frees the pages that fell out of its window, so models that mix sliding
    and global layers (Gemma 2/3, OLMo 3) keep whole-context KV for their global layers only (vLLM's hybrid KV
    cache manager). Layer l writes slot `slot_of[l]` of the pool through the block table of group `group_of[l]`."""

    windows: tuple[int | None, ...]  # [G] each group's sliding window; None: the group attends to everything
    group_of: tuple[int, ...]  # [L]
    slot_of: tuple[int, ...]  # [L]
    width: int  # Lg

    @property
    def num_groups(self) -> int:  # G
        return len(self.windows)


def kv_layout(model: ModelConfig, hybrid: bool = True) -> KVLayout:
    """One group of every layer, sliding only where every layer slides; with `hybrid` and layers of both kinds,
    groups as wide as the rarer kind has layers (the last group of a kind may leave slots unused), global first."""
    L = model.num_layers
    windows = [model.layer_window(layer) for layer in range(L)]
    if not hybrid or len(set(windows)) == 1:
        return KVLayout((windows[0] if len(set(windows)) == 1 else None,), (0,) * L, tuple(range(L)), L)
    kinds = [[layer for layer in range(L) if windows[layer] is None],
             [layer for layer in range(L) if windows[layer] is not None]]
    width = min(map(len, kinds))
    group_of, slot_of, group_windows = [0] * L, [0] * L, []
    for layers in kinds:
        for start in range(0, len(layers), width):
            for slot, layer in enumerate(layers[start:start + width]):
                group_of[layer], slot_of[layer] = len(group_windows), slot
            group_windows.append(windows[layers[0]])
    return KVLayout(tuple(group_windows), tuple(group_of), tuple(slot_of), width)


DTYPES = ("float32", "bfloat16", "float16")
# The KV cache's value formats, by vLLM's `--kv-cache-dtype` names: numpy's name and bytes. fp8 is stored
# unscaled (vLLM's default scale of 1.0) and saturating: values beyond the format's range are clipped to it.
# (How a pool holds them, as floats or as their bits, is pallas_kernels/kv_storage.py's choice.)
KV_FORMATS = {"float32": ("float32", 4), "bfloat16": ("bfloat16", 2), "float16": ("float16", 2),
              "fp8_e4m3": ("float8_e4m3fn", 1), "fp8_e5m2": ("float8_e5m2", 1)}
KV_CACHE_DTYPES = ("auto", "fp8") + tuple(KV_FORMATS)  # auto: the model's dtype; fp8: fp8_e4m3, as vLLM's
MIN_WIDTH_TOKENS = 64  # narrower block tables save little gathering and cost a compile each
CPU_KV_CACHE_BYTES = 1 << 30  # the CPU KV pool's cap
PALLAS_PREFILL_SEQS = 8  # prompts one step packs by default where the ragged Pallas kernel runs prefill
MIN_DECODE_BUCKET = 8  # the fewest rows a decode-only step shrinks to (at one row XLA:CPU's dot rounds apart)
CPU_SAME_BITS_ROWS = 32  # XLA:CPU's dot gives a row the same bits at any row count from 2 to this, not beyond


def default_decode_buckets(slots: int, platform: str) -> tuple[int, ...]:
    """Row counts a decode-only step may shrink to: on CPU, where decode is compute-bound and a row's bits
    do not depend on the row count up to CPU_SAME_BITS_ROWS (tests/test_engine.py pins both), powers of
    two from MIN_DECODE_BUCKET, then `slots`. Elsewhere `slots` only: a GPU decode step reads every weight
    whatever its row count, so fewer rows save little, and cuBLAS picks its kernel by row count."""
    if platform != "cpu" or slots > CPU_SAME_BITS_ROWS:
        return (slots,)
    sizes, size = [], MIN_DECODE_BUCKET
    while size < slots:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (slots,)


def default_prefill_seqs(backend: str) -> int:
    """Packing costs nothing extra in the ragged Pallas kernel; the jnp paths attend one padded row per
    packed prompt, so there it is opt-in."""
    return PALLAS_PREFILL_SEQS if backend == "pallas" else 1


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest of the ascending `buckets` that holds n."""
    for size in buckets:
        if n <= size:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
RESOLVED_ATTENTION_BACKENDS = ("pallas", "xla", "reference")  # what "auto" resolves between
ATTENTION_BACKENDS = ("auto",) + RESOLVED_ATTENTION_BACKENDS
QUANTIZATIONS = (None, "fp8")  # EngineConfig.quantization: None serves the checkpoint as it is stored
QUANTIZATION_FLAGS = tuple(q for q in QUANTIZATIONS if q is not None)  # what --quantization takes
CONTROL_FLOWS = ("auto", "static", "dynamic")  # how a step branches on its batch: see jaxinfer/runner.py


def _kv_name(kv_cache_dtype: str, dtype: str, unresolved: str | None = None) -> str:
    """kv_cache_dtype as KV_FORMATS names it: `auto` follows the model's dtype (`unresolved` stands for an
    `auto` one), `fp8` is fp8_e4m3."""
    name = {"auto": dtype, "fp8": "fp8_e4m3"}.get(kv_cache_dtype, kv_cache_dtype)
    if name == "auto" and unresolved is None:
        raise ConfigError("kv_cache_dtype 'auto' follows dtype, which is 'auto' until the config is resolved")
    return unresolved if name == "auto" else name


def _auto_dtype(model: ModelConfig, platform: str) -> str:
    """float32 on CPU (no fast half-precision matmuls); on accelerators the checkpoint's half dtype, else bfloat16."""
    if platform == "cpu":
        return "float32"
    return model.dtype if model.dtype in ("bfloat16", "float16") else "bfloat16"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving knobs. Sizes are in tokens unless the name says otherwise."""

    max_slots: int = 8  # B of the decode step
    page_size: int = 16  # Z
    num_pages: int | None = None  # P; None: sized from the KV memory budget below
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: measured on GPU, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9  # on GPU, the share of device memory weights + KV may take
    max_model_len: int | None = None  # None: min(model's max positions, 4096)
    prefill_chunk: int = 256  # the prefill token budget of one step; longer prompts are chunked
    min_prefill_bucket: int = 16
    decode_steps: int = 4  # decode steps per dispatch when no prompt waits for prefill
    max_prefill_seqs: int | None = None  # prompts whose chunks one step may pack; None: 8 with Pallas, else 1
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # auto: float32 on CPU; on accelerators the checkpoint's half dtype or bfloat16
    kv_cache_dtype: str = "auto"  # the KV pool's (KV_CACHE_DTYPES): auto is `dtype`; fp8 holds twice bfloat16's tokens
    quantization: str | None = None  # vLLM's: "fp8" quantizes a 16/32-bit checkpoint's projections at load
    attention_backend: str = "auto"  # auto: our Pallas kernels on GPU, the page-loop jnp path (xla) elsewhere
    control_flow: str = "auto"  # auto: static on GPU (no host syncs inside a step), dynamic (fewer compiles) elsewhere
    decode_buckets: tuple[int, ...] | None = None  # rows a decode-only step may shrink to, per data shard; None: auto
    seed: int = 0
    mesh_shape: tuple[int, int] = (1, 1)  # devices over ('data', 'model'): data-parallel shards x tensor parallel
    hf_overrides: dict | None = None  # vLLM's --hf-overrides: fields laid over the checkpoint's config.json
    disable_hybrid_kv_cache_manager: bool = False  # vLLM's: sliding layers keep whole-context KV as global ones do
    kv_windows: tuple[int | None, ...] | None = None  # resolved: each KV cache group's window (`kv_layout`)

    def __post_init__(self):
        for name in ("max_slots", "page_size", "prefill_chunk", "min_prefill_bucket", "decode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES + ("auto",):
            raise ConfigError(f"dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization {self.quantization!r} is not one of {', '.join(map(str, QUANTIZATIONS))}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend {self.attention_backend!r} is not one of "
                              f"{', '.join(ATTENTION_BACKENDS)}")
        if self.control_flow not in CONTROL_FLOWS:
            raise ConfigError(f"control_flow {self.control_flow!r} is not one of {', '.join(CONTROL_FLOWS)}")
        if self.max_prefill_seqs is not None and self.max_prefill_seqs < 1:
            raise ConfigError(f"max_prefill_seqs must be positive, got {self.max_prefill_seqs}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError(f"num_pages must be at least 2 (page 0 is the null page), got {self.num_pages}")
        shape = tuple(self.mesh_shape)
        if len(shape) != 2 or not all(isinstance(n, int) and n >= 1 for n in shape):
            raise ConfigError(f"mesh_shape must be two positive integers (data, model), got {self.mesh_shape!r}")
        object.__setattr__(self, "mesh_shape", shape)
        if self.decode_buckets is not None:
            sizes = tuple(self.decode_buckets)
            if not sizes or not all(isinstance(n, int) and n >= 1 for n in sizes) or list(sizes) != sorted(set(sizes)):
                raise ConfigError(f"decode_buckets must be ascending positive integers, got {self.decode_buckets!r}")
            object.__setattr__(self, "decode_buckets", sizes)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def resolve(self, model: ModelConfig, platform: str) -> "EngineConfig":
        """Fill the `None`/`auto` fields from the model and the device platform."""
        longest, source = model.longest_context
        max_len = self.max_model_len or min(longest, 4096)
        if max_len > longest:
            raise ConfigError(f"max_model_len={max_len} exceeds the model's longest context, {longest} ({source})")
        dtype = self.dtype if self.dtype != "auto" else _auto_dtype(model, platform)
        kv_dtype = _kv_name(self.kv_cache_dtype, dtype)
        backend = self.attention_backend
        if backend == "auto":
            backend = "pallas" if platform == "gpu" else "xla"
        if backend == "pallas" and self.page_size & (self.page_size - 1):
            raise ConfigError(f"the Pallas attention kernels need a power-of-two page_size, got {self.page_size} "
                              "(attention_backend 'xla' or 'reference' take any)")
        packed = self.max_prefill_seqs or default_prefill_seqs(backend)
        control = self.control_flow
        if control == "auto":
            control = "static" if platform == "gpu" else "dynamic"
        return dataclasses.replace(self, max_model_len=max_len, dtype=dtype, kv_cache_dtype=kv_dtype,
                                   attention_backend=backend,
                                   max_prefill_seqs=packed, control_flow=control,
                                   decode_buckets=self._resolve_buckets(platform),
                                   kv_windows=self.kv_layout(model).windows)

    def _resolve_buckets(self, platform: str) -> tuple[int, ...]:
        """The decode buckets of one data shard, ending at its slot count."""
        slots = self.max_slots // self.mesh_shape[0]
        if self.decode_buckets is None:
            return default_decode_buckets(slots, platform)
        if self.decode_buckets[-1] > slots:
            raise ConfigError(f"decode_buckets {list(self.decode_buckets)} exceed the {slots} slots of a data shard")
        return self.decode_buckets + ((slots,) if self.decode_buckets[-1] < slots else ())

    @property
    def kv_format(self) -> str:
        """The KV cache's value format, as numpy names it (float8_e4m3fn for fp8_e4m3)."""
        return KV_FORMATS[_kv_name(self.kv_cache_dtype, self.dtype)][0]

    def kv_layout(self, model: ModelConfig) -> KVLayout:
        return kv_layout(model, hybrid=not self.disable_hybrid_kv_cache_manager)

    def kv_bytes_per_page(self, model: ModelConfig, layers: int | None = None) -> int:
        """K and V of one page over one KV cache group's layers (or `layers` of them), in the KV cache dtype (an
        unresolved `auto` dtype: 2 bytes)."""
        itemsize = KV_FORMATS[_kv_name(self.kv_cache_dtype, self.dtype, unresolved="bfloat16")][1]
        layers = self.kv_layout(model).width if layers is None else layers
        return 2 * layers * model.num_kv_heads * self.page_size * model.head_dim * itemsize

    @property
    def kv_groups(self) -> tuple[int | None, ...]:
        """Each KV cache group's window (unresolved: one group of global layers)."""
        return self.kv_windows or (None,)

    def sequence_pages(self, num_tokens: int) -> int:
        """The most pages one sequence of `num_tokens` positions holds at once, over every KV cache group: a
        sliding group holds its window, the step's new tokens and the pages they straddle."""
        whole, step = math.ceil(num_tokens / self.page_size), max(self.prefill_chunk, self.decode_steps)
        return sum(whole if window is None else min(whole, math.ceil((window - 1 + step) / self.page_size) + 1)
                   for window in self.kv_groups)

    def with_kv_budget(self, model: ModelConfig, budget_bytes: int) -> "EngineConfig":
        """Fix num_pages (if not set) from a byte budget, which must hold one full-length sequence.
        An explicit num_pages is taken as it is (requests that cannot fit are refused one by one)."""
        if self.num_pages is not None:
            return self
        data = self.mesh_shape[0]
        num_pages = int(budget_bytes // self.kv_bytes_per_page(model)) // data * data  # each data shard an equal part
        need = self.sequence_pages(self.max_model_len)
        if num_pages // data - 1 < need:
            shards = f" split over {data} data shards" if data > 1 else ""
            raise ConfigError(f"the KV pool has room for {max(num_pages - 1, 0)} pages of {self.page_size} tokens "
                              f"({budget_bytes / 2**30:.2f} GiB){shards}, less than one sequence of max_model_len="
                              f"{self.max_model_len} needs ({need} pages) per shard: lower "
                              "max_model_len or give the KV cache more memory")
        return dataclasses.replace(self, num_pages=num_pages)

    def cpu_kv_pages(self, bytes_per_page: int | None) -> int:
        """The KV pool on CPU, whose memory is everyone's: room for every slot at full length four times
        over, capped at CPU_KV_CACHE_BYTES (no cap when the page's size is not known)."""
        full = 4 * self.max_slots * self.sequence_pages(self.max_model_len) + 1
        return min(full, CPU_KV_CACHE_BYTES // bytes_per_page) if bytes_per_page else full

    def shard(self) -> "EngineConfig":
        """What one data shard schedules: its slots and its pages (page 0 of each shard is its null page)."""
        data = self.mesh_shape[0]
        pages = None if self.num_pages is None else self.num_pages // data
        return dataclasses.replace(self, max_slots=self.max_slots // data, num_pages=pages, mesh_shape=(1, 1))

    @property
    def prompts_per_step(self) -> int:
        """How many prompts one step may pack (an unresolved `None` schedules as 1)."""
        return self.max_prefill_seqs or 1

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.page_size)

    def prefill_buckets(self) -> tuple[int, ...]:
        """Powers of two from min_prefill_bucket up to prefill_chunk (the last one exact). A step that may
        pack several prompts always runs the whole budget: where a prompt's chunks are cut then depends
        on its neighbours, and a token's matmul rounding must not depend on the bucket it lands in."""
        if self.prompts_per_step > 1:
            return (self.prefill_chunk,)
        sizes, size = [], self.min_prefill_bucket
        while size < self.prefill_chunk:
            sizes.append(size)
            size *= 2
        return tuple(sizes) + (self.prefill_chunk,)

    def width_buckets(self) -> tuple[int, ...]:
        """Block-table widths (pages) a step may be cut to: powers of two from MIN_WIDTH_TOKENS worth of
        pages up to the full table."""
        width, sizes = max(1, MIN_WIDTH_TOKENS // self.page_size), []
        while width < self.pages_per_seq:
            sizes.append(width)
            width *= 2
        return tuple(sizes) + (self.pages_per_seq,)
