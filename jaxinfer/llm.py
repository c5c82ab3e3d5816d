"""The offline Python API: `LLM(path).generate(prompts, SamplingParams(...))`.

Host-side loop over the device runner: requests wait in a queue, take a free
decode slot and the KV pages for their whole length, are prefilled chunk by
chunk, then decode together in fixed-shape steps until each finishes and gives
its slot and pages back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from pathlib import Path

import jax
import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine.pages import PageAllocator, pages_for
from jaxinfer.model.checkpoint import find_model, load_config, load_params
from jaxinfer.runner import ModelRunner
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import TOKENIZER_FILES, Tokenizer
from pallas_kernels.attention import kernel_self_check

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    seed: int | None = None  # None: drawn from the LLM's own seeded generator
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop token) | "length" (max_tokens or context end)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclasses.dataclass
class _Sequence:
    """A request while it runs: its tokens, pages and sampling settings (host state)."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new: int
    output_ids: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class LLM:
    """Load a model (a Hugging Face or converted directory; None: the embedded default) and generate."""

    def __init__(self, model: str | Path | None = None, engine: EngineConfig | None = None,
                 mesh_shape: tuple[int, int] = (1, 1), warmup: bool = False):
        source = find_model(model)
        start = time.perf_counter()
        self.model_config = load_config(source)
        self.mesh = make_mesh(mesh_shape)
        requested = engine or EngineConfig()
        self.engine = self._checked_backend(requested, requested.resolve(self.model_config, jax.default_backend()))
        params = load_params(source, self.model_config, self.engine.dtype, self.mesh)
        self.runner = ModelRunner(self.model_config, self.engine, params, self.mesh)
        has_tokenizer = any((source.directory / f).exists() for f in TOKENIZER_FILES)
        self.tokenizer = Tokenizer.from_pretrained(source.directory) if has_tokenizer else None
        tokenizer_eos = self.tokenizer.eos_ids if self.tokenizer else ()
        self.eos_ids = frozenset(self.model_config.eos_token_ids) | frozenset(tokenizer_eos)
        self.pages = PageAllocator(self.engine.num_pages)
        self._rng = np.random.default_rng(self.engine.seed)
        log.info("loaded %s (%s, %d layers) in %.2fs", source.config_path, self.model_config.model_type,
                 self.model_config.num_layers, time.perf_counter() - start)
        if warmup:
            self.runner.warmup()

    def _checked_backend(self, requested: EngineConfig, engine: EngineConfig) -> EngineConfig:
        """`auto` takes the Pallas kernels only once they have compiled and agreed with the
        reference on this device; asking for `pallas` explicitly skips the check (and its safety net)."""
        if requested.attention_backend != "auto" or engine.attention_backend != "pallas":
            return engine
        cfg = self.model_config
        problem = kernel_self_check(engine.dtype, engine.page_size, cfg.head_dim, cfg.q_per_kv, cfg.sliding_window)
        if problem is None:
            return engine
        log.warning("Pallas attention failed its start-up check, using the reference attention: %s", problem)
        return dataclasses.replace(engine, attention_backend="reference")

    def generate(self, prompts, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists."""
        params = sampling_params or SamplingParams()
        texts, id_lists = self._encode_all(prompts)
        sequences = [self._new_sequence(i, ids, params) for i, ids in enumerate(id_lists)]
        self._run(deque(sequences))
        return [self._output(seq, text) for seq, text in zip(sequences, texts)]

    def _encode_all(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty string, list of strings or list of token-id lists")
        texts, id_lists = [], []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("this checkpoint has no tokenizer files; pass token-id lists")
                texts.append(p)
                id_lists.append(self.tokenizer.encode(p))
            else:
                texts.append(None)
                id_lists.append([int(t) for t in p])
        return texts, id_lists

    def _new_sequence(self, index: int, ids: list[int], params: SamplingParams) -> _Sequence:
        vocab, limit = self.model_config.vocab_size, self.engine.max_model_len
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(ids) >= limit:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; the maximum context length is {limit} "
                             "tokens, and at least one must be left to generate")
        max_new = min(params.max_tokens, limit - len(ids))
        need, capacity = pages_for(len(ids) + max_new, self.engine.page_size), self.pages.num_pages - 1
        if need > capacity:
            raise MemoryError(f"prompt {index} needs {need} KV pages for {len(ids)} + {max_new} tokens; "
                              f"the whole pool has {capacity}")
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
        return _Sequence(index, ids, params, seed, max_new)

    def _run(self, queue: deque) -> None:
        slots: list[_Sequence | None] = [None] * self.engine.max_slots
        try:
            while queue or any(slots):
                self._admit(queue, slots)
                if any(slots):
                    self._decode(slots)
        finally:  # an interrupted run must not keep its pages
            for seq in filter(None, slots):
                self.pages.free(seq.pages)

    def _admit(self, queue: deque, slots: list) -> None:
        for i, seq in enumerate(slots):
            if seq is not None or not queue:
                continue
            need = pages_for(len(queue[0].prompt_ids) + queue[0].max_new, self.engine.page_size)
            if not self.pages.can_allocate(need):
                return  # it fits the pool (checked on arrival): wait for running sequences to finish
            seq = slots[i] = queue.popleft()
            seq.pages = self.pages.allocate(need)
            self._prefill(seq)
            if self._finish_if_done(seq):
                slots[i] = None

    def _block_table(self, seq: _Sequence) -> np.ndarray:
        table = np.zeros(self.engine.pages_per_seq, np.int32)
        table[:len(seq.pages)] = seq.pages
        return table

    def _prefill(self, seq: _Sequence) -> None:
        chunk, table = self.engine.prefill_chunk, self._block_table(seq)
        ids = np.asarray(seq.prompt_ids, np.int32)
        for start in range(0, len(ids), chunk):
            token = self.runner.prefill(ids[start:start + chunk], start, table,
                                        seq.params.temperature, seq.seed % 2**32)
        seq.output_ids.append(token)

    def _decode(self, slots: list) -> None:
        B, P = self.engine.max_slots, self.engine.pages_per_seq
        tokens, positions = np.zeros(B, np.int32), np.full(B, -1, np.int32)
        tables, temps, seeds = np.zeros((B, P), np.int32), np.zeros(B, np.float32), np.zeros(B, np.uint32)
        for i, seq in enumerate(slots):
            if seq is not None:
                tokens[i], positions[i] = seq.output_ids[-1], seq.num_tokens - 1
                tables[i], temps[i], seeds[i] = self._block_table(seq), seq.params.temperature, seq.seed % 2**32
        out = self.runner.decode(tokens, positions, tables, temps, seeds)
        for i, seq in enumerate(slots):
            if seq is not None:
                seq.output_ids.append(int(out[i]))
                if self._finish_if_done(seq):
                    slots[i] = None

    def _finish_if_done(self, seq: _Sequence) -> bool:
        last = seq.output_ids[-1]
        eos = () if seq.params.ignore_eos else self.eos_ids
        if last in eos or last in seq.params.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.max_new:
            seq.finish_reason = "length"
        else:
            return False
        self.pages.free(seq.pages)
        seq.pages = []
        return True

    def _output(self, seq: _Sequence, prompt: str | None) -> RequestOutput:
        text = self.tokenizer.decode(seq.output_ids) if self.tokenizer else ""
        completion = CompletionOutput(0, text, list(seq.output_ids), seq.finish_reason)
        return RequestOutput(str(seq.index), prompt, list(seq.prompt_ids), [completion])
