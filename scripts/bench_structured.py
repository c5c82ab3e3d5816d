"""What structured outputs cost: the engine's output tokens/s with and without a grammar, side by side in one run,
and the host's cost of one next-token mask.

Runs `LLM.generate` on the embedded default model (or `--model`) three ways over the same prompts, greedy, each
request producing exactly `--tokens` tokens: plain; every request held to a regex that any `--tokens` letters
and spaces satisfy (so both runs produce the same number of tokens); and half the requests held to it. Each
way runs once to compile, then `--repeats` timed runs, the three ways taking turns; the median is printed. A
grammar's sequence decodes one token per dispatch and the engine then reads each step before planning the next,
so the gap is mostly lost overlap and multi-round dispatches, not the mask. The mask's host cost is timed apart:
`fill_mask` for a JSON schema's matcher, per token, over the model's vocabulary.

    python scripts/bench_structured.py                    # the default model, 32 requests of 64 tokens
    python scripts/bench_structured.py --model DIR        # a checkpoint directory with tokenizer files
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import numpy as np

from jaxinfer import LLM, SamplingParams, StructuredOutputsParams
from jaxinfer.config import EngineConfig
from jaxinfer.engine.structured import mask_words

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "string"}}}, "required": ["name", "tags"]}


def timed_generate(llm: LLM, prompts: list[str], mixes: dict[str, list[SamplingParams]],
                   repeats: int) -> dict[str, tuple[float, int]]:
    """Per mix: (median seconds, output tokens); the mixes take turns, so that a machine that drifts during the
    run weighs on each alike."""
    for params in mixes.values():
        llm.generate(prompts, params, use_tqdm=False)  # compiles what this mix needs
    seconds, tokens = {name: [] for name in mixes}, {}
    for _ in range(repeats):
        for name, params in mixes.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds[name].append(time.perf_counter() - start)
            tokens[name] = sum(len(o.outputs[0].token_ids) for o in outs)
    return {name: (statistics.median(seconds[name]), tokens[name]) for name in mixes}


def mask_cost(llm: LLM, steps: int) -> float:
    """Median seconds of one `fill_mask` while a JSON-schema matcher follows `steps` greedy-free random tokens."""
    grammars = llm.engine.grammars
    grammar = grammars.matcher(grammars.compile(StructuredOutputsParams(json=SCHEMA)), llm.engine.eos_id)
    row, rng, times = np.zeros(mask_words(grammars.vocab_size), np.int32), np.random.default_rng(0), []
    for _ in range(steps):
        start = time.perf_counter()
        grammar.fill_mask(row)
        times.append(time.perf_counter() - start)
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:grammars.vocab_size])
        if grammar.complete or not grammar.accept(int(rng.choice(allowed))):
            break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(args.model, EngineConfig(max_slots=args.requests, max_model_len=256, prefill_chunk=256))
    prompts = [f"Verse {i}: and the LORD said" for i in range(args.requests)]
    plain = SamplingParams(max_tokens=args.tokens, min_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    held = dataclasses.replace(plain, structured_outputs=StructuredOutputsParams(regex=f"[a-z ]{{{args.tokens * 8}}}"))
    print(f"machine: {platform.processor() or platform.machine()}, {args.requests} requests x {args.tokens} tokens, "
          f"vocab {llm.engine.vocab_size}, decode_steps {llm.engine.cfg.decode_steps}")
    mixes = {"plain": [plain] * args.requests, "all held to a regex": [held] * args.requests,
             "half held": [held, plain] * (args.requests // 2)}
    base = None
    for name, (seconds, tokens) in timed_generate(llm, prompts, mixes, args.repeats).items():
        base = base or tokens / seconds
        print(f"{name:>20}: {seconds:7.2f} s, {tokens / seconds:8.1f} output tokens/s ({tokens / seconds / base:.2f}x)")
    print(f"host mask for a JSON schema: {mask_cost(llm, 200) * 1e6:.0f} us per token")


if __name__ == "__main__":
    main()
