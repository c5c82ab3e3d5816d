"""Mixture-of-experts layer benchmark: the engine's dense experts against XLA's `ragged_dot`, side by side.

Times one MoE MLP (router, experts, mix; `jaxinfer.model.transformer.moe`) on random weights, jitted,
for decode-like and prefill-like token counts, three ways on the same inputs, beside a floor:
- `dense`: the engine's form: every expert on every token, unchosen experts weighted zero;
- `ragged_dot`: tokens sorted by chosen expert and multiplied group by group by `jax.lax.ragged_dot` (what
  a grouped matmul would do with only the chosen experts' arithmetic), then unsorted and mixed;
- `blocked`: the same sorted tokens laid out in blocks of `--block` rows, each block one expert's (groups
  padded to whole blocks), one batched matmul over the blocks with each block's expert weights gathered;
- `active-width MLP`: a dense MLP `experts_per_token` experts wide, no routing: the arithmetic the chosen
  experts need, the floor a grouped kernel could reach.
Each figure is the median of `--repeats` timed runs after a compile-and-warm run; the MoE forms' outputs are
compared with the dense form's. Examples:

    python scripts/bench_moe.py                                      # two shapes, 32, 256 and 512 tokens
    python scripts/bench_moe.py --experts 128 --k 8 --hidden 2048 --width 768 --tokens 64 2048 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

from bench_sampling import median_seconds  # scripts/, beside this one
from jaxinfer.config import ModelConfig
from jaxinfer.model.transformer import expert_weights, mlp, moe

SHAPES = [  # (experts, per token, hidden, expert width): Mixtral's and Qwen3-MoE's proportions, scaled down
    (8, 2, 1024, 3584),
    (64, 8, 512, 192),
]


def ragged_moe(lp: dict, cfg: ModelConfig, y: jax.Array) -> jax.Array:
    """The same layer by `ragged_dot`: each token's k (token, expert) pairs sorted by expert, one grouped
    matmul per projection, then each token's k outputs weighted and summed."""
    B, T, D = y.shape
    k, X = cfg.experts_per_token, cfg.num_experts
    weights = expert_weights(lp, cfg, y).reshape(B * T, X)
    top, chosen = jax.lax.top_k(weights, k)
    flat = chosen.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = y.reshape(B * T, D)[order // k]
    sizes = jnp.bincount(flat, length=X).astype(jnp.int32)
    act = jax.nn.silu(jax.lax.ragged_dot(rows, lp["w_gate"], sizes)) * jax.lax.ragged_dot(rows, lp["w_up"], sizes)
    out = jax.lax.ragged_dot(act, lp["w_down"], sizes)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(B * T, k, D)
    return jnp.sum(unsorted * top.astype(y.dtype)[..., None], axis=1).reshape(B, T, D)


def blocked_moe(lp: dict, cfg: ModelConfig, y: jax.Array, block: int) -> jax.Array:
    """The same layer as batched matmuls over blocks of `block` sorted rows, every block one expert's: at most
    ceil((R k + X (block - 1)) / block) blocks for R tokens, whatever the routing."""
    B, T, D = y.shape
    R, k, X = B * T, cfg.experts_per_token, cfg.num_experts
    top, chosen = jax.lax.top_k(expert_weights(lp, cfg, y).reshape(R, X), k)
    flat = chosen.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=X)
    padded = (sizes + block - 1) // block * block
    ends = jnp.cumsum(padded)
    expert_of = flat[order]
    dest = (ends - padded)[expert_of] + jnp.arange(R * k) - (jnp.cumsum(sizes) - sizes)[expert_of]
    blocks = -(-(R * k + X * (block - 1)) // block)
    rows = jnp.zeros((blocks * block, D), y.dtype).at[dest].set(y.reshape(R, D)[order // k]).reshape(blocks, block, D)
    expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(blocks) * block, side="right"), X - 1)
    act = jax.nn.silu(rows @ lp["w_gate"][expert]) * (rows @ lp["w_up"][expert])  # a batched matmul per block
    out = (act @ lp["w_down"][expert]).reshape(-1, D)
    pairs = jnp.zeros((R * k, D), y.dtype).at[order].set(out[dest]).reshape(R, k, D)
    return jnp.sum(pairs * top.astype(y.dtype)[..., None], axis=1).reshape(B, T, D)


def bench(experts: int, k: int, hidden: int, width: int, tokens: int, dtype, repeats: int, block: int) -> None:
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=8, hidden_size=hidden, intermediate_size=width,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=8,
                      num_experts=experts, experts_per_token=k, norm_topk_prob=True)
    rng = np.random.default_rng(0)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), dtype)  # noqa: E731
    lp = {"router": draw(hidden, experts), "w_gate": draw(experts, hidden, width),
          "w_up": draw(experts, hidden, width), "w_down": draw(experts, width, hidden)}
    active = {"w_gate": draw(hidden, k * width), "w_up": draw(hidden, k * width), "w_down": draw(k * width, hidden)}
    y = jnp.asarray(rng.standard_normal((1, tokens, hidden)), dtype)
    forms = {"dense": jax.jit(lambda p, x: moe(p, cfg, x)), "ragged_dot": jax.jit(lambda p, x: ragged_moe(p, cfg, x)),
             f"blocked/{block}": jax.jit(lambda p, x: blocked_moe(p, cfg, x, block))}
    outs = {name: fn(lp, y).astype(jnp.float32) for name, fn in forms.items()}
    diff = max(float(jnp.max(jnp.abs(out - outs["dense"]))) for out in outs.values())
    ms = {name: median_seconds(fn, (lp, y), repeats) * 1e3 for name, fn in forms.items()}
    floor = median_seconds(jax.jit(lambda p, x: mlp(p, cfg, x)), (active, y), repeats) * 1e3
    others = " | ".join(f"{name} {ms[name]:8.2f} ms ({ms[name] / ms['dense']:5.2f}x dense)" for name in list(forms)[1:])
    print(f"{experts:>4} {k:>3} {hidden:>6} {width:>6} {tokens:>6} | dense {ms['dense']:8.2f} ms | {others} | "
          f"active-width MLP {floor:7.2f} ms ({ms['dense'] / floor:5.2f}x under dense) | max |form - dense| {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, help="with --k, --hidden, --width: one shape instead of the two")
    parser.add_argument("--k", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 256, 512])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block", type=int, default=64, help="rows a block of the blocked form")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (tests)")
    args = parser.parse_args()
    shapes = [(args.experts, args.k, args.hidden, args.width)] if args.experts else SHAPES
    if args.smoke:
        shapes, args.tokens, args.repeats, args.block = [(4, 2, 32, 48)], [8], 1, 4
    print(f"# {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), jax {jax.__version__}, "
          f"{args.dtype}, medians of {args.repeats}")
    print("   E   k      D      F tokens")
    for experts, k, hidden, width in shapes:
        for tokens in args.tokens:
            bench(experts, k, hidden, width, tokens, jnp.dtype(args.dtype), args.repeats, args.block)


if __name__ == "__main__":
    main()
