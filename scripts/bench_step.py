"""Step-time benchmark: prefill tokens/s and decode step time per batch size, plus checkpoint load times.

Runs the engine's own jitted steps (ModelRunner) on a random model of a preset's
shape (default: SmolLM2-135M). Every figure is the median of several timed runs
after a compile-and-warm run. Example:

    python scripts/bench_step.py --config configs/smollm2-135m.json --batches 1 8 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.model.checkpoint import find_model, load_config, load_params, save_orbax, save_safetensors
from jaxinfer.runner import ModelRunner
from jaxinfer.sharding import make_mesh


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_prefill(runner: ModelRunner, chunk: int, repeats: int) -> float:
    table = np.arange(1, runner.engine.pages_per_seq + 1, dtype=np.int32)
    tokens = np.random.RandomState(0).randint(0, runner.cfg.vocab_size, chunk).astype(np.int32)
    return _median_seconds(lambda: runner.prefill(tokens, 0, table, 0.0, 0), repeats)


def bench_decode(runner: ModelRunner, batch: int, context: int, repeats: int) -> float:
    """Decode step time with `batch` slots active at `context` tokens each."""
    B, P, Z = runner.engine.max_slots, runner.engine.pages_per_seq, runner.engine.page_size
    tables = np.zeros((B, P), np.int32)
    tables[:batch] = 1 + np.arange(batch * P).reshape(batch, P)
    positions = np.full(B, -1, np.int32)
    positions[:batch] = context
    tokens = np.ones(B, np.int32)
    temps, seeds = np.zeros(B, np.float32), np.zeros(B, np.uint32)
    assert batch * P < runner.engine.num_pages and context < P * Z
    return _median_seconds(lambda: runner.decode(tokens, positions, tables, temps, seeds), repeats)


def bench_load(source, cfg, dtype: str, mesh, repeats: int) -> dict:
    """Median seconds to load the same weights from safetensors and from `jaxinfer convert`'s orbax tree
    (files in the page cache after the first read; the reads alternate)."""
    params = load_params(source, cfg, dtype, mesh)
    with tempfile.TemporaryDirectory() as tmp:
        st_dir, orbax_dir = Path(tmp) / "st", Path(tmp) / "orbax"
        st_dir.mkdir()
        (st_dir / "config.json").write_text(json.dumps(cfg.to_hf()))
        save_safetensors(params, cfg, st_dir, st_dir)
        save_orbax(params, dtype, st_dir, orbax_dir)
        del params
        timings = {"safetensors": [], "orbax": []}
        for _ in range(repeats):
            for name, path in (("safetensors", st_dir), ("orbax", orbax_dir)):
                start = time.perf_counter()
                jax.block_until_ready(load_params(find_model(path), cfg, dtype, mesh))
                timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-135m.json")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--context", type=int, default=128, help="tokens already in each decoding slot")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()

    source = find_model(args.config)
    cfg = load_config(source)
    mesh = make_mesh()
    params = load_params(source, cfg, args.dtype, mesh)

    def runner(slots: int) -> ModelRunner:
        engine = EngineConfig(max_slots=slots, page_size=16, prefill_chunk=max(args.chunks),
                              max_model_len=args.max_model_len, dtype=args.dtype).resolve(cfg, jax.default_backend())
        return ModelRunner(cfg, engine, params, mesh)

    print(f"# {source.config_path.name} {args.dtype} on {jax.devices()[0].device_kind} ({platform.machine()}, "
          f"{len(jax.devices())} device(s)); max_model_len {args.max_model_len}, page size 16")
    prefill_runner = runner(1)
    for chunk in args.chunks:
        sec = bench_prefill(prefill_runner, chunk, args.repeats)
        print(f"prefill chunk {chunk:5d}: {sec * 1e3:8.1f} ms  {chunk / sec:9.1f} tokens/s")
    for batch in args.batches:  # an engine of `batch` slots, all of them decoding
        sec = bench_decode(runner(batch), batch, args.context, args.repeats)
        print(f"decode batch {batch:3d} (context {args.context}): {sec * 1e3:8.1f} ms/step  {batch / sec:8.1f} tokens/s")
    if not args.skip_load:
        del params, prefill_runner
        for name, sec in bench_load(source, cfg, args.dtype, mesh, args.repeats).items():
            print(f"load from {name:11s}: {sec:.2f}s")


if __name__ == "__main__":
    main()
