"""The weight table, and everything it drives: random init, sharding, loading and saving.

One `WeightSpec` per weight names its place in our parameter tree, its shape and
logical axes, and where it lives in a Hugging Face checkpoint (key and layout).
Per-layer weights are stacked on a leading `layers` axis so the forward pass can
`lax.scan` over them; a mixture of experts' weights, one checkpoint tensor per
expert, are stacked on an `experts` axis after it. A mixture of experts whose first
layers are dense (GLM-4.5) stacks those apart, as `dense_layers`. Loading is strict: every
checkpoint key maps to exactly one destination, shapes are checked, leftovers fail.

An fp8 checkpoint's projections stay float8_e4m3fn, held as their bits (uint8, as the KV pool holds fp8: XLA:CPU
otherwise converts every layer's stacked fp8 weights to float16 before the layer scan, a copy twice their size),
each beside a float32 `<name>_scale` in our layout: one scale per out element and block of in rows,
[(X,) in / block_in, out...] (the checkpoint's block scale repeated over the block's out rows), so fused tensors,
head splits and sharding cut it as they cut the weight.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxinfer.config import FUSED_GATE_UP, FUSED_PROJECTIONS, GLM_MODEL_TYPES, ConfigError, ModelConfig, WeightQuant
from jaxinfer.model import safetensors_io
from jaxinfer.model.safetensors_io import CheckpointError
from jaxinfer.sharding import kv_replicas, logical_sharding

log = logging.getLogger(__name__)

FP8 = "uint8"  # a quantized projection's dtype: the bits of its float8_e4m3fn values
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
# The projections an fp8 checkpoint keeps in fp8 (routers, gates of one output, embeddings and heads it does not).
QUANTIZABLE = tuple(f"{stack}.{name}" for stack in ("layers", "dense_layers")
                    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "shared_gate", "shared_up",
                                 "shared_down", "wq_a", "wq_b", "w_ckv", "w_kpe", "wkv_b"))


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    name: str  # dotted path in the parameter tree
    shape: tuple[int, ...]  # our layout, per layer (without the stacked L axis)
    axes: tuple[str, ...]  # logical axes of `shape`
    hf_key: str  # checkpoint key; "{i}" is the layer index for stacked weights, "{e}" the expert's
    hf_shape: tuple[int, ...]  # the checkpoint's layout (of one expert's tensor for per-expert weights)
    transpose: bool = False  # torch Linear stores [out, in] ([X, out, in] for experts in one tensor); we [in, out]
    init: str = "normal"  # normal (std 1/sqrt(fan_in)) | ones | zeros (a norm whose scale is 1 + weight)
    hf_rows: tuple[int, int] | None = None  # the rows [start, end) this weight takes of a fused tensor (of each
    #                                          expert's, for experts in one tensor: rows are its next-to-last axis)
    dtype: str | None = None  # None: the model's dtype; an fp8 weight's own, or its scales' float32
    scale_rows: int = 0  # a block scale: the checkpoint's out rows per scale row (each repeated so often)
    hf_columns: tuple[int, int | None, int] | None = None  # (start, stop, step): the slice of the tensor's last axis
    #     (after hf_permute) this weight is: gpt-oss's gate and up interleaved (step 2), Qwen3-VL-MoE's halves
    hf_permute: tuple[int, ...] | None = None  # the checkpoint tensor's axes in our order, taken before the rest
    mxfp4: bool = False  # MXFP4 blocks (two 4-bit floats a byte) or their exponents, as bytes (`mxfp4_specs`)
    layer_ids: tuple[int, ...] | None = None  # the layers a stacked weight's stack holds (None: every layer)

    @property
    def fp8(self) -> bool:
        """An fp8 weight, held as its bits."""
        return self.dtype == FP8 and not self.mxfp4

    @property
    def part_shape(self) -> tuple[int, ...]:
        """The checkpoint tensor's part that is this weight (the whole tensor unless fused)."""
        if self.hf_columns is not None:
            return (*self.hf_shape[:-1], len(range(*slice(*self.hf_columns).indices(self.hf_shape[-1]))))
        if self.hf_rows is None:
            return self.hf_shape
        *lead, _, columns = self.hf_shape
        return (*lead, self.hf_rows[1] - self.hf_rows[0], columns)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_key

    @property
    def per_expert(self) -> bool:
        """One checkpoint tensor per expert, stacked on our leading (experts) axis."""
        return "{e}" in self.hf_key

    def full_shape(self, num_layers: int) -> tuple[int, ...]:
        return (len(self.layers(num_layers)), *self.shape) if self.stacked else self.shape

    def layers(self, num_layers: int) -> tuple[int, ...] | range:
        """The model's layers this weight's stack holds, in order."""
        return range(num_layers) if self.layer_ids is None else self.layer_ids

    def full_axes(self) -> tuple[str, ...]:
        return ("layers", *self.axes) if self.stacked else self.axes

    def hf_keys(self, num_layers: int) -> list[str]:
        """The checkpoint keys this weight is made of: one per layer when stacked, and per expert within."""
        if not self.stacked:
            return [self.hf_key]
        experts = range(self.shape[0]) if self.per_expert else [0]
        return [self.hf_key.format(i=i, e=e) for i in self.layers(num_layers) for e in experts]

    def sharding(self, mesh, replicated: tuple[str, ...] = ()):
        return logical_sharding(mesh, self.full_axes(), replicated) if mesh is not None else None

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        """One checkpoint tensor (one expert's, for per-expert weights) in our layout."""
        if self.scale_rows:  # one row per out element, cut to the weight's rows
            ours = self.shape[1:] if self.per_expert else self.shape
            x = np.repeat(x.reshape(self.hf_shape), self.scale_rows, axis=0)
            start, end = self.hf_rows or (0, math.prod(ours) // x.shape[1])
            return x[start:end].T.reshape(ours)
        if self.hf_rows is not None:
            x = x[..., self.hf_rows[0]:self.hf_rows[1], :]  # the rows axis: next to last
        if self.hf_permute is not None:
            x = np.transpose(x, self.hf_permute)
        if self.hf_columns is not None:
            x = x[..., slice(*self.hf_columns)]
        return (np.swapaxes(x, -1, -2) if self.transpose else x).reshape(self.shape[1:] if self.per_expert
                                                                           else self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our weight in the checkpoint's layout (its rows of the tensor, if fused)."""
        if not self.transpose:
            return x.reshape(self.part_shape)
        *lead, rows, columns = self.part_shape
        return np.swapaxes(x.reshape(*lead, columns, rows), -1, -2)


def weight_table(cfg: ModelConfig) -> list[WeightSpec]:
    """Every weight of `cfg`'s model, in our layout and the checkpoint's."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lp = "model.layers.{i}."
    specs = [
        WeightSpec("embed", (V, D), ("vocab", "embed"), "model.embed_tokens.weight", (V, D)),
        WeightSpec("layers.attn_norm", (D,), ("embed",), lp + "input_layernorm.weight", (D,), init="ones"),
        WeightSpec("layers.wq", (D, N, H), ("embed", "heads", "head_dim"), lp + "self_attn.q_proj.weight", (N * H, D), True),
        WeightSpec("layers.wk", (D, K, H), ("embed", "kv_heads", "head_dim"), lp + "self_attn.k_proj.weight", (K * H, D), True),
        WeightSpec("layers.wv", (D, K, H), ("embed", "kv_heads", "head_dim"), lp + "self_attn.v_proj.weight", (K * H, D), True),
        WeightSpec("layers.wo", (N, H, D), ("heads", "head_dim", "embed"), lp + "self_attn.o_proj.weight", (D, N * H), True),
        WeightSpec("layers.mlp_norm", (D,), ("embed",), lp + "post_attention_layernorm.weight", (D,), init="ones"),
        WeightSpec("layers.w_gate", (D, F), ("embed", "mlp"), lp + "mlp.gate_proj.weight", (F, D), True),
        WeightSpec("layers.w_up", (D, F), ("embed", "mlp"), lp + "mlp.up_proj.weight", (F, D), True),
        WeightSpec("layers.w_down", (F, D), ("mlp", "embed"), lp + "mlp.down_proj.weight", (D, F), True),
        WeightSpec("final_norm", (D,), ("embed",), "model.norm.weight", (D,), init="ones"),
    ]
    if cfg.qkv_bias:
        specs += [
            WeightSpec("layers.bq", (N, H), ("heads", "head_dim"), lp + "self_attn.q_proj.bias", (N * H,)),
            WeightSpec("layers.bk", (K, H), ("kv_heads", "head_dim"), lp + "self_attn.k_proj.bias", (K * H,)),
            WeightSpec("layers.bv", (K, H), ("kv_heads", "head_dim"), lp + "self_attn.v_proj.bias", (K * H,)),
        ]
    if cfg.o_bias:
        specs.append(WeightSpec("layers.bo", (D,), ("embed",), lp + "self_attn.o_proj.bias", (D,)))
    if cfg.attn_sinks:
        specs.append(WeightSpec("layers.sinks", (N,), ("heads",), lp + "self_attn.sinks", (N,)))
    if cfg.qk_norm and cfg.qk_norm_over_heads:  # one weight per projected value, not per head dimension
        specs += [
            WeightSpec("layers.q_norm", (N, H), ("heads", "head_dim"), lp + "self_attn.q_norm.weight", (N * H,),
                       init="ones"),
            WeightSpec("layers.k_norm", (K, H), ("kv_heads", "head_dim"), lp + "self_attn.k_norm.weight", (K * H,),
                       init="ones"),
        ]
    elif cfg.qk_norm and cfg.layer_norm:  # Cohere's (Command R+): each head normed apart, with weights of its own
        specs += [
            WeightSpec("layers.q_norm", (N, H), ("heads", "head_dim"), lp + "self_attn.q_norm.weight", (N, H),
                       init="ones"),
            WeightSpec("layers.k_norm", (K, H), ("kv_heads", "head_dim"), lp + "self_attn.k_norm.weight", (K, H),
                       init="ones"),
        ]
    elif cfg.qk_norm:
        specs += [
            WeightSpec("layers.q_norm", (H,), ("head_dim",), lp + "self_attn.q_norm.weight", (H,), init="ones"),
            WeightSpec("layers.k_norm", (H,), ("head_dim",), lp + "self_attn.k_norm.weight", (H,), init="ones"),
        ]
    if cfg.kv_lora_rank:
        specs = _mla_specs(specs, cfg)
    if cfg.num_experts:
        specs = [spec for spec in specs if spec.name not in ("layers.w_gate", "layers.w_up", "layers.w_down")]
        specs += _expert_specs(cfg)
    if cfg.model_type in FUSED_PROJECTIONS + FUSED_GATE_UP:
        specs = _fused(specs, cfg)
    if cfg.post_norms:
        specs = _post_norms(specs, cfg)
    if cfg.parallel_block:  # the MLP reads the attention's normed input: one norm a layer
        specs = [spec for spec in specs if spec.name != "layers.mlp_norm"]
    if not cfg.gated_mlp:
        specs = _two_projection_mlp(specs, cfg)
    if cfg.norm_bias:
        specs += [WeightSpec(f"{spec.name}_bias", spec.shape, spec.axes, spec.hf_key.replace(".weight", ".bias"),
                             spec.hf_shape, init="zeros") for spec in specs if spec.name.endswith("norm")]
    if cfg.norm_plus_one:
        specs = [dataclasses.replace(spec, init="zeros") if spec.init == "ones" else spec for spec in specs]
    if cfg.model_type in ("hunyuan_v1_dense", "hunyuan_v1_moe"):  # its q/k norms' names
        keys = {"layers.q_norm": lp + "self_attn.query_layernorm.weight",
                "layers.k_norm": lp + "self_attn.key_layernorm.weight"}
        specs = [dataclasses.replace(spec, hf_key=keys.get(spec.name, spec.hf_key)) for spec in specs]
    if cfg.model_type == "phi":  # Phi-2's names: the attention's output `dense`, the final norm `final_layernorm`
        keys = {"layers.wo": lp + "self_attn.dense.weight", "layers.bo": lp + "self_attn.dense.bias",
                "final_norm": "model.final_layernorm.weight", "final_norm_bias": "model.final_layernorm.bias"}
        specs = [dataclasses.replace(spec, hf_key=keys.get(spec.name, spec.hf_key)) for spec in specs]
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec("lm_head", (D, V), ("embed", "vocab"), "lm_head.weight", (V, D), True))
    if cfg.lm_head_bias:
        specs.append(WeightSpec("lm_head_bias", (V,), ("vocab",), "lm_head.bias", (V,)))
    if cfg.dense_layers:
        specs = _with_dense_layers(specs, cfg)
    return _fp8(specs, cfg) if cfg.weight_quant is not None else specs


def _with_dense_layers(specs: list[WeightSpec], cfg: ModelConfig) -> list[WeightSpec]:
    """A mixture of experts led by `dense_layers` dense ones: theirs stacked apart as `dense_layers.*` (the dense
    model's layer weights), the experts' layers' stacks holding the rest."""
    dense_ids, sparse_ids = tuple(range(cfg.dense_layers)), tuple(range(cfg.dense_layers, cfg.num_layers))
    dense = [dataclasses.replace(spec, name="dense_" + spec.name, layer_ids=dense_ids)
             for spec in weight_table(dataclasses.replace(cfg.dense_part(), weight_quant=None)) if spec.stacked]
    return dense + [dataclasses.replace(spec, layer_ids=sparse_ids) if spec.stacked else spec for spec in specs]


def _mla_specs(specs: list[WeightSpec], cfg: ModelConfig) -> list[WeightSpec]:
    """DeepSeek-V3's attention (ModelConfig.kv_lora_rank): q through `wq_a`, its norm and `wq_b` (or one `wq`), the
    latent `w_ckv` and the shared RoPE'd key `w_kpe` (rows of one `kv_a_proj_with_mqa`), the latent's norm, and
    `wkv_b` [R, N, nope + v], each head's key part (absorbed into q) then value part (out of the latent)."""
    D, N, R, Rq = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    Hq, Hr, Hv, a = cfg.qk_nope_dim + cfg.qk_rope_dim, cfg.qk_rope_dim, cfg.v_head_dim, "model.layers.{i}.self_attn."
    kv_a = a + "kv_a_proj_with_mqa.weight"
    out = [spec for spec in specs if spec.name not in ("layers.wq", "layers.wk", "layers.wv", "layers.wo")]
    if Rq:
        out += [WeightSpec("layers.wq_a", (D, Rq), ("embed", "q_lora"), a + "q_a_proj.weight", (Rq, D), True),
                WeightSpec("layers.q_a_norm", (Rq,), ("q_lora",), a + "q_a_layernorm.weight", (Rq,), init="ones"),
                WeightSpec("layers.wq_b", (Rq, N, Hq), ("q_lora", "heads", "head_dim"), a + "q_b_proj.weight",
                           (N * Hq, Rq), True)]
    else:
        out.append(WeightSpec("layers.wq", (D, N, Hq), ("embed", "heads", "head_dim"), a + "q_proj.weight",
                              (N * Hq, D), True))
    return out + [
        WeightSpec("layers.w_ckv", (D, R), ("embed", "kv_lora"), kv_a, (R + Hr, D), True, hf_rows=(0, R)),
        WeightSpec("layers.w_kpe", (D, Hr), ("embed", "head_dim"), kv_a, (R + Hr, D), True, hf_rows=(R, R + Hr)),
        WeightSpec("layers.kv_a_norm", (R,), ("kv_lora",), a + "kv_a_layernorm.weight", (R,), init="ones"),
        WeightSpec("layers.wkv_b", (R, N, cfg.qk_nope_dim + Hv), ("kv_lora", "heads", "head_dim"),
                   a + "kv_b_proj.weight", (N * (cfg.qk_nope_dim + Hv), R), True),
        WeightSpec("layers.wo", (N, Hv, D), ("heads", "head_dim", "embed"), a + "o_proj.weight", (D, N * Hv), True)]


def _fp8(specs: list[WeightSpec], cfg: ModelConfig) -> list[WeightSpec]:
    """An fp8 checkpoint's table: each quantized projection as its float8_e4m3fn bits, followed by its scales."""
    out = []
    for spec in specs:
        if spec.name not in QUANTIZABLE or _skipped(spec, cfg):
            out.append(spec)
            continue
        if len(spec.hf_shape) != 2:
            raise ConfigError(f"fp8 weights of {cfg.model_type}'s experts in one tensor are not supported")
        hf_out, hf_in = spec.hf_shape
        rows, block_in = (b or whole for b, whole in zip(cfg.weight_quant.block, spec.hf_shape))
        if hf_in % block_in:
            raise ConfigError(f"{spec.hf_key.format(i=0, e=0)} has {hf_in} input columns, not a multiple of the "
                              f"fp8 block's {block_in}")
        lead = 1 if spec.per_expert else 0
        in_dims = next(k for k in range(1, len(spec.shape) + 1) if math.prod(spec.shape[lead:lead + k]) == hf_in)
        scale = WeightSpec(f"{spec.name}_scale", (*spec.shape[:lead], hf_in // block_in, *spec.shape[lead + in_dims:]),
                           (*spec.axes[:lead], "in_blocks", *spec.axes[lead + in_dims:]),
                           spec.hf_key.replace(".weight", "." + cfg.weight_quant.scale_key),
                           (-(-hf_out // rows), hf_in // block_in), True, "ones", spec.hf_rows, "float32", rows)
        out += [dataclasses.replace(spec, dtype=FP8), scale]
    return out


def _skipped(spec: WeightSpec, cfg: ModelConfig) -> bool:
    """Whether modules_to_not_convert names this projection's module (as transformers matches them: from the
    start to a module boundary, as a regex, or as a suffix), in every layer or none."""
    modules = [key.removesuffix(".weight") for key in spec.hf_keys(cfg.num_layers)]
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    hits = [any(re.match(rf"(?:{p}){boundary}", m) or m.endswith(p) for p in cfg.weight_quant.skip) for m in modules]
    if any(hits) and not all(hits):
        raise ConfigError(f"modules_to_not_convert leaves some layers' {spec.name.split('.')[-1]} in fp8 and others "
                          "not: jaxinfer stacks a weight's layers in one dtype")
    return all(hits)


def spec_dtype(spec: WeightSpec, dtype):
    """The dtype a weight is held in: its own (fp8 and its scales), else the model's."""
    return jnp.dtype(spec.dtype) if spec.dtype is not None else jnp.dtype(dtype)


# Checkpoint names of a mixture of experts' weights: the block, the router, each expert's gate, up and down.
_EXPERT_KEYS = {"mixtral": ("block_sparse_moe.", "gate", "w1", "w3", "w2"),
                "minimax_m2": ("block_sparse_moe.", "gate", "w1", "w3", "w2"),
                "hunyuan_v1_moe": ("mlp.", "gate.wg", "gate_proj", "up_proj", "down_proj")}
_QWEN_EXPERT_KEYS = ("mlp.", "gate", "gate_proj", "up_proj", "down_proj")


def _expert_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """The router and the experts' stacked MLPs (Qwen2-MoE adds a shared expert and its sigmoid gate)."""
    D, F, X = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    if cfg.model_type == "gpt_oss":
        return _gpt_oss_expert_specs(cfg)
    if cfg.model_type == "granitemoe":  # every expert in one tensor: gate and up rows of `input_linear`, then down
        b = "model.layers.{i}.block_sparse_moe."
        return [WeightSpec("layers.router", (D, X), ("embed", "experts"), b + "router.layer.weight", (X, D), True),
                WeightSpec("layers.w_gate", (X, D, F), ("experts", "embed", "mlp"), b + "input_linear.weight",
                           (X, 2 * F, D), True, hf_rows=(0, F)),
                WeightSpec("layers.w_up", (X, D, F), ("experts", "embed", "mlp"), b + "input_linear.weight",
                           (X, 2 * F, D), True, hf_rows=(F, 2 * F)),
                WeightSpec("layers.w_down", (X, F, D), ("experts", "mlp", "embed"), b + "output_linear.weight",
                           (X, D, F), True)]
    if cfg.fused_experts:
        return _fused_expert_specs(cfg)
    block, router, gate, up, down = _EXPERT_KEYS.get(cfg.model_type, _QWEN_EXPERT_KEYS)
    ep = "model.layers.{i}." + block + "experts.{e}."
    specs = [  # a router whose logits stay float32 is float32 (transformers keeps HunYuan-MoE's and GLM-4.5's so)
        WeightSpec("layers.router", (D, X), ("embed", "experts"), f"model.layers.{{i}}.{block}{router}.weight",
                   (X, D), True, dtype="float32" if cfg.router_logits_f32 else None),
        WeightSpec("layers.w_gate", (X, D, F), ("experts", "embed", "mlp"), ep + gate + ".weight", (F, D), True),
        WeightSpec("layers.w_up", (X, D, F), ("experts", "embed", "mlp"), ep + up + ".weight", (F, D), True),
        WeightSpec("layers.w_down", (X, F, D), ("experts", "mlp", "embed"), ep + down + ".weight", (D, F), True),
    ]
    if cfg.router_correction:  # its correction bias, kept in float32 as transformers keeps it: beside the router's
        #                         weight (MiniMax-M2's beside the block, ERNIE's in `moe_statics` as [1, X])
        at, shape = {"minimax_m2": (block, (X,)),
                     "ernie4_5_moe": (f"{block}moe_statics.", (1, X))}.get(cfg.model_type, (f"{block}{router}.", (X,)))
        specs.append(WeightSpec("layers.router_correction", (X,), ("experts",),
                                f"model.layers.{{i}}.{at}e_score_correction_bias", shape, init="zeros",
                                dtype="float32"))
    if cfg.shared_expert_size:  # Qwen2-MoE's, with a sigmoid gate; HunYuan-MoE's `shared_mlp` and the others'
        S = cfg.shared_expert_size  # `shared_experts`, without
        shared = "shared_expert" if cfg.shared_expert_gated else \
            "shared_mlp" if cfg.model_type == "hunyuan_v1_moe" else "shared_experts"
        sp = "model.layers.{i}.mlp." + shared
        specs += [
            WeightSpec("layers.shared_gate", (D, S), ("embed", "mlp"), sp + ".gate_proj.weight", (S, D), True),
            WeightSpec("layers.shared_up", (D, S), ("embed", "mlp"), sp + ".up_proj.weight", (S, D), True),
            WeightSpec("layers.shared_down", (S, D), ("mlp", "embed"), sp + ".down_proj.weight", (D, S), True),
        ]
        if cfg.shared_expert_gated:
            specs.append(WeightSpec("layers.shared_expert_gate", (D,), ("embed",), sp + "_gate.weight", (1, D), True))
    return specs


def _fused_expert_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Qwen3-VL-MoE's experts, as the Hub ships them: every layer's in one `gate_up_proj` [X, D, 2F] (gate the first
    F columns, up the rest) and one `down_proj` [X, F, D]. transformers 5 writes them transposed ([X, 2F, D],
    [X, D, F]), which loading takes too (`_as_stored`)."""
    D, F, X, ep = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, "model.layers.{i}.mlp.experts."
    return [WeightSpec("layers.router", (D, X), ("embed", "experts"), "model.layers.{i}.mlp.gate.weight", (X, D),
                       True),
            WeightSpec("layers.w_gate", (X, D, F), ("experts", "embed", "mlp"), ep + "gate_up_proj", (X, D, 2 * F),
                       hf_columns=(0, F, 1)),
            WeightSpec("layers.w_up", (X, D, F), ("experts", "embed", "mlp"), ep + "gate_up_proj", (X, D, 2 * F),
                       hf_columns=(F, 2 * F, 1)),
            WeightSpec("layers.w_down", (X, F, D), ("experts", "mlp", "embed"), ep + "down_proj", (X, F, D))]


def _as_stored(spec: WeightSpec, shape: tuple[int, ...]) -> WeightSpec:
    """An expert tensor in one of transformers 5's layouts, its last two axes swapped from the Hub's (as its loader
    swaps them when the shape says so): read through a permutation."""
    lead, (a, b) = spec.hf_shape[:-2], spec.hf_shape[-2:]
    if spec.hf_shape == shape or shape != (*lead, b, a) or spec.hf_permute is not None:
        return spec
    return dataclasses.replace(spec, hf_shape=shape, hf_permute=(*range(len(lead)), len(lead) + 1, len(lead)))


def _gpt_oss_expert_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """gpt-oss's router and experts, with their biases: every layer's experts in one tensor each, stored [X, in, out]
    (not transposed), gate and up interleaved column by column in `gate_up_proj`; an MXFP4 checkpoint's experts as
    `mxfp4_specs` says."""
    D, F, X, b = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, "model.layers.{i}.mlp."
    gate_up, gate_up_bias = b + "experts.gate_up_proj", b + "experts.gate_up_proj_bias"
    specs = [WeightSpec("layers.router", (D, X), ("embed", "experts"), b + "router.weight", (X, D), True),
              WeightSpec("layers.router_bias", (X,), ("experts",), b + "router.bias", (X,)),
              WeightSpec("layers.w_gate", (X, D, F), ("experts", "embed", "mlp"), gate_up, (X, D, 2 * F),
                         hf_columns=(0, None, 2)),
              WeightSpec("layers.w_up", (X, D, F), ("experts", "embed", "mlp"), gate_up, (X, D, 2 * F),
                         hf_columns=(1, None, 2)),
              WeightSpec("layers.b_gate", (X, F), ("experts", "mlp"), gate_up_bias, (X, 2 * F),
                         hf_columns=(0, None, 2)),
              WeightSpec("layers.b_up", (X, F), ("experts", "mlp"), gate_up_bias, (X, 2 * F),
                         hf_columns=(1, None, 2)),
              WeightSpec("layers.w_down", (X, F, D), ("experts", "mlp", "embed"), b + "experts.down_proj", (X, F, D)),
              WeightSpec("layers.b_down", (X, D), ("experts", "embed"), b + "experts.down_proj_bias", (X, D))]
    return mxfp4_specs(specs, cfg) if cfg.mxfp4 else specs


MXFP4_BLOCK = 32  # values sharing one exponent, along a weight's in dimension


def mxfp4_specs(specs: list[WeightSpec], cfg: ModelConfig) -> list[WeightSpec]:
    """gpt-oss's experts as the Hub ships them, kept so: each projection's `_blocks` [X, out, in / 32, 16] bytes (two
    4-bit e2m1 floats a byte, low nibble first) held as [X, in / 32, 16, out], and its `_scales` [X, out, in / 32]
    (one power of two per block of 32, its exponent + 127) as `<name>_exponent` [X, in / 32, out]; the layer scan
    widens them (transformer.dequantized). Gate and up stay interleaved row by row, as in the float tensor."""
    D, F, X = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    if D % MXFP4_BLOCK or F % MXFP4_BLOCK:
        raise ConfigError(f"MXFP4 experts need hidden_size ({D}) and intermediate_size ({F}) in blocks of "
                          f"{MXFP4_BLOCK}")
    out = [spec for spec in specs if spec.name not in ("layers.w_gate", "layers.w_up", "layers.w_down")]
    for name, hf_name, ins, outs, in_axis, out_axis, interleave in (
            ("w_gate", "gate_up_proj", D, F, "in_blocks", "mlp", (0, None, 2)),
            ("w_up", "gate_up_proj", D, F, "in_blocks", "mlp", (1, None, 2)),
            ("w_down", "down_proj", F, D, "mlp_blocks", "embed", None)):
        hf_key = f"model.layers.{{i}}.mlp.experts.{hf_name}"
        blocks, rows = ins // MXFP4_BLOCK, outs * (2 if interleave else 1)
        packed = dict(dtype="uint8", mxfp4=True, hf_columns=interleave)
        out += [WeightSpec(f"layers.{name}", (X, blocks, MXFP4_BLOCK // 2, outs),
                           ("experts", in_axis, "block_bytes", out_axis), hf_key + "_blocks",
                           (X, rows, blocks, MXFP4_BLOCK // 2), hf_permute=(0, 2, 3, 1), **packed),
                WeightSpec(f"layers.{name}_exponent", (X, blocks, outs), ("experts", in_axis, out_axis),
                           hf_key + "_scales", (X, rows, blocks), hf_permute=(0, 2, 1), **packed)]
    return out


def _fused(specs: list[WeightSpec], cfg: ModelConfig) -> list[WeightSpec]:
    """Phi-3's layout: q, k and v are rows of one `qkv_proj`, the MLP's gate and up rows of one `gate_up_proj`;
    GLM's: the gate and up only."""
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv, gate_up = "model.layers.{i}.self_attn.qkv_proj.weight", "model.layers.{i}.mlp.gate_up_proj.weight"
    qkv_shape, gate_up_shape = ((N + 2 * K) * H, D), (2 * F, D)
    parts = {"layers.w_gate": (gate_up, gate_up_shape, (0, F)), "layers.w_up": (gate_up, gate_up_shape, (F, 2 * F))}
    if cfg.model_type in FUSED_PROJECTIONS:
        parts.update({"layers.wq": (qkv, qkv_shape, (0, N * H)), "layers.wk": (qkv, qkv_shape, (N * H, (N + K) * H)),
                      "layers.wv": (qkv, qkv_shape, ((N + K) * H, (N + 2 * K) * H))})
    return [dataclasses.replace(spec, hf_key=parts[spec.name][0], hf_shape=parts[spec.name][1],
                                hf_rows=parts[spec.name][2]) if spec.name in parts else spec for spec in specs]


def _two_projection_mlp(specs: list[WeightSpec], cfg: ModelConfig) -> list[WeightSpec]:
    """StarCoder 2's MLP: `c_fc` (our w_up) and `c_proj` (w_down), no gate; their biases where it has them.
    Phi-2's names them `fc1` and `fc2`, Arcee's `up_proj` and `down_proj`."""
    D, F, lp = cfg.hidden_size, cfg.intermediate_size, "model.layers.{i}."
    up, down = {"phi": ("mlp.fc1", "mlp.fc2"), "arcee": ("mlp.up_proj", "mlp.down_proj"),
                "apertus": ("mlp.up_proj", "mlp.down_proj")}.get(cfg.model_type, ("mlp.c_fc", "mlp.c_proj"))
    keys = {"layers.w_up": lp + up + ".weight", "layers.w_down": lp + down + ".weight"}
    specs = [dataclasses.replace(spec, hf_key=keys.get(spec.name, spec.hf_key)) for spec in specs
             if spec.name != "layers.w_gate"]
    if cfg.mlp_bias:
        specs += [WeightSpec("layers.b_up", (F,), ("mlp",), lp + up + ".bias", (F,)),
                  WeightSpec("layers.b_down", (D,), ("embed",), lp + down + ".bias", (D,))]
    if cfg.activation == "xielu":  # its learned scalars, each layer's (alpha_p, alpha_n of shape [1]; beta, eps [])
        specs += [WeightSpec(f"layers.xielu_{name}", shape, ("scalar",) * len(shape), f"{lp}mlp.act_fn.{name}",
                             shape, init="zeros") for name, shape in (("alpha_p", (1,)), ("alpha_n", (1,)),
                                                                      ("beta", ()), ("eps", ()))]
    if cfg.model_type == "apertus":  # its norms' names
        keys = {"layers.attn_norm": lp + "attention_layernorm.weight",
                "layers.mlp_norm": lp + "feedforward_layernorm.weight"}
        specs = [dataclasses.replace(spec, hf_key=keys.get(spec.name, spec.hf_key)) for spec in specs]
    return specs


def _post_norms(specs: list[WeightSpec], cfg: ModelConfig) -> list[WeightSpec]:
    """Norms of each sublayer's output: `post_attention_layernorm` norms the attention's output (in Llama it is the
    MLP's input norm, in Gemma 2/3 `pre_feedforward_layernorm`), `post_feedforward_layernorm` the MLP's. OLMo 2/3
    norm no sublayer's input."""
    D, lp = cfg.hidden_size, "model.layers.{i}."
    # GLM-4-0414 keeps Llama's name for the MLP's input norm and names the output norms after the sublayers.
    glm = cfg.model_type in GLM_MODEL_TYPES
    post_attn, post_mlp = ("post_self_attn_layernorm", "post_mlp_layernorm") if glm else \
        ("post_attention_layernorm", "post_feedforward_layernorm")
    if cfg.pre_norms and not glm:
        specs = [dataclasses.replace(spec, hf_key=lp + "pre_feedforward_layernorm.weight")
                 if spec.name == "layers.mlp_norm" else spec for spec in specs]
    elif not cfg.pre_norms:
        specs = [spec for spec in specs if spec.name not in ("layers.attn_norm", "layers.mlp_norm")]
    return specs + [WeightSpec("layers.post_attn_norm", (D,), ("embed",), lp + post_attn + ".weight", (D,),
                               init="ones"),
                    WeightSpec("layers.post_mlp_norm", (D,), ("embed",), lp + post_mlp + ".weight", (D,),
                               init="ones")]


def param_count(cfg: ModelConfig) -> int:
    """The model's parameters (an fp8 model's scales and an MXFP4 model's exponents not counted; two a byte of
    MXFP4 blocks)."""
    return sum(math.prod(spec.full_shape(cfg.num_layers)) * (2 if spec.mxfp4 else 1) for spec in weight_table(cfg)
               if not spec.scale_rows and not spec.name.endswith("_exponent"))


def _set_path(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get_path(tree: dict, dotted: str):
    for p in dotted.split("."):
        tree = tree[p]
    return tree


def _fan_in(spec: WeightSpec) -> int:
    # Inputs are the leading dims of a [in..., out...] weight; the embedding reads one row.
    if spec.name == "embed":
        return spec.shape[1]
    if spec.name.endswith("wo"):
        return spec.shape[0] * spec.shape[1]
    return spec.shape[1] if spec.axes[0] == "experts" and len(spec.shape) > 1 else spec.shape[0]


def _load_sharding(spec: WeightSpec, cfg: ModelConfig, mesh):
    """Where a weight is placed as the checkpoint has it: KV heads that will be replicated over the 'model'
    axis (fewer heads than devices) stay whole until `expand_kv_heads`."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if kv_replicas(cfg.num_kv_heads, mesh.shape["model"]) > 1:
        return spec.sharding(mesh, replicated=("kv_heads",))
    return spec.sharding(mesh)


def abstract_params(cfg: ModelConfig, dtype, mesh=None) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s (with shardings when a mesh is given)."""
    tree: dict = {}
    for spec in weight_table(cfg):
        shape = spec.full_shape(cfg.num_layers)
        sharding = _load_sharding(spec, cfg, mesh) if mesh is not None else None
        _set_path(tree, spec.name, jax.ShapeDtypeStruct(shape, spec_dtype(spec, dtype), sharding=sharding))
    return tree


def init_params(cfg: ModelConfig, dtype, seed: int = 0, mesh=None) -> dict:
    """Deterministic random weights: normal with std 1/sqrt(fan_in) (varied greedy outputs), norms scaling by one.
    Each is drawn straight onto its shards (the same values whatever the mesh). An fp8 model's are the
    unquantized model's draws, quantized; an MXFP4 model's experts random codes (`_mxfp4_draw`)."""
    if cfg.weight_quant is not None:
        return quantized_params(init_params(dataclasses.replace(cfg, weight_quant=None), dtype, seed, mesh), cfg, mesh)
    tree: dict = {}
    root = jax.random.PRNGKey(seed)
    for index, spec in enumerate(weight_table(cfg)):
        shape = spec.full_shape(cfg.num_layers)
        if spec.mxfp4:
            draw = _mxfp4_draw(spec, shape, jax.random.fold_in(root, index))
        elif spec.init in ("ones", "zeros"):
            draw = functools.partial(jnp.ones if spec.init == "ones" else jnp.zeros, shape, spec_dtype(spec, dtype))
        else:
            scale = 1 / math.sqrt(_fan_in(spec))
            key = jax.random.fold_in(root, index)
            draw = functools.partial(lambda k: (jax.random.normal(k, shape, jnp.float32) * scale).astype(dtype), key)
        _set_path(tree, spec.name, jax.jit(draw, out_shardings=_load_sharding(spec, cfg, mesh))())
    return tree


FP4_RMS = 2.93  # the root mean square of the 16 e2m1 codes' values, drawn uniformly


def _mxfp4_draw(spec: WeightSpec, shape: tuple[int, ...], key):
    """Random MXFP4 weights: uniform codes, every block's exponent making their std about 1/sqrt(fan_in)."""
    if not spec.name.endswith("_exponent"):
        return functools.partial(jax.random.bits, key, shape, jnp.uint8)
    fan_in = spec.shape[1] * MXFP4_BLOCK
    return functools.partial(jnp.full, shape, 127 + round(math.log2(1 / (FP4_RMS * math.sqrt(fan_in)))), jnp.uint8)


def quantize_fp8(w: jax.Array, lead: int, in_dims: int, blocks: int) -> tuple[jax.Array, jax.Array]:
    """w [lead..., in..., out...] -> (float8_e4m3fn values as bits, float32 scales [lead..., blocks, out...]): each out
    element's block of in rows scaled so its largest magnitude is fp8's largest, in transformers' arithmetic (so
    the values are the ones its quantizer writes)."""
    x = w.astype(jnp.float32).reshape(*w.shape[:lead], blocks, -1, *w.shape[lead + in_dims:])
    amax = jnp.max(jnp.abs(x), axis=lead + 1)
    factor = jnp.where(amax > 0, FP8_MAX / jnp.where(amax > 0, amax, 1.0), 1.0)
    values = jnp.clip(x * jnp.expand_dims(factor, lead + 1), -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return jax.lax.bitcast_convert_type(values.reshape(w.shape), jnp.uint8), 1.0 / factor


def online_fp8(cfg: ModelConfig) -> ModelConfig:
    """vLLM's `--quantization fp8` for a checkpoint in 16/32 bits: the config whose projections are fp8, one scale
    per out element and block of in rows (128, or the largest power of two under it that divides every in dim)."""
    ins = [spec.hf_shape[1] for spec in weight_table(cfg) if spec.name in QUANTIZABLE]
    return dataclasses.replace(cfg, weight_quant=WeightQuant((1, math.gcd(128, *ins)), ("lm_head",)))


def quantized_params(params: dict, cfg: ModelConfig, mesh=None) -> dict:
    """Quantize an unquantized model's projections in place as `cfg`'s table holds them (`online_fp8`'s, or a
    checkpoint's format for random weights), one weight at a time: each original is freed once its fp8 copy
    exists."""
    table = {spec.name: spec for spec in weight_table(cfg)}
    for spec in table.values():
        if not spec.scale_rows:
            continue
        name = spec.name.removesuffix("_scale")
        weight = _get_path(params, name)
        quantize = functools.partial(quantize_fp8, lead=1 + spec.per_expert,
                                     in_dims=weight.ndim - len(spec.full_shape(cfg.num_layers)) + 1,
                                     blocks=spec.shape[spec.per_expert])
        values, scales = jax.jit(quantize, out_shardings=(_load_sharding(table[name], cfg, mesh),
                                                          _load_sharding(spec, cfg, mesh)))(weight)
        weight.delete()
        _set_path(params, name, values)
        _set_path(params, spec.name, scales)
    return params


def expand_kv_heads(params: dict, cfg: ModelConfig, mesh) -> tuple[dict, ModelConfig]:
    """With fewer KV heads than 'model' devices, repeat each head r = model / K times (head j becomes heads
    j*r .. j*r + r - 1), so the pool and K/V weights split evenly; query head n then reads copy n // (G / r),
    which holds its original head n // G, so the model computes the same function. -> (params, the config
    with num_kv_heads = K * r)."""
    r = kv_replicas(cfg.num_kv_heads, mesh.shape["model"]) if mesh is not None else 1
    if r == 1:
        return params, cfg
    wide = dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * r)
    for spec in weight_table(wide):
        if "kv_heads" in spec.axes:
            axis = spec.full_axes().index("kv_heads")
            repeat = jax.jit(functools.partial(jnp.repeat, repeats=r, axis=axis), out_shardings=spec.sharding(mesh))
            _set_path(params, spec.name, repeat(_get_path(params, spec.name)))
    return params, wide


# Where a multimodal checkpoint keeps its language model: the Hub's Gemma 3 and Mistral Small files (and
# transformers 5's) under `language_model.`, transformers 4.52-4.57's and Qwen3-VL's under `model.language_model.`,
# Qwen2-VL's and Qwen2.5-VL's under `model.` as a text model's. Its vision tower's tensors are not read.
_LANGUAGE_MODEL_PREFIXES = ({"model.": "language_model.model.", "lm_head.": "language_model.lm_head."},
                            {"model.": "model.language_model."})
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
                   "visual.", "model.visual.")


def _checkpoint_keys(reader: safetensors_io.Reader):
    """Our table's checkpoint key -> the key in this checkpoint: the same, or under a multimodal checkpoint's
    language model."""
    for prefixes in _LANGUAGE_MODEL_PREFIXES:
        if prefixes["model."] + "embed_tokens.weight" in reader:
            return lambda key: next((new + key[len(old):] for old, new in prefixes.items() if key.startswith(old)), key)
    return lambda key: key


def _check_tensor(reader: safetensors_io.Reader, key: str, spec: WeightSpec) -> None:
    if key not in reader:
        raise CheckpointError(f"checkpoint is missing tensor {key!r} (expected shape {spec.hf_shape})")
    shape = reader.shape(key)
    if shape != spec.hf_shape and not (spec.scale_rows and shape in ((), (1,)) and spec.hf_shape == (1, 1)):
        raise CheckpointError(f"tensor {key!r} has shape {shape}, expected {spec.hf_shape}")
    reader.check_dtype(key, fp8=spec.fp8, packed=spec.mxfp4)


def _check_tied_head(reader: safetensors_io.Reader, cfg: ModelConfig, rename) -> None:
    # Some tied checkpoints also store the embedding as lm_head.weight: harmless. A different lm_head is not:
    # transformers 5 then unties the two (4.x tied them anyway), so which one was meant is unclear.
    head, embed = rename("lm_head.weight"), rename("model.embed_tokens.weight")
    if not cfg.tie_word_embeddings or head not in reader or embed not in reader:
        return  # a missing embedding is _check_tensor's to name
    if not np.array_equal(reader.get(head), reader.get(embed)):
        raise CheckpointError("config.json has tie_word_embeddings=true but the checkpoint's 'lm_head.weight' differs "
                              "from 'model.embed_tokens.weight': set tie_word_embeddings to false to use "
                              "lm_head.weight (as transformers 5 does), or remove lm_head.weight to tie them")


def load_safetensors(path: str | Path, cfg: ModelConfig, dtype, mesh=None) -> dict:
    """Load a single-file or sharded safetensors checkpoint, cast to `dtype`, strictly. Each device's shard is
    cut from the checkpoint on the host and sent alone, so no weight is ever whole on one device (and each
    process reads only the shards of its own devices). fp8 weights and MXFP4 experts stay as they are stored."""
    reader = safetensors_io.Reader(Path(path))
    rename = _checkpoint_keys(reader)
    _check_tied_head(reader, cfg, rename)  # before any weight is loaded: it fails fast
    used: set[str] = set()
    tree: dict = {}
    for spec in weight_table(cfg):
        np_dtype = np.dtype(spec_dtype(spec, dtype))
        keys = [rename(key) for key in spec.hf_keys(cfg.num_layers)]
        if cfg.fused_experts and spec.axes[0] == "experts" and keys[0] in reader:
            spec = _as_stored(spec, reader.shape(keys[0]))
        for key in keys:
            _check_tensor(reader, key, spec)  # every tensor checked, even those no local device needs
        used.update(keys)

        def shard(index, spec=spec, keys=keys, np_dtype=np_dtype):
            def read(key):
                return spec.to_ours(reader.get(key, fp8=spec.fp8, packed=spec.mxfp4))

            if not spec.stacked:
                return read(keys[0])[index].astype(np_dtype)
            layers = range(len(spec.layers(cfg.num_layers)))[index[0]]
            if not spec.per_expert:
                return np.stack([read(keys[i])[index[1:]].astype(np_dtype) for i in layers])
            experts = range(cfg.num_experts)[index[1]]
            return np.stack([np.stack([read(keys[i * cfg.num_experts + e])[index[2:]]
                                       .astype(np_dtype) for e in experts]) for i in layers])

        shape = spec.full_shape(cfg.num_layers)
        _set_path(tree, spec.name, jax.make_array_from_callback(shape, _load_sharding(spec, cfg, mesh), shard))
    _check_leftovers(reader.keys(), used, cfg, rename)
    return tree


def _check_leftovers(keys, used: set[str], cfg: ModelConfig, rename) -> None:
    ignorable = {rename("lm_head.weight")} if cfg.tie_word_embeddings else set()  # see _check_tied_head
    rotary = {k for k in keys if k.endswith("rotary_emb.inv_freq")}  # old Llama exports
    vision = {k for k in keys if k.startswith(VISION_PREFIXES)} if cfg.vision_tower else set()
    quant = cfg.weight_quant
    inputs = {k for k in keys if k.endswith(".input_scale")} if quant and quant.input_scales else set()  # W8A16
    after_last = tuple(rename(f"model.layers.{i}.") for i in range(cfg.num_layers, cfg.num_layers + cfg.mtp_layers))
    mtp = {k for k in keys if (after_last and k.startswith(after_last)) or (cfg.model_type == "ernie4_5_moe" and
                                                                        k.startswith(rename("model.mtp")))}
    if mtp:
        log.info("not loading the checkpoint's %d multi-token-prediction tensors", len(mtp))
    if vision:
        log.info("serving the checkpoint's language model as text: its %d vision tensors are not loaded", len(vision))
    unexpected = sorted(set(keys) - used - ignorable - rotary - vision - inputs - mtp)
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"checkpoint has unexpected tensor(s) {shown}{more} for a "
                              f"{cfg.model_type} model with {cfg.num_layers} layers")


def to_hf_tensors(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The parameter tree in the checkpoint's keys and layouts (host numpy)."""
    if cfg.weight_quant is not None or cfg.mxfp4:
        raise CheckpointError(f"{'MXFP4' if cfg.mxfp4 else 'fp8'} weights are not written back as a Hugging Face "
                              "checkpoint: serve the checkpoint itself, or convert it to orbax")
    parts: dict[str, list] = {}
    for spec in weight_table(cfg):
        value = np.asarray(jax.device_get(_get_path(params, spec.name)))
        per_key = value.reshape(-1, *value.shape[2:]) if spec.per_expert else value if spec.stacked else value[None]
        for key, part in zip(spec.hf_keys(cfg.num_layers), per_key):
            parts.setdefault(key, []).append((spec, spec.to_hf(part)))
    return {key: _whole_tensor(specs_parts) for key, specs_parts in parts.items()}


def _whole_tensor(specs_parts: list) -> np.ndarray:
    """A checkpoint tensor from the weights that are its parts: rows of a fused tensor one after the other, columns
    side by side, or columns interleaved (gpt-oss's gate and up)."""
    ordered = sorted(specs_parts, key=lambda sp: (sp[0].hf_rows or sp[0].hf_columns or (0,))[0])
    parts, columns = [part for _, part in ordered], ordered[0][0].hf_columns
    if columns is not None and columns[2] > 1:
        return np.stack(parts, axis=-1).reshape(*parts[0].shape[:-1], -1)
    axis = -1 if columns is not None else max(parts[0].ndim - 2, 0)
    return np.ascontiguousarray(np.concatenate(parts, axis=axis))
