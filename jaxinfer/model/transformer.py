"""The Llama-family decoder as pure functions over the parameter tree.

`forward(params, cfg, batch, kv)` embeds the batch's tokens, runs the layers
with `lax.scan` over the stacked weights, writes each layer's new keys and
values into the paged pool and returns the final hidden states with the updated
pool. No Python state, no globals: everything arrives as arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig, RopeConfig, kv_layout
from pallas_kernels.flash import f32_operands
from pallas_kernels.attention import step_attention
from pallas_kernels.kv_storage import stored, widened


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """One step's queries. Padding tokens have position -1 and write to the null page. A packed prefill
    chunk is one row whose tokens belong to several prompts: `rows` names each token's prompt (its row of
    `block_tables`, [E, G, P]); each prompt's tokens are contiguous and in position order. Each row has a block
    table per KV cache group (config.KVLayout); G > 1 is the hybrid layout."""

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32
    block_tables: jax.Array  # [B, G, P] int32 page ids (or [E, G, P] when packed); 0 is the null page
    rows: jax.Array | None = None  # [1, T] int32 when packed


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVPool:
    k: jax.Array  # [Lg, K, P, Z, H], floats or their bits (pallas_kernels/kv_storage.py); Lg = L unless hybrid
    v: jax.Array  # [Lg, K, P, Z, H]


def rope_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [R/2] of the R rotated dimensions (all H but with a partial rotary factor) in float32,
    computed as Hugging Face does (incl. llama3, yarn, longrope and HunYuan's ntk_alpha scaling)."""
    dim = rope.rotary_dim(head_dim)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    theta = rope.theta * rope.alpha ** (dim / (dim - 2)) if rope.kind == "ntk_alpha" else rope.theta
    wavelengths = (np.float32(theta) ** exponents).astype(np.float32)  # over 2 pi
    inv_freq = (np.float32(1.0) / wavelengths).astype(np.float32)
    if rope.kind == "longrope":
        divisors = np.asarray(rope.long_factor if rope.long else rope.short_factor, np.float32)
        return (np.float32(1.0) / (divisors * wavelengths)).astype(np.float32)
    if rope.kind == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        return _llama3_scaling(inv_freq, rope)
    if rope.kind == "yarn":
        return _yarn_scaling(inv_freq, wavelengths, rope, dim)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = rope.original_max_position
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_scaling(inv_freq: np.ndarray, wavelengths: np.ndarray, rope: RopeConfig, dim: int) -> np.ndarray:
    # Frequencies that turn fewer than beta_slow times over the pretraining length are divided by `factor`,
    # those that turn more than beta_fast times kept, with a linear ramp over the dimensions between.
    def dimension(rotations: float) -> float:
        return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    kept = (np.float32(1) - ramp).astype(np.float32)
    divided = (np.float32(1) / (np.float32(rope.factor) * wavelengths)).astype(np.float32)
    return (divided * (np.float32(1) - kept) + inv_freq * kept).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0,
               interleaved: bool = False) -> jax.Array:
    """x [B, T, N, H], positions [B, T]: rotate-half RoPE (the Hugging Face layout) of the first R = 2 len(inv_freq)
    dimensions (the rest pass as they are), cos and sin times `scale` (YaRN's and LongRoPE's attention factor).
    `interleaved`: frequency i turns dimensions 2i and 2i + 1 (GPT-J's and Cohere's layout) instead of i and i + R/2."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, R/2]
    cos = scaled(jnp.cos(freqs)[:, :, None, :], scale)
    sin = scaled(jnp.sin(freqs)[:, :, None, :], scale)
    rotary = 2 * freqs.shape[-1]
    turned = x[..., :rotary].astype(jnp.float32)
    if interleaved:
        x1, x2 = turned[..., 0::2], turned[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(turned.shape).astype(x.dtype)
    else:
        x1, x2 = jnp.split(turned, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return out if rotary == x.shape[-1] else jnp.concatenate([out, x[..., rotary:]], axis=-1)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool = False, in_f32: bool = False,
             axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """RMSNorm over `axes` (the weight's shape). Llama's: normed in float32, rounded, times weight. `in_f32`: times
    weight in float32, then rounded (OLMo's); `plus_one`: times 1 + weight so (Gemma's)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + eps)
    if plus_one or in_f32:
        return (normed * (weight.astype(jnp.float32) + (1 if plus_one else 0))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, eps: float, bias: jax.Array | None = None) -> jax.Array:
    """LayerNorm in float32 (times the weight, plus the bias if any, too), then rounded: Cohere's (no bias) and
    StarCoder 2's."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = weight.astype(jnp.float32) * (centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1,
                                                                            keepdims=True) + eps))
    return (normed if bias is None else normed + bias.astype(jnp.float32)).astype(x.dtype)


def norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig, axes: tuple[int, ...] = (-1,),
         bias: jax.Array | None = None) -> jax.Array:
    if cfg.layer_norm:
        return layer_norm(x, weight, cfg.rms_norm_eps, bias)
    return rms_norm(x, weight, cfg.rms_norm_eps, cfg.norm_plus_one, cfg.norm_scale_f32, axes)


def qkv(lp: dict, cfg: ModelConfig, y: jax.Array):
    q = jnp.einsum("BTD,DNH->BTNH", y, lp["wq"])
    k = jnp.einsum("BTD,DKH->BTKH", y, lp["wk"])
    v = jnp.einsum("BTD,DKH->BTKH", y, lp["wv"])
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    # q/k norms head by head, or over all heads at once (OLMo: weights [N, H] and [K, H]; Cohere's LayerNorm weighs
    # each head apart, [N, H], and norms it alone); HunYuan's come after RoPE (`forward`)
    if cfg.qk_norm and not cfg.qk_norm_after_rope:
        axes = (-2, -1) if cfg.qk_norm_over_heads else (-1,)
        q, k = norm(q, lp["q_norm"], cfg, axes), norm(k, lp["k_norm"], cfg, axes)
    return q, k, v


def mla_qkv(lp: dict, cfg: ModelConfig, y: jax.Array, positions: jax.Array):
    """DeepSeek-V3's multi-head latent attention as multi-query attention over its latent (ModelConfig.kv_lora_rank):
    q [B, T, N, H] (each head's non-RoPE part taken into the latent through its key part of wkv_b, then its
    RoPE'd part), k [B, T, K, H] (the normed latent and the shared RoPE'd key), v [B, T, K, H] (the latent, zeros
    after it), H = R + the RoPE'd dims. Attention's output's first R dims, through each head's value part
    (`mla_values`), are the heads' values."""
    nope = cfg.qk_nope_dim
    if cfg.q_lora_rank:  # the low-rank q's norm, as the latent's: transformers' default eps, not the config's
        q = jnp.einsum("BTD,DR->BTR", y, lp["wq_a"])
        q = jnp.einsum("BTR,RNH->BTNH", rms_norm(q, lp["q_a_norm"], 1e-6), lp["wq_b"])
    else:
        q = jnp.einsum("BTD,DNH->BTNH", y, lp["wq"])
    latent = rms_norm(jnp.einsum("BTD,DR->BTR", y, lp["w_ckv"]), lp["kv_a_norm"], 1e-6)
    inv_freq = rope_frequencies(cfg.rope, cfg.qk_rope_dim)
    q_rope = apply_rope(q[..., nope:], positions, inv_freq, cfg.rope.attention_factor, cfg.rope_interleaved)
    k_rope = apply_rope(jnp.einsum("BTD,DH->BTH", y, lp["w_kpe"])[:, :, None], positions, inv_freq,
                        cfg.rope.attention_factor, cfg.rope_interleaved)
    q_latent = jnp.einsum("BTNH,RNH->BTNR", q[..., :nope], lp["wkv_b"][..., :nope])
    k = jnp.concatenate([latent[:, :, None], k_rope], axis=-1)
    v = jnp.concatenate([latent[:, :, None], jnp.zeros_like(k_rope)], axis=-1)
    shape = (*k.shape[:2], cfg.num_kv_heads, cfg.head_dim)  # the one latent head, repeated where tensor parallelism
    #                                                         asks for more
    return jnp.concatenate([q_latent, q_rope], axis=-1), jnp.broadcast_to(k, shape), jnp.broadcast_to(v, shape)


def mla_values(lp: dict, cfg: ModelConfig, attn: jax.Array) -> jax.Array:
    """Attention's output over the latent [B, T, N, R + RoPE'd dims] -> the heads' values [B, T, N, H]."""
    return jnp.einsum("BTNR,RNH->BTNH", attn[..., :cfg.kv_lora_rank], lp["wkv_b"][..., cfg.qk_nope_dim:])


def _write_indices(batch: Batch, page_size: int):
    """Page id in each KV cache group [G, B, T] and in-page offset [B, T] of every query token; padding goes to
    the null page."""
    valid = batch.positions >= 0
    pos = jnp.where(valid, batch.positions, 0)
    if batch.rows is None:
        page_idx = jnp.moveaxis(jnp.take_along_axis(batch.block_tables, (pos // page_size)[:, None], axis=2), 1, 0)
    else:
        page_idx = jnp.moveaxis(batch.block_tables[batch.rows, :, pos // page_size], -1, 0)
    return jnp.where(valid, page_idx, 0), pos % page_size


NO_WINDOW = 2**30  # a global layer's window beside sliding ones: wider than any context, and far from int32's end
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "relu2": lambda x: jnp.square(jax.nn.relu(x))}


def xielu(lp: dict, x: jax.Array) -> jax.Array:
    """xIELU (Apertus's), with its layer's learned scalars: alpha_p x^2 + beta x for x > 0, else
    (expm1(min(x, eps)) - x) alpha_n + beta x, where alpha_p = softplus(a_p) and alpha_n = beta + softplus(a_n)."""
    beta, eps = lp["xielu_beta"].astype(x.dtype), lp["xielu_eps"].astype(x.dtype)
    alpha_p = jax.nn.softplus(lp["xielu_alpha_p"]).astype(x.dtype)
    alpha_n = beta + jax.nn.softplus(lp["xielu_alpha_n"]).astype(x.dtype)
    return jnp.where(x > 0, alpha_p * x * x + beta * x, (jnp.expm1(jnp.minimum(x, eps)) - x) * alpha_n + beta * x)


def mlp(lp: dict, cfg: ModelConfig, y: jax.Array, prefix: str = "w") -> jax.Array:
    """act(y W_gate) * y W_up, then W_down; StarCoder 2's (no gate): act(y W_up + b_up) W_down + b_down."""
    up = jnp.einsum("BTD,DF->BTF", y, lp[f"{prefix}_up"])
    if not cfg.gated_mlp:
        up = up + lp["b_up"] if cfg.mlp_bias else up
        hidden = xielu(lp, up) if cfg.activation == "xielu" else ACTIVATIONS[cfg.activation](up)
        out = jnp.einsum("BTF,FD->BTD", hidden, lp[f"{prefix}_down"])
        return out + lp["b_down"] if cfg.mlp_bias else out
    gate = jnp.einsum("BTD,DF->BTF", y, lp[f"{prefix}_gate"])
    return jnp.einsum("BTF,FD->BTD", gated(cfg, gate, up), lp[f"{prefix}_down"])


def expert_weights(lp: dict, cfg: ModelConfig, y: jax.Array) -> jax.Array:
    """The router's weight of each expert for each token [B, T, X], float32: of the softmax's or the sigmoid's
    scores (`router_scoring`), the top `experts_per_token` by score plus a per-expert correction where the model has
    one (MiniMax-M2, GLM-4.5, DeepSeek-V3, ERNIE 4.5 MoE), within the best groups (`in_best_groups`), weighed by
    their scores (renormalised to sum to one where the model says so, times `routed_scaling`); zero elsewhere. The
    router's logits are rounded to the model's dtype first (but for the float32 routers: HunYuan-MoE's, GLM-4.5's,
    ERNIE's, DeepSeek's), as transformers and vLLM compute them, so a half-precision model chooses the experts they
    choose."""
    router = jnp.einsum("BTD,DX->BTX", *f32_operands(y, lp["router"]), preferred_element_type=jnp.float32)
    router = router + lp["router_bias"].astype(jnp.float32) if cfg.router_bias else router
    router = router if cfg.router_logits_f32 else router.astype(y.dtype).astype(jnp.float32)
    probs = jax.nn.sigmoid(router) if cfg.router_scoring == "sigmoid" else jax.nn.softmax(router, axis=-1)
    choice = probs + lp["router_correction"] if cfg.router_correction else probs
    _, chosen = jax.lax.top_k(in_best_groups(choice, cfg), cfg.experts_per_token)
    top = jnp.take_along_axis(probs, chosen, axis=-1)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    top = scaled(top, cfg.routed_scaling)
    return jnp.sum(jax.nn.one_hot(chosen, cfg.num_experts, dtype=jnp.float32) * top[..., None], axis=-2)


def in_best_groups(scores: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Group-limited routing (GLM-4.5's, DeepSeek-V2/V3's): scores [..., X] with the experts outside the best
    `router_topk_groups` of `router_groups` equal groups (a group scored by the sum of its two best, or by its best:
    `router_group_score`) at -inf."""
    if cfg.router_groups == 1:
        return scores
    grouped = scores.reshape(*scores.shape[:-1], cfg.router_groups, -1)
    scored_by = 1 if cfg.router_group_score == "max" else 2
    group_scores = jnp.sum(jax.lax.top_k(grouped, scored_by)[0], axis=-1)
    _, best = jax.lax.top_k(group_scores, cfg.router_topk_groups)
    kept = jnp.sum(jax.nn.one_hot(best, cfg.router_groups, dtype=jnp.int32), axis=-2) > 0
    return jnp.where(kept[..., None], grouped, -jnp.inf).reshape(scores.shape)


def gated(cfg: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up; gpt-oss's clamped SwiGLU ("swigluoai", as vLLM names it): gate clamped above at the limit,
    up within +-limit, (up + 1) * gate * sigmoid(alpha * gate)."""
    if cfg.activation != "swigluoai":
        return ACTIVATIONS[cfg.activation](gate) * up
    gate, up = jnp.minimum(gate, cfg.swiglu_limit), jnp.clip(up, -cfg.swiglu_limit, cfg.swiglu_limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))


def moe(lp: dict, cfg: ModelConfig, y: jax.Array) -> jax.Array:
    """A mixture of experts, computed densely: every expert runs on every token and the router's weights (zero
    for experts a token did not choose) mix their outputs. Decode reads every expert's weights either way once
    the batch's tokens choose them all; prefill does num_experts / experts_per_token times the chosen experts'
    work (a grouped matmul kernel is what would take that back). A row's result does not depend on the others."""
    weights = expert_weights(lp, cfg, y).astype(y.dtype)
    gate = jnp.einsum("BTD,XDF->BTXF", y, lp["w_gate"])
    up = jnp.einsum("BTD,XDF->BTXF", y, lp["w_up"])
    if cfg.expert_bias:  # gpt-oss's: each expert's output has its down bias, weighed as the rest of it
        gate, up = gate + lp["b_gate"], up + lp["b_up"]
    out = jnp.einsum("BTXF,XFD->BTD", gated(cfg, gate, up) * weights[..., None], lp["w_down"])
    if cfg.expert_bias:
        out = out + jnp.einsum("BTX,XD->BTD", weights, lp["b_down"])
    if cfg.shared_expert_size:
        shared = mlp(lp, cfg, y, "shared")
        if cfg.shared_expert_gated:  # Qwen2-MoE's sigmoid gate; HunYuan-MoE's is ungated
            shared = jax.nn.sigmoid(jnp.einsum("BTD,D->BT", y, lp["shared_expert_gate"]))[..., None] * shared
        out = out + shared
    return out


def rotated(cfg: ModelConfig, q: jax.Array, k: jax.Array, positions: jax.Array, sliding: jax.Array,
            rope_on: jax.Array):
    """q and k under the RoPE of their layer: Gemma 3's sliding layers (`sliding`, traced) have their own, and
    SmolLM3's layers without it (`rope_on` false) none."""
    inv_freq, scale = rope_frequencies(cfg.rope, cfg.head_dim), cfg.rope.attention_factor
    if cfg.local_rope is not None:
        local = rope_frequencies(cfg.local_rope, cfg.head_dim)
        inv_freq = jnp.where(sliding, local, inv_freq)
        if cfg.local_rope.attention_factor != scale:
            scale = jnp.where(sliding, cfg.local_rope.attention_factor, scale)
    q_rot, k_rot = (apply_rope(x, positions, inv_freq, scale, cfg.rope_interleaved) for x in (q, k))
    if not cfg.rope_layers:
        return q_rot, k_rot
    return jnp.where(rope_on, q_rot, q), jnp.where(rope_on, k_rot, k)


def attend(attention, cfg: ModelConfig, sliding: jax.Array, *args, rows=None, sinks=None):
    """`attention` with the layer's window. Where sliding layers interleave with global ones (Gemma 2/3, OLMo 3)
    the window is traced, a global layer's wider than any context: one attention for both kinds, not a branch
    (XLA:GPU runs a branch by reading its predicate on the host: a wait for the device at every layer)."""
    if not cfg.sliding_layers or len(set(cfg.sliding_layers)) == 1:
        window = cfg.layer_window(0)
    else:
        window = jnp.where(sliding, cfg.sliding_window, NO_WINDOW)
    return attention(*args, window, rows=rows, softcap=cfg.attn_softcap, sinks=sinks)


def forward(params: dict, cfg: ModelConfig, batch: Batch, kv: KVPool, attention=step_attention("reference")):
    """-> (final-normed hidden states [B, T, D], updated pool)."""
    page_size = kv.k.shape[3]
    pages, offsets = _write_indices(batch, page_size)
    layout = kv_layout(cfg, hybrid=batch.block_tables.shape[1] > 1)
    if kv.k.shape[0] != layout.width or batch.block_tables.shape[1] != layout.num_groups:
        raise ValueError(f"a pool of {kv.k.shape[0]} layers and {batch.block_tables.shape[1]} block tables per row "
                         f"do not fit this model's KV layout ({layout.width} layers, {layout.num_groups} groups)")
    group_of, slot_of = jnp.asarray(layout.group_of), jnp.asarray(layout.slot_of)
    sliding_layers = jnp.asarray(cfg.sliding_layers or [cfg.sliding_window is not None] * cfg.num_layers)
    rope_layers = jnp.asarray(cfg.rope_layers or [True] * cfg.num_layers)

    def layer(cfg, carry, xs):  # `cfg`: the dense part's for the leading dense layers
        h, k_pool, v_pool = carry
        lp, index = xs
        lp = dequantized(lp, cfg, h.dtype)
        normed = norm(h, lp["attn_norm"], cfg, bias=lp.get("attn_norm_bias")) if cfg.pre_norms else h
        if cfg.kv_lora_rank:
            q, k, v = mla_qkv(lp, cfg, normed, batch.positions)
        else:
            q, k, v = qkv(lp, cfg, normed)
            q, k = rotated(cfg, q, k, batch.positions, sliding_layers[index], rope_layers[index])
        if cfg.qk_norm_after_rope:  # HunYuan's
            q, k = norm(q, lp["q_norm"], cfg), norm(k, lp["k_norm"], cfg)
        if cfg.attention_multiplier is not None:  # every attention path scales by 1 / sqrt(H): undo it in q
            q = (q.astype(jnp.float32) * (cfg.attention_multiplier * cfg.head_dim ** 0.5)).astype(q.dtype)
        # Advanced indices split by a slice put [B, T] first: the target is [B, T, K, H].
        group, slot = group_of[index], slot_of[index]
        k_pool = k_pool.at[slot, :, pages[group], offsets].set(stored(k, k_pool.dtype))
        v_pool = v_pool.at[slot, :, pages[group], offsets].set(stored(v, v_pool.dtype))
        attn = attend(attention, cfg, sliding_layers[index], q, k_pool, v_pool, slot, batch.block_tables[:, group],
                      batch.positions, rows=batch.rows, sinks=lp.get("sinks"))
        attn = mla_values(lp, cfg, attn) if cfg.kv_lora_rank else attn
        out = jnp.einsum("BTNH,NHD->BTD", attn, lp["wo"])
        out = out + lp["bo"] if cfg.o_bias else out
        if cfg.parallel_block:  # Cohere: h + attention(norm(h)) + MLP(norm(h))
            return (h + out + mlp(lp, cfg, normed), k_pool, v_pool), None
        h = h + scaled(norm(out, lp["post_attn_norm"], cfg) if cfg.post_norms else out, cfg.residual_multiplier)
        y = norm(h, lp["mlp_norm"], cfg, bias=lp.get("mlp_norm_bias")) if cfg.pre_norms else h
        out = moe(lp, cfg, y) if cfg.num_experts else mlp(lp, cfg, y)
        h = h + scaled(norm(out, lp["post_mlp_norm"], cfg) if cfg.post_norms else out, cfg.residual_multiplier)
        return (h, k_pool, v_pool), None

    carry = (scaled(params["embed"][batch.tokens], cfg.embedding_multiplier), kv.k, kv.v)
    if cfg.dense_layers:  # a stack of their own, scanned first
        carry, _ = jax.lax.scan(functools.partial(layer, cfg.dense_part()), carry,
                                (params["dense_layers"], jnp.arange(cfg.dense_layers)))
    layer_ids = jnp.arange(cfg.dense_layers, cfg.num_layers)
    (h, k_pool, v_pool), _ = jax.lax.scan(functools.partial(layer, cfg), carry, (params["layers"], layer_ids))
    return norm(h, params["final_norm"], cfg, bias=params.get("final_norm_bias")), KVPool(k_pool, v_pool)


MXFP4_BIAS = 127  # an MXFP4 block's exponent byte is its power of two plus this


def mxfp4_widened(blocks: jax.Array, exponents: jax.Array, dtype) -> jax.Array:
    """MXFP4 experts (weights.mxfp4_specs) as [X, in, out] of `dtype`: blocks [X, in / 32, 16, out], two e2m1 codes a
    byte (the low nibble first), times their block's power of two, exponents [X, in / 32, out]. Each value's float32
    bits are put together from its code's sign, exponent and mantissa bits with the block's exponent added (exact,
    with no table lookup: through a gather, a tiny model's decode step took 4.7x the float32 one's on the CPU)."""
    X, blocks_in, pairs, outs = blocks.shape
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-2).astype(jnp.int32)  # [X, in / 32, 16, 2, out]
    shift = exponents.astype(jnp.int32)[:, :, None, None, :] - MXFP4_BIAS
    sign, exponent, mantissa = (codes & 8) << 28, (codes >> 1) & 3, codes & 1
    # e2m1: 2**(e - 1) * (1 + m / 2) for e > 0, m / 2 for e = 0 (0 and 0.5)
    biased = jnp.where(exponent > 0, exponent + 126 + shift, jnp.where(mantissa == 1, 126 + shift, 0))
    bits = sign | (biased << 23) | jnp.where(exponent > 0, mantissa << 22, 0)
    values = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return values.reshape(X, blocks_in * 2 * pairs, outs).astype(dtype)


def dequantized(lp: dict, cfg: ModelConfig, dtype) -> dict:
    """A layer's weights with each fp8 weight (its bits) times its scales (weights.py: one per out element and block
    of in rows), in the activations' dtype: the matmuls read one byte a weight and compute in `dtype` (W8A16); MXFP4
    experts widened likewise (half a byte a weight)."""
    out = dict(lp)
    if cfg.mxfp4:
        for name in ("w_gate", "w_up", "w_down"):
            out[name] = mxfp4_widened(out[name], out.pop(f"{name}_exponent"), dtype)
    for name, scale in lp.items():
        if name.endswith("_scale"):
            w = lp[name.removesuffix("_scale")]
            lead = int(cfg.num_experts > 0 and name.startswith(("w_gate", "w_up", "w_down")))
            rows = math.prod(w.shape[lead:w.ndim - scale.ndim + 1 + lead])  # the in dims' size
            full = jnp.repeat(scale, rows // scale.shape[lead], axis=lead, total_repeat_length=rows)
            out[name.removesuffix("_scale")] = (widened(w, jnp.float32) * full.reshape(w.shape)).astype(dtype)
    return out


def scaled(x: jax.Array, multiplier: float) -> jax.Array:
    """x times a constant (Granite's multipliers, YaRN's attention factor, Gemma's embedding scale), or a traced
    scalar; at 1.0 nothing is traced."""
    return x if isinstance(multiplier, float) and multiplier == 1.0 else x * jnp.asarray(multiplier, x.dtype)


def logits(params: dict, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """h [..., D] -> float32 logits [..., V] (divided by Granite's logits_scaling, capped by Gemma 2's
    final_softcap)."""
    if cfg.tie_word_embeddings:
        out = jnp.einsum("...D,VD->...V", *f32_operands(h, params["embed"]), preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("...D,DV->...V", *f32_operands(h, params["lm_head"]), preferred_element_type=jnp.float32)
    if cfg.lm_head_bias:
        out = out + params["lm_head_bias"].astype(jnp.float32)
    out = out if cfg.logits_scaling == 1.0 else out / cfg.logits_scaling
    return out if cfg.final_softcap is None else cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
