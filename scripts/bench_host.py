"""The host's share of a decode step: the real engine loop over an executor whose steps take no time.

Every slot decodes (short prompts, long outputs, `ignore_eos`), so each `Engine.step` is the scheduler's
planning of `--slots` sequences, the plan's arrays and the reading of their tokens: what the device must
outlast for the host to stay hidden behind it. Timed side by side in one run: one KV cache group of global
layers, and the hybrid layout of a Gemma-3-like model (one global group and `--sliding-groups` sliding ones).
Example:

    python scripts/bench_host.py                      # 256 slots, 1 group against 1 + 6
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.request import SamplingParams
from jaxinfer.planner.profile import InstantExecutor


def step_ms(args, windows: tuple[int | None, ...]) -> float:
    """Median milliseconds of `Engine.step` over `--steps` steps with every slot decoding."""
    per_seq = -(-args.max_model_len // args.page_size)
    engine_cfg = EngineConfig(max_slots=args.slots, page_size=args.page_size, max_model_len=args.max_model_len,
                              num_pages=args.slots * per_seq * len(windows) + 1, decode_steps=args.decode_steps,
                              max_prefill_seqs=16, kv_windows=windows)
    engine = Engine(engine_cfg, InstantExecutor(), vocab_size=1000)
    rng = np.random.default_rng(0)
    for _ in range(args.slots):
        engine.add_request(rng.integers(3, 1000, int(rng.integers(8, 16))).tolist(),
                           SamplingParams(max_tokens=args.max_model_len - 16, ignore_eos=True), stream=False)
    while engine.scheduler.waiting or engine.scheduler.prefilling is not None:
        engine.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    assert len(engine.scheduler.running) == args.slots, "a sequence ended while timed: raise --max-model-len"
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--sliding-groups", type=int, default=6)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=768)
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    print(f"# {platform.node()}: {args.slots} slots decoding, {args.decode_steps} tokens a step, host only")
    hybrid = (None,) + (args.window,) * args.sliding_groups
    for name, windows in (("1 global group", (None,)), (f"1 global + {args.sliding_groups} sliding", hybrid)):
        ms = step_ms(args, windows)
        print(f"{name:>24}: {ms:6.2f} ms a step, {ms * 1e3 / args.slots:5.1f} us a slot", flush=True)


if __name__ == "__main__":
    main()
