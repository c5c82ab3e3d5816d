"""Decode-bucket benchmark: a decode-only step with few of its slots decoding, at the smallest decode bucket
that holds them against the full slot width, side by side.

Two runners of the same model and slot count in one process, one with `decode_buckets` (by default this
platform's) and one without (every step at the full width); each case's steps are timed on both, in
turn, `rounds` times over, and the medians are printed. A quiet server, or the tail of a batch, decodes
this way. Example:

    python scripts/bench_buckets.py                                   # SmolLM2-135M shape, 32 slots
    python scripts/bench_buckets.py --slots 32 --live 4 16 --context 368
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from jaxinfer.bench import decode_plan, machine, time_step
from jaxinfer.config import EngineConfig
from jaxinfer.llm import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2-135m.json", help="model (random weights from a config)")
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--buckets", type=int, nargs="+", default=None, help="decode buckets (default: auto)")
    parser.add_argument("--live", type=int, nargs="+", default=[4, 16], help="slots decoding in each case")
    parser.add_argument("--context", type=int, default=368, help="tokens before each decoding slot's first")
    parser.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps)
    parser.add_argument("--max-model-len", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per engine, alternating")
    args = parser.parse_args()
    base = EngineConfig(max_slots=args.slots, max_model_len=args.max_model_len, decode_steps=args.decode_steps)
    full = (args.slots,)
    runners = {name: LLM(args.config, dataclasses.replace(base, decode_buckets=buckets)).runner
               for name, buckets in (("buckets", None if args.buckets is None else tuple(args.buckets)),
                                     ("full", full))}
    print(f"# {args.config} on {machine()}; {args.slots} slots, decode buckets "
          f"{list(runners['buckets'].engine.decode_buckets)}, k={args.decode_steps}, context {args.context}")
    print("| slots decoding | rows computed | decode buckets (ms) | full width (ms) | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for live in args.live:
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                times[name].append(time_step(runner, decode_plan(runner.engine, live, args.context,
                                                                 args.decode_steps), args.repeats))
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        plan = decode_plan(runners["buckets"].engine, live, args.context, args.decode_steps)
        rows = runners["buckets"].layout_for(plan).shape("positions")[0]
        print(f"| {live} | {rows} | {ms['buckets']:.1f} | {ms['full']:.1f} | {ms['full'] / ms['buckets']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
