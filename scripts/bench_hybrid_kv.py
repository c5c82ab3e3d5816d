"""The hybrid KV cache manager against whole-context KV for every layer, side by side, in one KV budget.

A random checkpoint shaped like Gemma 3 (five sliding layers to each global one; scaled down to run on a CPU)
serves the same long-prompt workload twice in the same byte budget for the KV pool: with the hybrid KV cache
manager (sliding layers hold their window's pages only) and with `disable_hybrid_kv_cache_manager`. Greedy,
`ignore_eos`: the two runs must give the same tokens. Printed per run: pages in the pool (a page holds a KV cache
group's layers, so the hybrid pool has more, smaller pages), the most sequences running at once, preemptions,
the most KV held per running sequence (in layer-tokens), wall time and output tokens per second. Example:

    python scripts/bench_hybrid_kv.py                        # 24 requests of 1-2K prompt tokens, CPU-sized
    python scripts/bench_hybrid_kv.py --layers 26 --hidden 1152 --window 512 --budget-mib 2048 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine.pages import NULL_PAGE
from jaxinfer.llm import LLM, SamplingParams


def gemma3_config(args) -> dict:
    return {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": args.vocab,
            "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": 1, "head_dim": args.head_dim,
            "max_position_embeddings": 8192, "sliding_window": args.window, "sliding_window_pattern": 6,
            "query_pre_attn_scalar": args.head_dim, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "bos_token_id": 2, "eos_token_id": 1}


def run(path: Path, args, disable: bool, prompts, outputs) -> dict:
    engine = EngineConfig(max_slots=args.slots, page_size=args.page_size, prefill_chunk=args.chunk,
                          max_model_len=args.max_model_len, kv_cache_memory=int(args.budget_mib * 2**20),
                          dtype=args.dtype, disable_hybrid_kv_cache_manager=disable)
    llm = LLM(path, engine)
    cfg, layout = llm.engine_config, llm.engine_config.kv_layout(llm.model_config)
    ids = [llm.engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), stream=False)
           for p, n in zip(prompts, outputs)]
    finals, most_running, most_held = {}, 0, 0
    start = time.perf_counter()
    while llm.engine.has_work():
        for out in llm.engine.step():
            finals[out.request_id] = out
        running = llm.engine.scheduler.running
        most_running = max(most_running, len(running))
        for seq in running:  # KV held, in layer-tokens: pages x the layers a page holds x tokens per page
            pages = sum(page != NULL_PAGE for group in seq.pages for page in group)
            most_held = max(most_held, pages * layout.width * cfg.page_size)
    seconds = time.perf_counter() - start
    llm.engine.check_idle()
    tokens = [finals[i].outputs[0].token_ids for i in ids]
    return {"hybrid": not disable, "groups": len(layout.windows), "layers_per_page": layout.width,
            "pages": cfg.num_pages, "most_running": most_running, "preemptions": llm.engine.stats().preemptions,
            "most_kv_per_seq_layer_tokens": most_held, "seconds": seconds,
            "output_tok_s": sum(map(len, tokens)) / seconds, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=[1024, 2048])
    parser.add_argument("--output-len-range", type=int, nargs=2, default=[32, 96])
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2304)
    parser.add_argument("--budget-mib", type=float, default=24.0, help="bytes for the KV pool, in MiB")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, args.vocab, n).tolist() for n in rng.integers(*args.input_len_range,
                                                                              endpoint=True, size=args.num_requests)]
    outputs = rng.integers(*args.output_len_range, endpoint=True, size=args.num_requests).tolist()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gemma3-shaped.json"
        path.write_text(json.dumps(gemma3_config(args)))
        results = [run(path, args, disable, prompts, outputs) for disable in (False, True)]
    same = results[0].pop("tokens") == results[1].pop("tokens")
    print(f"# {platform.node()}: {args.layers} layers (window {args.window}), {args.num_requests} requests of "
          f"{args.input_len_range} prompt and {args.output_len_range} output tokens, KV budget {args.budget_mib} MiB")
    print(f"{'hybrid':>7} {'groups':>6} {'layers/page':>11} {'pages':>7} {'most running':>12} {'preempted':>9} "
          f"{'most KV/seq (layer-tokens)':>26} {'seconds':>8} {'out tok/s':>9}")
    for r in results:
        print(f"{str(r['hybrid']):>7} {r['groups']:>6} {r['layers_per_page']:>11} {r['pages']:>7} "
              f"{r['most_running']:>12} {r['preemptions']:>9} {r['most_kv_per_seq_layer_tokens']:>26} "
              f"{r['seconds']:>8.1f} {r['output_tok_s']:>9.1f}")
    print(f"same greedy tokens: {same}; output tokens/s ratio (hybrid / whole): "
          f"{results[0]['output_tok_s'] / results[1]['output_tok_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "same_tokens": same, "runs": results}, indent=1))
    if not same:
        raise SystemExit("the two runs gave different tokens")


if __name__ == "__main__":
    main()
