"""Building an engine from a checkpoint, and the offline Python API on top of it.

`load_engine(path)` loads config, weights and tokenizer, sizes the KV pool from
a memory budget, and returns an `Engine` over the JAX executor (the server uses
it too). `LLM(path).generate(prompts, SamplingParams(...))` runs a batch of
prompts through that engine, in the caller's thread, with a progress bar.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxinfer.config import RESOLVED_ATTENTION_BACKENDS, ConfigError, EngineConfig, ModelConfig
from jaxinfer.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, round_prompt
from jaxinfer.engine.engine import Engine, RequestStream
from jaxinfer.engine.request import CompletionOutput, Logprob, RequestOutput, RequestOutputKind, SamplingParams
from jaxinfer.model.checkpoint import find_model, generation_defaults, load_config, load_params
from jaxinfer.runner import JaxExecutor, ModelRunner
from jaxinfer.model.weights import MXFP4_BLOCK, expand_kv_heads, online_fp8, quantized_params
from jaxinfer.sharding import make_mesh, mesh_problems
from jaxinfer.tokenizer import CHAT_TEMPLATE_ERRORS, TOKENIZER_FILES, Tokenizer, openai_messages
from pallas_kernels.attention import kernel_self_check

log = logging.getLogger(__name__)

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestOutputKind", "CompletionOutput", "Logprob",
           "RequestStream", "load_engine"]

LOAD_BARRIER_SECONDS = 1800  # how long the processes of a mesh wait for each other to load a model
GPU_KV_SEQUENCES_PER_SLOT = 16  # on GPU, pages for at most this many full-length sequences per slot


def _checked_backend(requested: EngineConfig, engine: EngineConfig, cfg: ModelConfig) -> EngineConfig:
    """`auto` takes the Pallas kernels only once they have compiled and agreed with the reference on
    this device; asking for `pallas` explicitly skips the check (and its safety net)."""
    if requested.attention_backend != "auto" or engine.attention_backend != "pallas":
        return engine
    problem = kernel_self_check(engine.dtype, engine.page_size, cfg.head_dim, cfg.q_per_kv, cfg.sliding_window,
                                engine.kv_format, cfg.attn_softcap, cfg.attn_sinks)
    if problem is None:
        return engine
    log.warning("Pallas attention failed its start-up check, using the reference attention: %s", problem)
    return dataclasses.replace(engine, attention_backend="reference", max_prefill_seqs=requested.prompts_per_step)


def kv_budget_bytes(engine: EngineConfig, cfg: ModelConfig, mesh) -> int:
    """Bytes for the KV pool: configured, else on GPU what the weights left of `gpu_memory_utilization`
    of device memory less room for one step's activations (capped at GPU_KV_SEQUENCES_PER_SLOT full-length
    sequences per slot, so a small model does not take millions of pages it never fills), else a CPU default."""
    if engine.kv_cache_memory is not None:
        return engine.kv_cache_memory
    device = mesh.devices.flat[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    if not stats:
        per_page = engine.kv_bytes_per_page(cfg)
        return engine.cpu_kv_pages(per_page) * per_page
    activations = 4 * 4 * engine.prefill_chunk * (cfg.hidden_size + cfg.mlp_width + cfg.vocab_size)
    free = stats["bytes_limit"] * engine.gpu_memory_utilization - stats["bytes_in_use"] - activations
    kv_shards = min(mesh.shape["model"], cfg.num_kv_heads) * mesh.shape["data"]  # the pool's shards
    cap = ((GPU_KV_SEQUENCES_PER_SLOT * engine.max_slots * engine.sequence_pages(engine.max_model_len) + 1)
           * engine.kv_bytes_per_page(cfg))
    return int(min(max(free, 0) * kv_shards, cap))


def check_mesh(cfg: ModelConfig, engine: EngineConfig) -> None:
    problems = mesh_problems(engine.mesh_shape, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                             mlp=cfg.intermediate_size, mlp_name=cfg.mlp_field, shared_mlp=cfg.shared_expert_size,
                             vocab=cfg.vocab_size, slots=engine.max_slots, pages=engine.num_pages,
                             mlp_blocks=cfg.intermediate_size // MXFP4_BLOCK if cfg.mxfp4 else 0,
                             dense_mlp=cfg.dense_intermediate_size)
    if problems:
        raise ConfigError(f"mesh_shape (data, model) = {engine.mesh_shape} does not fit: " + "; ".join(problems))


def agree(engine: EngineConfig) -> EngineConfig:
    """With several processes, every one takes process 0's pool size and attention backend (each measured
    its own memory and ran its own kernel check)."""
    if jax.process_count() == 1:
        return engine
    # Every process loaded its weights and checked its kernels at its own pace: wait for all (a coordination-
    # service barrier) before the first collective, whose gloo set-up waits only 30 s for a late process.
    from orbax.checkpoint import multihost  # imported on use: slow to import, and one process needs none
    multihost.get_barrier_sync_fn()(key="jaxinfer_engine_loaded", timeout_ms=LOAD_BARRIER_SECONDS * 1000)
    backends = RESOLVED_ATTENTION_BACKENDS
    mine = np.asarray([engine.num_pages, backends.index(engine.attention_backend), engine.max_prefill_seqs], np.int32)
    num_pages, backend, packs = (int(v) for v in multihost_utils.broadcast_one_to_all(mine))
    return dataclasses.replace(engine, num_pages=num_pages, attention_backend=backends[backend], max_prefill_seqs=packs)


def load_engine(model: str | Path | None = None, engine: EngineConfig | None = None,
                warmup: bool = False) -> Engine:
    """Load a model (a Hugging Face or converted directory; None: the embedded default) into an Engine,
    over the devices of `engine.mesh_shape`."""
    source = find_model(model)
    start = time.perf_counter()
    requested = engine or EngineConfig()
    cfg = load_config(source, requested.hf_overrides)
    check_mesh(cfg, requested)
    mesh = make_mesh(requested.mesh_shape)
    resolved = requested.resolve(cfg, jax.default_backend())
    cfg = cfg.for_context(resolved.max_model_len)
    if cfg.rope.kind == "longrope":
        log.info("LongRoPE: the %s factors for every sequence (max_model_len %d %s the pretraining length, %d)",
                 "long" if cfg.rope.long else "short", resolved.max_model_len, ">" if cfg.rope.long else "<=",
                 cfg.rope.original_max_position)
    params = load_params(source, cfg, resolved.dtype, mesh)
    if requested.quantization == "fp8" and cfg.weight_quant is None:  # an fp8 checkpoint already is
        cfg = online_fp8(cfg)
        params = quantized_params(params, cfg, mesh)
    params, cfg = expand_kv_heads(params, cfg, mesh)
    resolved = _checked_backend(requested, resolved, cfg)
    resolved = agree(resolved.with_kv_budget(cfg, kv_budget_bytes(resolved, cfg, mesh)))
    runner = ModelRunner(cfg, resolved, params, mesh)
    has_tokenizer = any((source.directory / f).exists() for f in TOKENIZER_FILES)
    tokenizer = Tokenizer.from_pretrained(source.directory) if has_tokenizer else None
    eos = tuple(dict.fromkeys(cfg.eos_token_ids + (tokenizer.eos_ids if tokenizer else ())))  # config's first
    layout = resolved.kv_layout(cfg)
    quant = cfg.weight_quant
    log.info("loaded %s (%s, %d layers) in %.2fs; weights: %s%s, %.2f GiB; KV pool: %d pages of %d tokens x %d "
             "layers (%s, %.2f GiB), KV cache groups: %s", source.config_path, cfg.model_type, cfg.num_layers,
             time.perf_counter() - start, resolved.dtype,
             "" if quant is None else f" and fp8 projections (scales {quant.describe()})",
             sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30,
             resolved.num_pages, resolved.page_size, layout.width, resolved.kv_cache_dtype,
             resolved.num_pages * resolved.kv_bytes_per_page(cfg) / 2**30,
             ", ".join("global" if w is None else f"sliding {w}" for w in layout.windows))
    if warmup:
        runner.warmup()
    return Engine(resolved, JaxExecutor(runner), cfg.vocab_size, tokenizer, eos, cfg)


class LLM:
    """Offline batches: `LLM(path).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | Path | None = None, engine: EngineConfig | None = None, warmup: bool = False,
                 generation_config: str = "auto"):
        """generation_config: where `get_default_sampling_params` looks, as vLLM's: "auto" (the model's
        generation_config.json), "vllm" (nowhere) or a folder holding one."""
        self.engine = load_engine(model, engine, warmup)
        self.engine_config, self.model_config = self.engine.cfg, self.engine.model_config
        self.runner, self.tokenizer = self.engine.executor.runner, self.engine.tokenizer
        self.default_sampling = generation_defaults(generation_config, model)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the generation config's temperature, top_p, top_k, min_p and
        repetition_penalty where it sets them; what `generate` and `chat` use when given none."""
        return SamplingParams(**self.default_sampling)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """prompts: one prompt or a list of them, each a string, a list of token ids, or a dict as vLLM's
        ({"prompt": text} or {"prompt_token_ids": ids}, either with an optional "cache_salt"); one SamplingParams
        for all or one each. priority: one int per prompt, lower admitted first (vLLM's; by default all 0, queued
        in the order given). Returns one finished RequestOutput per prompt, in order. Bad input raises before
        anything runs."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a prompt (a string or a prompt dict) or a non-empty list of prompts "
                             "(strings, token-id lists or prompt dicts)")
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params or self.get_default_sampling_params()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError(f"{len(priority)} priorities for {len(prompts)} prompts")
        if self.engine.running_in_background:
            raise RuntimeError("the engine's loop runs in a background thread: use engine.add_request streams")
        ids = self._add_all(prompts, params, priority)
        results = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_work():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[i] for i in ids]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"} messages) or a list of them, each
        rendered with a chat template (as transformers' `apply_chat_template`, its text encoded without adding
        special tokens again) and generated as `generate` does. Returns one output each, in order.

        chat_template: a Jinja template (or the name of one of the checkpoint's) instead of the checkpoint's own.
        continue_final_message: leave the final message open for the model to continue (with
        add_generation_prompt=False). tools: JSON schemas the template renders into the prompt; tool calls in the
        output are not parsed."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files, so no chat template: use generate")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a conversation (a non-empty list of message dicts) or a list of them")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of JSON-schema dicts ({'type': 'function', 'function': {...}}); "
                             "a Python function can be converted with transformers.utils.get_json_schema")
        kwargs = {"chat_template": chat_template, "add_generation_prompt": add_generation_prompt,
                  "continue_final_message": continue_final_message, "tools": tools,
                  **(chat_template_kwargs or {})}  # which win, as in vLLM
        prompts = [self._chat_prompt(i, c, kwargs) for i, c in enumerate(conversations)]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _chat_prompt(self, index: int, conversation, kwargs: dict) -> dict:
        if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
            raise ValueError(f"conversation {index}: must be a list of message dicts, got {conversation!r:.80}")
        try:
            text = self.tokenizer.apply_chat_template(openai_messages(conversation), **kwargs)
        except CHAT_TEMPLATE_ERRORS as e:
            raise ValueError(f"conversation {index}: the chat template could not render it: {e}") from None
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search` (see `engine/beam_search.py`): prompts as `generate` takes them; one output each,
        its best `beam_width` beams best first. A beam's `tokens` and `text` (as vLLM's) include the prompt's."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        prompts = [prompts] if isinstance(prompts, (str, dict)) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a prompt or a non-empty list of prompts")
        searches = []
        for i, prompt in enumerate(prompts):  # each round must fit the context: a prompt's rounds stop at its end
            try:
                _, ids, rounds = self.engine.validate(
                    prompt, dataclasses.replace(params.round_params(), max_tokens=params.max_tokens))
            except (ValueError, MemoryError) as error:
                raise type(error)(f"prompt {i}: {error}") from None
            searches.append(BeamSearch(ids, params, self.engine.eos_ids, rounds))
        salts = [p.get("cache_salt") if isinstance(p, dict) else None for p in prompts]
        with tqdm(total=params.max_tokens, desc="beam search", unit="round", disable=not use_tqdm) as bar:
            while live := [round_prompt(beam, salt) for search, salt in zip(searches, salts) for beam in search.live]:
                outputs = iter(self.generate(live, params.round_params(), use_tqdm=False))
                for search in searches:
                    if search.live:
                        search.advance([next(outputs).outputs[0] for _ in search.live])
                bar.update(1)
        results = [BeamSearchOutput(search.best()) for search in searches]
        for beam in (beam for result in results for beam in result.sequences):
            beam.text = self.tokenizer.decode(beam.tokens, skip_special_tokens=False) if self.tokenizer else None
        return results

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False (nothing done) while requests are in the engine."""
        return self.engine.reset_prefix_cache()

    def _add_all(self, prompts, params, priority) -> list[str]:
        """Check every request, then queue them in the order given, as vLLM does; returns their ids."""
        checked = []
        for i, (prompt, p, rank) in enumerate(zip(prompts, params, priority)):  # check all before queueing any
            try:
                checked.append(self.engine.validate(prompt, p, rank))
            except (ValueError, MemoryError) as error:
                raise type(error)(f"prompt {i}: {error}") from None
        # Tokenized once: the validated ids go in, with their text for the output (and the prompt's cache salt).
        salts = [{"cache_salt": p["cache_salt"]} if isinstance(p, dict) and "cache_salt" in p else {} for p in prompts]
        return [self.engine.add_request({"prompt": text, "prompt_token_ids": ids, **salt}, p, priority=rank,
                                        stream=False)
                for (text, ids, _), p, salt, rank in zip(checked, params, salts, priority)]
