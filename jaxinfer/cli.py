"""The `jaxinfer` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from jaxinfer.config import DTYPES, ConfigError, EngineConfig
from jaxinfer.model.safetensors_io import CheckpointError

MODEL_HELP = "a Hugging Face checkpoint directory, a `jaxinfer convert` output, or a config .json " \
             "(random weights); default: the embedded model"


def _generate(args) -> None:
    from jaxinfer.llm import LLM, SamplingParams
    engine = EngineConfig(max_slots=min(len(args.prompts), 64), dtype=args.dtype)
    llm = LLM(args.model, engine)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    start, compiling = time.perf_counter(), llm.runner.compile_seconds
    outputs = llm.generate(args.prompts, params)
    compiling = llm.runner.compile_seconds - compiling
    running = time.perf_counter() - start - compiling
    for out in outputs:
        print(out.prompt + out.outputs[0].text)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"[{generated} tokens in {running:.2f}s ({generated / running:.1f} tokens/s) after "
          f"{llm.runner.num_compiles} compiles in {compiling:.1f}s]", file=sys.stderr)


def _convert(args) -> None:
    import jax

    from jaxinfer.model.checkpoint import find_model, load_config, load_params, save_orbax
    from jaxinfer.sharding import make_mesh
    source = find_model(args.model)
    if source.weights is None:
        raise CheckpointError("convert needs a checkpoint directory with weights (--model PATH)")
    cfg = load_config(source)
    dtype = EngineConfig(dtype=args.dtype).resolve(cfg, jax.default_backend()).dtype
    start = time.perf_counter()
    params = load_params(source, cfg, dtype, make_mesh())
    loaded = time.perf_counter()
    save_orbax(params, dtype, source.directory, Path(args.output))
    print(f"read {source.weights} in {loaded - start:.2f}s; wrote orbax checkpoint ({dtype}) to "
          f"{args.output} in {time.perf_counter() - loaded:.2f}s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="LLM inference on JAX")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading and compiling")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts and print the text")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--model", default=None, help=MODEL_HELP)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto")
    gen.set_defaults(run=_generate)

    conv = sub.add_parser("convert", help="write a Hugging Face checkpoint as an orbax checkpoint")
    conv.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    conv.add_argument("--output", required=True, help="directory to write")
    conv.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto")
    conv.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ConfigError, CheckpointError, ValueError, MemoryError) as e:
        print(f"jaxinfer {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
