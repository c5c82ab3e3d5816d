"""Step-time benchmark: prefill tokens/s and decode step time per batch size, plus checkpoint load times.

Runs the engine's own jitted step (`ModelRunner.dispatch` of hand-built step
plans) on a random model of a preset's shape (default: SmolLM2-135M). Decode is
timed with the engine's decode steps per dispatch and with one, per token.
Every figure is the median of several timed runs after a compile-and-warm run.
Example:

    python scripts/bench_step.py --config configs/smollm2-135m.json --batches 1 8 32
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxinfer.bench import decode_plan, prefill_plan, time_step
from jaxinfer.config import ATTENTION_BACKENDS, KV_CACHE_DTYPES, EngineConfig
from jaxinfer.model.checkpoint import find_model, load_config, load_params, save_orbax, save_safetensors
from jaxinfer.model.weights import init_params, online_fp8, quantized_params
from jaxinfer.runner import ModelRunner
from jaxinfer.sharding import make_mesh


def bench_prefill(runner: ModelRunner, chunk: int, repeats: int) -> float:
    """One prefill-only step: a `chunk`-token prompt into slot 0, sampled after its last token."""
    tokens = np.random.RandomState(0).randint(0, runner.cfg.vocab_size, chunk)
    return time_step(runner, prefill_plan(runner.engine, tokens), repeats)


def bench_decode(runner: ModelRunner, batch: int, context: int, k: int, repeats: int) -> float:
    """Seconds per decode token of one slot: a dispatch of `k` decode steps with `batch` slots active at
    `context` tokens each, divided by k."""
    return time_step(runner, decode_plan(runner.engine, batch, context, k), repeats) / k


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
    parser.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps,
                        help="decode steps per dispatch (the engine's decode_steps); k=1 is timed too, "
                             "except under static control flow (the GPU default), which never runs it")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention-backends", nargs="+", choices=ATTENTION_BACKENDS, default=["auto"],
                        help="decode is timed with each, side by side")
    parser.add_argument("--kv-cache-dtypes", nargs="+", choices=KV_CACHE_DTYPES, default=["auto"],
                        help="decode is timed with a KV pool of each, side by side")
    parser.add_argument("--quantizations", nargs="+", choices=["none", "fp8", "mxfp4"], default=["none"],
                        help="decode is timed with the weights as loaded, with fp8 projections (--quantization "
                             "fp8) and with random MXFP4 experts (gpt-oss's, held 4-bit), side by side")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()

    source = find_model(args.config)
    plain = load_config(source)
    mesh = make_mesh()
    loaded = load_params(source, plain, args.dtype, mesh)
    models = {"none": (plain, loaded)} if "none" in args.quantizations else {}
    if "fp8" in args.quantizations:
        models["fp8"] = (online_fp8(plain), quantized_params(jax.tree.map(jax.numpy.copy, loaded), online_fp8(plain),
                                                             mesh))
    if "mxfp4" in args.quantizations:
        packed = dataclasses.replace(plain, mxfp4=True)
        models["mxfp4"] = (packed, init_params(packed, args.dtype, mesh=mesh))
    cfg, params = next(iter(models.values()))

    def runner(slots: int, backend: str = args.attention_backends[0], kv: str = args.kv_cache_dtypes[0],
               quantization: str = args.quantizations[0]) -> ModelRunner:
        cfg, params = models[quantization]
        engine = EngineConfig(max_slots=slots, page_size=16, prefill_chunk=max(args.chunks),
                              decode_steps=args.decode_steps, max_model_len=args.max_model_len, dtype=args.dtype,
                              attention_backend=backend, kv_cache_dtype=kv).resolve(cfg, jax.default_backend())
        full = slots * engine.pages_per_seq * len(engine.kv_groups) + 1  # every slot full length in every group
        engine = dataclasses.replace(engine, num_pages=full)
        return ModelRunner(cfg, engine, params, mesh)

    print(f"# {source.config_path.name} {args.dtype} on {jax.devices()[0].device_kind} ({platform.machine()}, "
          f"{len(jax.devices())} device(s)); max_model_len {args.max_model_len}, page size 16")
    prefill_runner = runner(1)
    for chunk in args.chunks:
        sec = bench_prefill(prefill_runner, chunk, args.repeats)
        print(f"prefill chunk {chunk:5d}: {sec * 1e3:8.1f} ms  {chunk / sec:9.1f} tokens/s")
    for batch, backend, kv, quantization in itertools.product(args.batches, args.attention_backends,
                                                              args.kv_cache_dtypes, args.quantizations):
        decoder = runner(batch, backend, kv, quantization)  # `batch` slots, all decoding
        static = decoder.engine.control_flow == "static"  # every decode-only dispatch runs all k rounds
        weights = "" if quantization == "none" else f", {quantization} weights"
        for k in dict.fromkeys((args.decode_steps,) if static else (args.decode_steps, 1)):
            sec = bench_decode(decoder, batch, args.context, k, args.repeats)
            print(f"decode batch {batch:3d} (context {args.context}, k={k}, {decoder.engine.attention_backend}, "
                  f"KV {decoder.engine.kv_cache_dtype}{weights}): {sec * 1e3:8.1f} ms/step  {batch / sec:8.1f} "
                  "tokens/s")
    if not args.skip_load:
        del params, loaded, models, prefill_runner, decoder
        for name, sec in bench_load(source, plain, args.dtype, mesh, args.repeats).items():
            print(f"load from {name:11s}: {sec:.2f}s")


if __name__ == "__main__":
    main()
