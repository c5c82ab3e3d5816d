"""Throughput benchmarks: `jaxinfer bench offline`, and the hand-built step plans that time the bare step.

`offline` runs one synthetic workload (random token-id prompts, per-request output lengths,
`ignore_eos`) through the engine and, side by side in the same process, through
(a) static batching on the same engine (waves of `max_slots` requests in arrival order, the engine's
own queue order, padded to their longest member, no joining mid-flight), (b) Hugging Face `generate` on
the same weights, and (c) the bare jitted step, which gives the ceiling. Compile time stays out of every
figure and is reported apart.

This module drives the engine through its public surface only (`LLM`, `Engine.stats()`,
`LLM.reset_prefix_cache()`, the executor seam, `ModelRunner.dispatch`); it must not reach into scheduler
or runner state.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxinfer.config import EngineConfig
from jaxinfer.engine.pages import pages_for
from jaxinfer.engine.request import MAX_BANNED, SamplingParams
from jaxinfer.engine.scheduler import PrefillChunk, StepPlan, neutral_sampling, step_rows
from jaxinfer.runner import ModelRunner

TARGETS = {"static": 2.0, "hf": 3.0, "ceiling": 0.85}  # engine / static, engine / hf, engine / ceiling


# --- hand-built step plans ------------------------------------------------------------------


def _plan(engine: EngineConfig, positions, steps, tables, prefills: list[PrefillChunk]) -> StepPlan:
    B = engine.max_slots
    return StepPlan(positions, steps, int(steps.max()), tables, neutral_sampling(B), np.zeros(B, np.int32),
                    np.full((B, MAX_BANNED), -1, np.int32), prefills, {})


def _check_room(engine: EngineConfig, slots: int, last_token: int) -> int:
    """-> pages per slot and KV cache group for positions [0, last_token); raises if the pool or the context is
    too small."""
    per_slot = pages_for(last_token, engine.page_size)
    if last_token > engine.max_model_len:
        raise ValueError(f"a step reaching {last_token} tokens exceeds max_model_len={engine.max_model_len}")
    need = slots * per_slot * len(engine.kv_groups)
    if need >= engine.num_pages:
        raise ValueError(f"{slots} slots of {per_slot} pages (in each of {len(engine.kv_groups)} KV cache groups) "
                         f"need {need + 1} KV pages; the pool has {engine.num_pages}")
    return per_slot


def distinct_tables(engine: EngineConfig, per_slot: list[int], first_page: int = 1) -> np.ndarray:
    """[B, G, P] block tables giving slot b `per_slot[b]` pages in every KV cache group, no page twice, numbered
    from `first_page` (every group holds every position: what a step costs does not depend on freed pages)."""
    B, G, P = engine.max_slots, len(engine.kv_groups), engine.pages_per_seq
    tables, page = np.zeros((B, G, P), np.int32), first_page
    for slot, count in enumerate(per_slot):
        tables[slot, :, :count] = page + np.arange(G * count).reshape(G, count)
        page += G * count
    return tables


def decode_plan(engine: EngineConfig, batch: int, context: int, k: int) -> StepPlan:
    """`batch` slots (of max_slots) each decoding `k` tokens after `context` tokens, on distinct pages."""
    B = engine.max_slots
    if not 1 <= batch <= B:
        raise ValueError(f"batch={batch} must be in [1, max_slots={B}]")
    per_slot = _check_room(engine, batch, context + k)
    tables = distinct_tables(engine, [per_slot] * batch)
    positions, steps = np.full(B, -1, np.int32), np.zeros(B, np.int32)
    positions[:batch], steps[:batch] = context, k
    return _plan(engine, positions, steps, tables, [])


def prefill_plan(engine: EngineConfig, tokens, start: int = 0) -> StepPlan:
    """One prefill chunk into slot 0 at positions start.., sampled after its last token; no decoding."""
    B = engine.max_slots
    tokens = np.asarray(tokens, np.int32)
    per_slot = _check_room(engine, 1, start + len(tokens))
    tables = distinct_tables(engine, [per_slot])
    chunk = PrefillChunk(slot=0, tokens=tokens, start=start, sample=True, next_tokens=None, load_rows=False)
    return _plan(engine, np.full(B, -1, np.int32), np.zeros(B, np.int32), tables, [chunk])


def time_step(runner: ModelRunner, plan: StepPlan, repeats: int) -> float:
    """Median seconds from dispatch until the output is on the host, after one untimed run."""
    np.asarray(runner.dispatch(plan))  # compiles if warm-up did not
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(runner.dispatch(plan))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- the workload ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: tuple[tuple[int, ...], ...]
    output_lens: tuple[int, ...]

    @classmethod
    def random(cls, num: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab_size: int,
               seed: int) -> "Workload":
        """Lengths uniform in the inclusive ranges; token ids uniform over the vocabulary."""
        for name, (lo, hi) in (("input", input_range), ("output", output_range)):
            if not 1 <= lo <= hi:
                raise ValueError(f"--{name}-len-range {lo} {hi}: need 1 <= low <= high")
        rng = np.random.default_rng(seed)
        prompt_lens = rng.integers(input_range[0], input_range[1], num, endpoint=True)
        output_lens = rng.integers(output_range[0], output_range[1], num, endpoint=True)
        prompts = tuple(tuple(int(t) for t in rng.integers(0, vocab_size, n)) for n in prompt_lens)
        return cls(prompts, tuple(int(n) for n in output_lens))

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def decode_tokens(self) -> int:
        """Output tokens that need a decode step (each request's first comes from its prefill)."""
        return self.output_tokens - len(self)

    def mean_decode_context(self) -> float:
        """Tokens of context per decode step, averaged over every decode step of the workload."""
        total = sum(o - 1 for o in self.output_lens)
        context = sum((o - 1) * len(p) + (o - 1) * (o - 2) / 2 for p, o in zip(self.prompts, self.output_lens))
        return context / max(total, 1)

    def prefill_chunks(self, chunk: int, packs: int = 1) -> list[tuple[int, int]]:
        """(start, length) of every prefill chunk, as the scheduler cuts prompts. Packing several prompts
        per step (`packs` > 1), the fewest full-budget chunks that hold every prompt token, each at
        position 0 (every packed step runs the whole budget)."""
        if packs > 1:
            steps = max(math.ceil(self.prompt_tokens / chunk), math.ceil(len(self.prompts) / packs))
            return [(0, chunk)] * steps
        return [(start, min(chunk, len(p) - start)) for p in self.prompts for start in range(0, len(p), chunk)]


# --- runs -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One way of serving the workload. Tokens count only what was asked for (no padding)."""

    name: str
    seconds: float
    output_tokens: int
    total_tokens: int
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def output_rate(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_rate(self) -> float:
        return self.total_tokens / self.seconds


class _TimedExecutor:
    """The engine's executor, also counting what the engine dispatched and how long the host waited."""

    def __init__(self, inner, engine: EngineConfig):
        self.inner, self.engine, self.max_slots = inner, engine, engine.max_slots
        self.waiting = 0.0
        self.dispatches = self.prefill_chunks = self.prompt_chunks = self.decode_steps = self.decode_tokens = 0
        self.by_num_steps: dict[int, int] = {}
        self.rounds_by_rows: dict[int, int] = {}  # decode rounds by the rows the step computed (decode buckets)

    def dispatch(self, plan: StepPlan):
        self.dispatches += 1
        self.prefill_chunks += bool(plan.prefills)
        self.prompt_chunks += len(plan.prefills)
        self.decode_steps += plan.num_steps
        self.decode_tokens += int(plan.steps.sum())
        self.by_num_steps[plan.num_steps] = self.by_num_steps.get(plan.num_steps, 0) + 1
        rows = step_rows(self.engine, [plan], len(plan.prefills))
        self.rounds_by_rows[rows] = self.rounds_by_rows.get(rows, 0) + plan.num_steps
        return self.inner.dispatch(plan)

    def collect(self, handle):
        start = time.perf_counter()
        jax.block_until_ready(handle)
        self.waiting += time.perf_counter() - start
        return self.inner.collect(handle)


class _Measured:
    """`with _Measured(llm) as m:` around `LLM.generate` calls: seconds without compiling, and what the
    engine did meanwhile (its counters, its dispatches, the host's time outside waiting on the device).
    Every timed run starts from a cold prefix cache: a warm one would skip prompt tokens (the warm pass's
    prompts are prefixes of the workload's, and a static wave's longest prompt is unpadded), and the bare
    steps write KV into pages it may still name (seen: 19 of 128 requests' greedy tokens changed)."""

    def __init__(self, llm):
        self.llm = llm
        self.timed = _TimedExecutor(llm.engine.executor, llm.engine_config)

    def __enter__(self) -> "_Measured":
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("the engine still holds requests; cannot start a timed run from a cold prefix cache")
        self._before, self._compiled = self.llm.engine.stats(), self.llm.runner.compile_seconds
        self.llm.engine.executor = self.timed
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start
        self.cores_used = (time.process_time() - self._cpu) / wall
        self.llm.engine.executor = self.timed.inner
        self._after = self.llm.engine.stats()
        self.compiling = self.llm.runner.compile_seconds - self._compiled
        self.seconds = wall - self.compiling

    def details(self) -> dict:
        before, after, t = self._before, self._after, self.timed
        n = max(t.dispatches, 1)
        return {"steps": after.steps - before.steps, "preemptions": after.preemptions - before.preemptions,
                "prefill_tokens_computed": after.prefill_tokens_computed - before.prefill_tokens_computed,
                "compile_seconds_during_run": self.compiling, "dispatches": t.dispatches,
                "prefill_chunks": t.prefill_chunks, "prompt_chunks": t.prompt_chunks, "dispatches_by_decode_steps": dict(sorted(t.by_num_steps.items())),
                "decode_slot_use": t.decode_tokens / max(t.decode_steps * t.max_slots, 1),
                "decode_rounds_by_rows": dict(sorted(t.rounds_by_rows.items())),
                "host_ms_per_dispatch": (self.seconds - t.waiting) / n * 1e3, "wait_ms_per_dispatch": t.waiting / n * 1e3,
                "cores_used": self.cores_used}


def warm_pass(llm, workload: Workload) -> None:
    """A short untimed run first: the first pass through the engine's host and device paths costs more
    than later ones (seen in tiny runs: a 0.4s run took twice as long first)."""
    cfg = llm.engine_config
    prompts = [list(p[:cfg.min_prefill_bucket]) for p in workload.prompts[:cfg.max_slots]]
    llm.generate(prompts, SamplingParams(max_tokens=2 * cfg.decode_steps + 1, temperature=0, ignore_eos=True),
                 use_tqdm=False)


def run_engine(llm, workload: Workload) -> tuple[Run, list[list[int]]]:
    """Every request at once, each with its own length. -> (run, output token ids per request)."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in workload.output_lens]
    with _Measured(llm) as measured:
        outputs = llm.generate([list(p) for p in workload.prompts], params, use_tqdm=True)
    tokens = _produced(outputs, list(workload.output_lens), "the engine")
    return Run("engine", measured.seconds, workload.output_tokens, workload.prompt_tokens + workload.output_tokens,
               measured.details()), tokens


def _produced(outputs, asked: list[int], run: str) -> list[list[int]]:
    """-> each request's output token ids, once every request is seen to have produced what it asked for
    (ignore_eos): runs are credited with the tokens asked for."""
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    lengths = [len(t) for t in tokens]
    if lengths != asked:
        raise RuntimeError(f"{run} returned other output lengths than asked for (ignore_eos): "
                           f"{lengths[:8]}... against {asked[:8]}...")
    return tokens


@dataclasses.dataclass(frozen=True)
class Wave:
    """One static batch: its requests (workload indices), their prompts left-padded to the longest, and the
    output length all of them generate (the longest asked for)."""

    requests: tuple[int, ...]
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int


def static_waves(workload: Workload, slots: int, vocab_size: int, seed: int) -> list[Wave]:
    """Waves of `slots` requests in arrival order, the order `LLM.generate` queues the engine's run: static
    batching is the same engine without joining mid-flight, so neither orders by the output lengths, which
    only this benchmark knows in advance (ignore_eos makes max_tokens the exact length; sorted by it, the
    issue's workload, seed 0, would need 703 decode rounds of static waves instead of 1006). Padding ids are
    random, so the prefix cache cannot skip them."""
    order = range(len(workload))
    rng = np.random.default_rng(seed + 1)
    waves = []
    for first in range(0, len(order), slots):
        requests = tuple(order[first:first + slots])
        longest = max(len(workload.prompts[i]) for i in requests)
        prompts = tuple(tuple(int(t) for t in rng.integers(0, vocab_size, longest - len(workload.prompts[i])))
                        + workload.prompts[i] for i in requests)
        waves.append(Wave(requests, prompts, max(workload.output_lens[i] for i in requests)))
    return waves


def run_static(llm, workload: Workload, seed: int) -> Run:
    """`static_waves` one after another: the next wave starts when the whole wave is done."""
    waves = static_waves(workload, llm.engine_config.max_slots, llm.model_config.vocab_size, seed)
    calls = [([list(p) for p in wave.prompts], SamplingParams(max_tokens=wave.max_tokens, temperature=0,
                                                              ignore_eos=True)) for wave in waves]
    with _Measured(llm) as measured:
        outputs = [llm.generate(prompts, params, use_tqdm=False)
                   for prompts, params in tqdm(calls, desc="static batching", unit="wave")]
    for wave, out in zip(waves, outputs):
        _produced(out, [wave.max_tokens] * len(wave.requests), "static batching")
    padded_prompts = sum(len(wave.prompts) * len(wave.prompts[0]) for wave in waves)
    details = {**measured.details(), "waves": len(waves), "prompt_tokens_with_padding": padded_prompts,
               "tokens_with_padding": padded_prompts + sum(len(wave.prompts) * wave.max_tokens for wave in waves)}
    return Run("static", measured.seconds, workload.output_tokens, workload.prompt_tokens + workload.output_tokens,
               details)


@dataclasses.dataclass
class BareTimes:
    """One measurement of the bare jitted steps a workload needs (seconds): the full-slot decode step at
    k rounds and at one round (None where it is not timed), and each prefill chunk's compiled shape
    (`chunk_shapes`, one per chunk of the workload, timed once each in `chunks`)."""

    step_k: float
    step_1: float | None
    chunks: dict
    chunk_shapes: list

    @staticmethod
    def measure(runner: ModelRunner, workload: Workload, repeats: int) -> "BareTimes":
        engine = runner.engine
        k = engine.decode_steps
        step_k = BareTimes.decode_step(runner, workload, k, repeats)
        step_1 = step_k if k == 1 else None  # static control flow runs every decode-only dispatch at k rounds
        if step_1 is None and engine.control_flow != "static":
            step_1 = BareTimes.decode_step(runner, workload, 1, repeats)
        rng = np.random.default_rng(0)
        chunks, shapes = {}, []
        for start, length in workload.prefill_chunks(engine.prefill_chunk, engine.max_prefill_seqs):
            plan = prefill_plan(engine, rng.integers(0, runner.cfg.vocab_size, length), start)
            shapes.append(runner.layout_for(plan))
            if shapes[-1] not in chunks:
                chunks[shapes[-1]] = time_step(runner, plan, repeats)
        return BareTimes(step_k, step_1, chunks, shapes)

    @staticmethod
    def decode_step(runner: ModelRunner, workload: Workload, k: int, repeats: int) -> float:
        """Seconds of the full-slot decode step at k rounds, at the workload's mean decode context."""
        engine = runner.engine
        return time_step(runner, decode_plan(engine, engine.max_slots, round(workload.mean_decode_context()), k),
                         repeats)

    def seconds(self, workload: Workload, slots: int, k: int) -> tuple[float, float]:
        """-> (prefill, decode) seconds of the workload at these step times."""
        return sum(self.chunks[key] for key in self.chunk_shapes), workload.decode_tokens / slots * self.step_k / k

    @staticmethod
    def mean(times: list["BareTimes"]) -> "BareTimes":
        average = lambda xs: None if xs[0] is None else statistics.fmean(xs)  # noqa: E731
        return BareTimes(average([t.step_k for t in times]), average([t.step_1 for t in times]),
                         {key: statistics.fmean(t.chunks[key] for t in times) for key in times[0].chunks},
                         times[0].chunk_shapes)


def run_ceiling(runner: ModelRunner, workload: Workload, measurements: list[BareTimes]) -> tuple[Run, dict]:
    """The bare jitted steps for the same work: every prefill chunk timed by its compiled shape, and
    every decode token at the full-slot decode step's per-token time. `measurements` are averaged: the
    benchmark takes one just before the engine's run and one just after, so the ceiling is measured on
    the machine as it was around the engine's run (its speed drifts by several percent over minutes).
    -> (workload ceiling, the bare decode step's own figures)."""
    engine = runner.engine
    B, k = engine.max_slots, engine.decode_steps
    times = BareTimes.mean(measurements)
    prefill_seconds, decode_seconds = times.seconds(workload, B, k)
    bare = {"slots": B, "decode_steps": k, "context": round(workload.mean_decode_context()),
            "step_ms": times.step_k * 1e3, "output_rate": B * k / times.step_k,
            "step_ms_each_measurement": [t.step_k * 1e3 for t in measurements]}
    if times.step_1 is not None:
        bare.update(step_ms_one_token=times.step_1 * 1e3, output_rate_one_token=B / times.step_1)
    details = {"prefill_seconds": prefill_seconds, "decode_seconds": decode_seconds,
               "prefill_shapes_timed": len(times.chunks), "bare_decode": bare,
               "seconds_each_measurement": [sum(t.seconds(workload, B, k)) for t in measurements]}
    run = Run("ceiling", prefill_seconds + decode_seconds, workload.output_tokens,
              workload.prompt_tokens + workload.output_tokens, details)
    return run, bare


def hf_checkpoint(llm, source_dir: Path, directory: Path) -> None:
    """The engine's own weights (random ones included) as a Hugging Face checkpoint."""
    from jaxinfer.model.checkpoint import save_safetensors
    save_safetensors(llm.runner.params, llm.model_config, source_dir, directory)
    (directory / "config.json").write_text(json.dumps(llm.model_config.to_hf()))


def _hf_generate(model, workload: Workload, indices: list[int], batch_size: int) -> tuple[float, dict]:
    """Greedy `generate` in batches of `indices`, left-padded; each batch runs to its longest output
    (generate has no per-row lengths). -> (seconds, {request: its requested output tokens})."""
    import torch
    outputs, seconds = {}, 0.0
    for first in range(0, len(indices), batch_size):
        batch = indices[first:first + batch_size]
        longest = max(len(workload.prompts[i]) for i in batch)
        new = max(workload.output_lens[i] for i in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            prompt = workload.prompts[i]
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0).cpu()
        seconds += time.perf_counter() - start
        if out.shape[1] - longest != new:
            raise RuntimeError(f"transformers generated {out.shape[1] - longest} new tokens per row, not {new} "
                               "(ignore_eos: eos_token_id None, min_new_tokens = max_new_tokens)")
        for row, i in enumerate(batch):
            outputs[i] = out[row, longest:longest + workload.output_lens[i]].tolist()
    return seconds, outputs


def run_hf(model_dir: Path, workload: Workload, batch_sizes: tuple[int, ...], dtype: str) -> tuple[Run, dict]:
    """transformers `generate` on the same weights in the engine's dtype (on a CUDA device if torch has one),
    requests sorted by output then prompt length (less padding). Each batch size is tried on the middle
    `max(batch_sizes)` requests of that order (batches as alike as the full run's); the full workload
    then runs at the fastest."""
    import torch
    from transformers import AutoModelForCausalLM
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: every row runs its full length
    order = sorted(range(len(workload)), key=lambda i: (workload.output_lens[i], len(workload.prompts[i])))
    _hf_generate(model, Workload(workload.prompts[:2], (2, 2)), [0, 1], 2)  # first-call costs, untimed
    width = min(max(batch_sizes), len(order))
    subset = order[(len(order) - width) // 2:][:width]
    search = {}
    for size in tqdm(batch_sizes, desc="transformers batch sizes", unit="size"):
        seconds, _ = _hf_generate(model, workload, subset, size)
        search[size] = sum(workload.output_lens[i] for i in subset) / seconds
    best = max(search, key=search.get)
    cpu = time.process_time()
    seconds, outputs = _hf_generate(model, workload, order, best)
    details = {"batch_size": best, "search_requests": width, "search_output_rate": search, "threads": threads,
               "device": device, "dtype": dtype,
               "cores_used": (time.process_time() - cpu) / seconds}
    run = Run("hf", seconds, workload.output_tokens, workload.prompt_tokens + workload.output_tokens, details)
    return run, outputs


def agreement(ours: list[list[int]], theirs: dict, prefix: int = 16) -> dict:
    """How many requests got the same greedy tokens from both (over all tokens, and the first `prefix`),
    and where each first differed (None: nowhere; where the shorter ends if one is a prefix of the other)."""
    def differs(a: list[int], b: list[int]) -> int | None:
        at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        return min(len(a), len(b)) if at is None and len(a) != len(b) else at

    first = {i: differs(ours[i], theirs[i]) for i in theirs}
    return {"requests": len(theirs), "identical": sum(d is None for d in first.values()),
            f"identical_first_{prefix}": sum(d is None or d >= prefix for d in first.values()),
            "first_difference": first}


# --- the offline benchmark ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OfflineOptions:
    """What `jaxinfer bench offline` runs (its defaults live with the command's flags)."""

    model: str | None
    engine: EngineConfig  # max_model_len None: the longest prompt plus the longest output
    num_requests: int
    input_len_range: tuple[int, int]
    output_len_range: tuple[int, int]
    seed: int
    baselines: tuple[str, ...]  # any of static, hf, bare
    hf_batch_sizes: tuple[int, ...]
    repeats: int  # timed runs per bare step shape (medians)
    json_path: str | None = None


def offline(options: OfflineOptions) -> dict:
    """Run the workload on the engine and the chosen baselines; print as it goes and the table last."""
    from jaxinfer.model.checkpoint import find_model, load_config
    source = find_model(options.model)
    workload = Workload.random(options.num_requests, options.input_len_range, options.output_len_range,
                               load_config(source, options.engine.hf_overrides).vocab_size, options.seed)
    engine = options.engine
    if engine.max_model_len is None:
        engine = dataclasses.replace(engine, max_model_len=options.input_len_range[1] + options.output_len_range[1])
    print(_header(source, workload, engine), flush=True)
    llm, setup = _load(options.model, engine, source, workload)
    warm_pass(llm, workload)
    runs, bare, tokens = _run_on_engine(llm, workload, options)
    if "hf" in options.baselines:
        dtype = llm.engine_config.dtype
        with tempfile.TemporaryDirectory() as tmp:
            hf_checkpoint(llm, source.directory, Path(tmp))
            del llm  # free the engine's KV pool and weights for transformers (on a GPU they would not fit beside it)
            runs["hf"], theirs = run_hf(Path(tmp), workload, options.hf_batch_sizes, dtype)
        runs["hf"].details["greedy_agreement_with_engine"] = agreement(tokens["engine"], theirs)
        tokens["hf"] = [theirs[i] for i in range(len(workload))]
        print(_describe_run(runs["hf"]), flush=True)
    print(table(runs, bare))
    results = {"setup": setup, "runs": {name: {**dataclasses.asdict(run), "output_rate": run.output_rate,
                                               "total_rate": run.total_rate} for name, run in runs.items()},
               "tokens": tokens}
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(results, indent=2, default=str))
    return results


def _load(model, engine: EngineConfig, source, workload: Workload):
    """-> (LLM with every step shape compiled, what the setup was)."""
    from jaxinfer.llm import LLM
    start = time.perf_counter()
    llm = LLM(model, engine)
    cfg, runner = llm.engine_config, llm.runner
    runner.warmup(sampled=False)  # every request of the workload is greedy
    setup = {"model": str(source.config_path), "engine": dataclasses.asdict(cfg), "machine": machine(),
             "date": datetime.date.today().isoformat(), "workload": _describe_workload(workload),
             "load_and_warmup_seconds": time.perf_counter() - start, "warmup_compiles": runner.num_compiles,
             "warmup_compile_seconds": runner.compile_seconds}
    print(f"loaded ({cfg.dtype}, {cfg.attention_backend} attention, {cfg.num_pages} KV pages of "
          f"{cfg.kv_cache_dtype}) and warmed up in {setup['load_and_warmup_seconds']:.1f}s: "
          f"{runner.num_compiles} step shapes compiled in "
          f"{runner.compile_seconds:.1f}s (kept out of every figure below)", flush=True)
    return llm, setup


def _run_on_engine(llm, workload: Workload, options: OfflineOptions):
    """-> (runs by name, the bare decode step's figures or None, the engine's output tokens by name)."""
    runs, bare, tokens = {}, None, {}
    ceiling = "bare" in options.baselines
    measured = [BareTimes.measure(llm.runner, workload, options.repeats)] if ceiling else []
    runs["engine"], tokens["engine"] = run_engine(llm, workload)
    print(_describe_run(runs["engine"]), flush=True)
    if ceiling:
        measured.append(BareTimes.measure(llm.runner, workload, options.repeats))
        runs["ceiling"], bare = run_ceiling(llm.runner, workload, measured)
        print(_describe_run(runs["ceiling"]), flush=True)
    if "static" in options.baselines:
        runs["static"] = run_static(llm, workload, options.seed)
        if ceiling:  # the machine's speed around static batching, against its speed around the engine's run
            after = BareTimes.decode_step(llm.runner, workload, llm.runner.engine.decode_steps, options.repeats)
            runs["static"].details["bare_step_ms_around"] = [measured[-1].step_k * 1e3, after * 1e3]
        print(_describe_run(runs["static"]), flush=True)
    return runs, bare, tokens


def machine() -> str:
    cpu = platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = jax.devices()[0]
    return f"{len(jax.devices())} {device.platform} device(s) ({device.device_kind}); host {cpu}, {os.cpu_count()} cores"


def _describe_workload(workload: Workload) -> dict:
    return {"requests": len(workload), "prompt_tokens": workload.prompt_tokens,
            "output_tokens": workload.output_tokens, "mean_decode_context": workload.mean_decode_context()}


def _header(source, workload: Workload, engine: EngineConfig) -> str:
    w = _describe_workload(workload)
    return (f"# jaxinfer bench offline: {source.config_path} on {machine()}\n"
            f"# {w['requests']} requests, {w['prompt_tokens']} prompt + {w['output_tokens']} output tokens "
            f"(ignore_eos, greedy); engine: {engine.max_slots} slots, prefill chunk {engine.prefill_chunk} "
            f"(up to {engine.max_prefill_seqs or 'auto'} prompts a step), "
            f"{engine.decode_steps} decode steps per dispatch, page size {engine.page_size}, "
            f"max_model_len {engine.max_model_len}, dtype {engine.dtype}, kv_cache_dtype {engine.kv_cache_dtype}")


def _describe_run(run: Run) -> str:
    head = f"{run.name}: {run.seconds:.1f}s, {run.output_rate:.1f} output tokens/s, {run.total_rate:.1f} total tokens/s"
    d = run.details
    if "dispatches" in d:
        uses = ", ".join(f"{n}x k={k}" for k, n in d["dispatches_by_decode_steps"].items())
        rows = ", ".join(f"{R}: {n}" for R, n in d["decode_rounds_by_rows"].items())
        return (f"{head}\n  {d['steps']} steps ({uses}), {d['prefill_chunks']} with a prefill chunk "
                f"({d['prompt_chunks']} prompts' chunks in them), "
                f"{d['preemptions']} preemptions, decode slots in use {d['decode_slot_use']:.0%} (rounds by rows "
                f"computed: {rows}); host "
                f"{d['host_ms_per_dispatch']:.1f} ms and waiting on the device {d['wait_ms_per_dispatch']:.1f} ms "
                f"per dispatch; {d['compile_seconds_during_run']:.1f}s compiling during the run (excluded); "
                f"{d['cores_used']:.2f} cores busy with this process")
    if "bare_decode" in d:
        b = d["bare_decode"]
        return (f"{head}\n  = {d['prefill_seconds']:.1f}s of prefill chunks ({d['prefill_shapes_timed']} shapes "
                f"timed) + {d['decode_seconds']:.1f}s of decode at the full-slot step's {b['step_ms'] / b['decode_steps']:.1f} "
                f"ms per token ({b['slots']} slots, k={b['decode_steps']}, context {b['context']}); the mean of "
                f"{len(d['seconds_each_measurement'])} measurements, before and after the engine's run: "
                + ", ".join(f"{s:.1f}s" for s in d["seconds_each_measurement"])
                + " (full-slot step " + ", ".join(f"{ms:.0f}" for ms in b["step_ms_each_measurement"]) + " ms)")
    if "batch_size" in d:
        g = d.get("greedy_agreement_with_engine", {})
        rates = ", ".join(f"{size}: {rate:.1f}" for size, rate in d["search_output_rate"].items())
        return (f"{head}\n  batch size {d['batch_size']} (output tokens/s on {d['search_requests']} requests: "
                f"{rates}); greedy tokens identical to the engine's for {g.get('identical')}/{g.get('requests')} "
                f"requests ({g.get('identical_first_16')} over the first 16); {d['cores_used']:.2f} cores busy with "
                "this process")
    return head


def table(runs: dict[str, Run], bare: dict | None) -> str:
    """The comparison, last: one row per run, the engine's ratio against each and the issue's target."""
    engine = runs["engine"]
    names = {"engine": "engine", "static": "(a) static batching, same engine",
             "hf": f"(b) transformers generate, batch {runs['hf'].details['batch_size']}" if "hf" in runs else "",
             "ceiling": "(c ii) ceiling: bare steps, this workload"}
    lines = ["| run | output tok/s | total tok/s | seconds | engine against it | target | met |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for key in ("engine", "static", "hf", "ceiling"):
        if key not in runs:
            continue
        run = runs[key]
        ratio, target, met = "", "", ""
        if key == "ceiling":
            share = engine.output_rate / run.output_rate
            ratio, target, met = f"{share:.0%}", f">= {TARGETS[key]:.0%}", _ceiling_met(engine, run)
        elif key != "engine":
            times = engine.output_rate / run.output_rate
            ratio, target, met = f"{times:.2f}x", f">= {TARGETS[key]:g}x", _yes(times >= TARGETS[key])
            if key == "static":
                met = _static_met(times, run, bare)
        lines.append(f"| {names[key]} | {run.output_rate:.1f} | {run.total_rate:.1f} | {run.seconds:.1f} | "
                     f"{ratio} | {target} | {met} |")
    if bare is not None:
        one = (f", {bare['output_rate_one_token']:.1f} at k=1 ({bare['step_ms_one_token']:.0f} ms)"
               if "step_ms_one_token" in bare else "")
        lines.append(f"(c i) bare decode step alone, all {bare['slots']} slots at context {bare['context']}: "
                     f"{bare['output_rate']:.1f} output tok/s at k={bare['decode_steps']} "
                     f"({bare['step_ms']:.0f} ms per dispatch){one}; no prefill in it, so no workload reaches it")
    return "\n".join(lines)


def _ceiling_met(engine: Run, ceiling: Run) -> str:
    """Whether the engine reaches the ceiling's target share; "unsure" when the ceiling's measurements (before
    and after the engine's run) disagree on it: the machine's speed moved too much around the run to tell."""
    share = ceiling.seconds / engine.seconds
    each = [seconds / engine.seconds for seconds in ceiling.details.get("seconds_each_measurement", [share])]
    if len({s >= TARGETS["ceiling"] for s in each}) > 1:
        return f"unsure: {min(each):.0%} and {max(each):.0%} by each measurement"
    return _yes(share >= TARGETS["ceiling"])


def _static_met(times: float, static: Run, bare: dict | None) -> str:
    """Whether (a) reaches its target; "unsure" when it would not at the machine's speed during the engine's
    run. Static batching runs minutes later, and the machine's speed drifts (the bare step once took 44% longer
    after the engine's run than before it): the bare decode step, timed around each run, prices that drift."""
    around = static.details.get("bare_step_ms_around")
    if bare is None or around is None:
        return _yes(times >= TARGETS["static"])
    steady = times * statistics.fmean(bare["step_ms_each_measurement"]) / statistics.fmean(around)
    if (steady >= TARGETS["static"]) != (times >= TARGETS["static"]):
        return f"unsure: {steady:.2f}x at the machine's speed during the engine's run"
    return _yes(times >= TARGETS["static"])


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"
