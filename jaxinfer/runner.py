"""Device side of the engine: parameters, the paged KV pool, per-slot state and the jitted step.

One jitted function runs every step (`_step`): an optional prefill chunk
`[1, C]` packing the next tokens of up to `max_prefill_seqs` prompts (E), then
up to `decode_steps` decode steps of every slot
`[B, 1]`. Decode rows read their input token from the device-side `SlotState`,
so the host can plan the next step before reading this one's tokens. Inputs
cross to the device as one packed int32 array and outputs come back as one.

`EngineConfig.control_flow` picks how the step branches on its batch. Dynamic
(CPU): the decode rounds are a `while_loop` whose trip count is data and the
sampler's optional passes are `lax.cond`s, so one executable serves every
batch. Static (GPU, where XLA runs each such loop iteration and `cond` by
copying its predicate to the host and waiting for the device, which would make
every dispatch synchronous): the round count and the sampler's passes are part
of the step's shape key, chosen by the host. A row's arithmetic never depends on
the batch either way.

Static shape keys: the chunk bucket C (0: no prefill), the page-width bucket W
of the block tables, whether prompt logprobs are computed and, when static, the
rounds and `Passes`. `warmup()` compiles every shape the engine can meet (when
static, for greedy and plain random sampling); `warmup_rest()` compiles the
rest (the other samplers, prompt logprobs), in a background thread of the
server; what neither has compiled compiles at first use. Each compile is logged.
`JaxExecutor` adapts this runner to the scheduler's `Executor` seam.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer import distributed
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.engine.request import MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS, MAX_BANNED, MAX_LOGIT_EDITS
from jaxinfer.engine.scheduler import (StepPlan, StepResult, decoding_slots, neutral_sampling, step_buckets,
                                       step_rounds, step_rows)
from jaxinfer.engine.structured import mask_words
from jaxinfer.model.transformer import Batch, KVPool, forward, logits
from jaxinfer.sampling import (MAX_LOGPROBS, LogitEdits, Passes, PenaltyState, SamplingTensors, empty_edits,
                               empty_penalty_state, load_edits_row, load_penalty_row, record_recent, record_tokens,
                               sample, token_logprobs)
from jaxinfer.sharding import logical_sharding
from pallas_kernels.attention import step_attention
from pallas_kernels.kv_storage import storage_dtype

log = logging.getLogger(__name__)

KV_AXES = ("layers", "kv_heads", "page", "page_slot", "head_dim")
PACK = 3 + 2 * MAX_LOGPROBS  # per sampled row: token, rank, logprob, top ids, top logprobs (floats as bits)


def init_kv_pool(cfg: ModelConfig, engine: EngineConfig, mesh) -> KVPool:
    """Zeroed pools [Lg, K, P, Z, H] of the KV cache dtype (or its bits: pallas_kernels/kv_storage.py), sharded
    over KV heads; Lg is a KV cache group's layers (`config.kv_layout`)."""
    shape = (engine.kv_layout(cfg).width, cfg.num_kv_heads, engine.num_pages, engine.page_size, cfg.head_dim)
    sharding = logical_sharding(mesh, KV_AXES)
    storage = storage_dtype(engine.kv_format, mesh.devices.flat[0].platform)
    zeros = jax.jit(lambda: jnp.zeros(shape, storage), out_shardings=sharding)
    return KVPool(zeros(), zeros())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    tokens: jax.Array  # [B] int32: each slot's last sampled token, the input of its next decode step
    penalties: PenaltyState
    edits: LogitEdits  # loaded with the sequences that use them; `uses_edits` says which rows are current


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each input sits in the packed int32 array: (name, shape, dtype) in order; and, for static
    control flow, the decode rounds and sampler passes compiled in (None: chosen on device). A decode-only
    step may compute R < B rows: then `rows` [R] says which slot each row is (B: none). Each row has G block
    tables of W pages, one per KV cache group."""

    fields: tuple[tuple[str, tuple[int, ...], str], ...]
    rounds: int | None = None
    passes: Passes | None = None

    @classmethod
    def build(cls, B: int, W: int, C: int, E: int, prompt_logprobs: bool, rounds: int | None = None,
              passes: Passes | None = None, R: int | None = None, mask_words: int = 0, G: int = 1) -> "Layout":
        f32, i32, u32 = "float32", "int32", "uint32"
        R = B if R is None else R
        fields = [("rows", (R,), i32)] if R < B else []
        fields += [("positions", (R,), i32), ("steps", (R,), i32), ("num_steps", (), i32),
                   ("block_tables", (R, G, W), i32), ("min_tokens_left", (R,), i32), ("banned", (R, MAX_BANNED), i32),
                   ("temperature", (R,), f32), ("top_k", (R,), i32), ("top_p", (R,), f32), ("min_p", (R,), f32),
                   ("presence_penalty", (R,), f32), ("frequency_penalty", (R,), f32),
                   ("repetition_penalty", (R,), f32), ("seed", (R,), u32), ("wants_logprobs", (R,), i32),
                   ("uses_edits", (R,), i32)]
        if C:  # E packed prompts: unused entries have length 0
            fields += [("prefill_tokens", (C,), i32), ("prefill_start", (E,), i32), ("prefill_length", (E,), i32),
                       ("prefill_slot", (E,), i32), ("prefill_sample", (E,), i32)]
        if prompt_logprobs:
            fields += [("next_tokens", (C,), i32)]
        if mask_words:  # some slot samples under a grammar
            fields += [("token_mask", (R, mask_words), i32)]
        return cls(tuple(fields), rounds, passes)

    def shape(self, name: str) -> tuple[int, ...] | None:
        return next((shape for field, shape, _ in self.fields if field == name), None)

    def pack(self, values: dict) -> np.ndarray:
        parts = [np.ascontiguousarray(values[name], dtype).reshape(-1).view(np.int32)
                 for name, _, dtype in self.fields]
        return np.concatenate(parts)

    def unpack(self, packed: jax.Array) -> dict:
        out, offset = {}, 0
        for name, shape, dtype in self.fields:
            size = int(np.prod(shape, dtype=np.int64))
            flat = packed[offset:offset + size]
            if dtype != "int32":
                flat = jax.lax.bitcast_convert_type(flat, jnp.dtype(dtype))
            out[name] = flat.reshape(shape)
            offset += size
        return out


def _pack_sampled(s) -> jax.Array:
    """Sampled fields of R rows -> int32 [R, PACK]."""
    as_bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    return jnp.concatenate([s.tokens[:, None], s.rank[:, None], as_bits(s.logprob)[:, None],
                            s.top_ids, as_bits(s.top_logprobs)], axis=1)


def _sampling(x: dict, banned_now: jax.Array, edits: LogitEdits) -> SamplingTensors:
    names = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed", "wants_logprobs", "uses_edits")
    return SamplingTensors(**{n: x[n] for n in names}, banned=jnp.where(banned_now[:, None], x["banned"], -1),
                           edits=edits)


def _prefill(params, kv, x: dict, cfg, attention, prompt_logprobs: bool):
    """Run the packed chunk into the pool; -> (kv, logits after each prompt's last chunk token [E, V], prompt
    logprobs packed [C, PACK - 1] or None)."""
    C = x["prefill_tokens"].shape[0]
    length = x["prefill_length"]
    ends = jnp.cumsum(length)
    index = jnp.arange(C)
    rows = jnp.minimum(jnp.searchsorted(ends, index, side="right"), length.shape[0] - 1)  # [C] its prompt
    offset = index - (ends - length)[rows]
    positions = jnp.where(index < ends[-1], x["prefill_start"][rows] + offset, -1)
    tables = x["block_tables"][x["prefill_slot"]]  # [E, G, W]
    batch = Batch(x["prefill_tokens"][None], positions[None], tables, rows[None])
    h, kv = forward(params, cfg, batch, kv, attention)
    prompt = None
    if prompt_logprobs:
        lp, rank, top_ids, top_lps = token_logprobs(logits(params, cfg, h[0]), x["next_tokens"])
        as_bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
        prompt = jnp.concatenate([rank[:, None], as_bits(lp)[:, None], top_ids, as_bits(top_lps)], axis=1)
    return kv, logits(params, cfg, h[0, jnp.maximum(ends - 1, 0)]), prompt


def _decode(params, kv, state: SlotState, x: dict, cfg, attention, layout: Layout, max_steps: int, prefill_logits):
    """`num_steps` rounds (`layout.rounds` if static) of decoding every slot (slot b decodes in the first
    `steps[b]` of them); in round 0 the slots whose prompt chunk ended sample from `prefill_logits` [E, V]
    instead (one compiled sampler for both). With `rows`, only those slots' state is read and written back.
    -> int32 [S, R, PACK]."""
    whole = state
    if "rows" in x:
        state = jax.tree.map(lambda a: jnp.take(a, x["rows"], axis=0, mode="fill", fill_value=0), state)
    B = state.tokens.shape[0]
    takes_prefill, prefill_position = jnp.zeros(B, bool), jnp.zeros(B, jnp.int32)
    if prefill_logits is not None:
        sampled_slot = jnp.where((x["prefill_sample"] > 0) & (x["prefill_length"] > 0), x["prefill_slot"], B)
        takes_prefill = takes_prefill.at[sampled_slot].set(True, mode="drop")
        prefill_position = prefill_position.at[sampled_slot].set(x["prefill_start"] + x["prefill_length"],
                                                                 mode="drop")

    def body(carry):
        i, kv, state, out = carry
        active = i < x["steps"]
        positions = jnp.where(active, x["positions"] + i, -1)
        batch = Batch(state.tokens[:, None], positions[:, None], x["block_tables"])
        h, kv = forward(params, cfg, batch, kv, attention)
        step_logits = logits(params, cfg, h[:, 0])
        from_prefill = takes_prefill & (i == 0)
        if prefill_logits is not None:
            target = jnp.where(i == 0, sampled_slot, B)
            step_logits = step_logits.at[target].set(prefill_logits, mode="drop")
        if "token_mask" in x:
            step_logits = _grammar_mask(step_logits, x["token_mask"], i)
        sample_positions = jnp.where(from_prefill, prefill_position, positions + 1)
        s = sample(step_logits, _sampling(x, i < x["min_tokens_left"], state.edits), sample_positions,
                   state.penalties, layout.passes)
        sampled = active | from_prefill
        state = SlotState(jnp.where(sampled, s.tokens, state.tokens), record_tokens(state.penalties, s.tokens, sampled),
                          record_recent(state.edits, s.tokens, sampled))
        return i + 1, kv, state, out.at[i].set(_pack_sampled(s))

    out = jnp.zeros((max_steps, B, PACK), jnp.int32)
    carry = (0, kv, state, out)
    if layout.rounds is None:
        carry = jax.lax.while_loop(lambda c: c[0] < x["num_steps"], body, carry)
    else:  # a trip count XLA knows: the loop runs without a device-to-host sync per round
        carry = jax.lax.fori_loop(0, layout.rounds, lambda _, c: body(c), carry)
    _, kv, state, out = carry
    if "rows" in x:
        state = jax.tree.map(lambda a, r: a.at[x["rows"]].set(r, mode="drop"), whole, state)
    return kv, state, out


def _grammar_mask(step_logits: jax.Array, mask: jax.Array, i) -> jax.Array:
    """In round 0 (a row under a grammar decodes one token a dispatch), -inf for each token whose bit in the row's
    bitmask [R, ceil(V / 32)] is clear."""
    vocab = jnp.arange(step_logits.shape[-1])
    allowed = (mask[:, vocab // 32] >> (vocab % 32)) & 1
    return jnp.where((allowed != 0) | (i > 0), step_logits, -jnp.inf)


def _shard_step(params, kv: KVPool, state: SlotState, packed, *, cfg: ModelConfig, attention, layout: Layout,
                max_steps: int):
    """One data shard's step on its own slots and pages: packed [1, n] -> ([1, m]: sampled rows [S, B, PACK],
    then the prompt logprobs [C, PACK - 1] if asked; kv; state)."""
    x = layout.unpack(packed[0])
    prefill_logits, parts = None, []
    if layout.shape("prefill_tokens"):
        kv, prefill_logits, prompt = _prefill(params, kv, x, cfg, attention, layout.shape("next_tokens") is not None)
        if prompt is not None:
            parts.append(prompt.reshape(-1))
    kv, state, rows = _decode(params, kv, state, x, cfg, attention, layout, max_steps, prefill_logits)
    return jnp.concatenate([rows.reshape(-1)] + parts)[None], kv, state


def _step(params, kv: KVPool, state: SlotState, packed, *, cfg: ModelConfig, backend: str, layout: Layout,
          max_steps: int, mesh):
    """Every data shard's step at once: packed [D, n] -> ([D, m], kv, state). The 'data' axis is manual (each
    shard indexes its own slice of the slots and of the page pool with local page ids); the 'model' axis is
    left to XLA's partitioner (tensor parallelism from the weights' and pool's shardings)."""
    body = functools.partial(_shard_step, cfg=cfg, attention=step_attention(backend, mesh), layout=layout,
                             max_steps=max_steps)
    data = P("data")
    kv_spec = KVPool(P(None, None, "data"), P(None, None, "data"))
    state_spec = SlotState(data, PenaltyState(data, data), LogitEdits(*[data] * 5))
    out, kv, state = jax.shard_map(body, mesh=mesh, in_specs=(P(), kv_spec, state_spec, data),
                                   out_specs=(data, kv_spec, state_spec), axis_names={"data"}, check_vma=False)(
        params, kv, state, packed)
    # Whole on every device, so process 0 can read every shard's tokens (a few KB); the state keeps the
    # placement it came with, which the next step was compiled for.
    keep = jax.lax.with_sharding_constraint
    kv = KVPool(*(keep(pool, logical_sharding(mesh, KV_AXES)) for pool in (kv.k, kv.v)))
    by_slot = NamedSharding(mesh, P("data"))
    state = jax.tree.map(lambda x: keep(x, by_slot), state)
    return keep(out, NamedSharding(mesh, P())), kv, state


def _own_jit(fn, **jit_kwargs):
    """`jax.jit` of a function object of its own: jax's trace and compile caches, keyed on the function, then
    live and die with whoever holds the result. A module-level jit keeps every executable it ever compiled,
    for every model this process loaded (tests and benchmarks load dozens: see SHARED_EXECUTABLES)."""
    return jax.jit(functools.wraps(fn)(functools.partial(fn)), **jit_kwargs)


def _score(params, kv: KVPool, batch: Batch, *, cfg: ModelConfig, backend: str):
    """Float32 logits of every position [B, T, V] (tests compare them with Hugging Face)."""
    h, kv = forward(params, cfg, batch, kv, step_attention(backend))
    return logits(params, cfg, h), kv


@functools.partial(jax.jit, donate_argnames=("state",))
def _load_penalties(state: SlotState, slot, prompt_mask, counts) -> SlotState:
    return SlotState(state.tokens, load_penalty_row(state.penalties, slot, prompt_mask, counts), state.edits)


# One slot's `LogitEdits` as they travel to the device, packed as a step's inputs are.
EDITS_LAYOUT = Layout((("allowed_ids", (MAX_LOGIT_EDITS,), "int32"), ("bias_ids", (MAX_LOGIT_EDITS,), "int32"),
                       ("bias", (MAX_LOGIT_EDITS,), "float32"),
                       ("bad_words", (MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS), "int32"),
                       ("recent", (MAX_BAD_WORD_TOKENS - 1,), "int32")))


def edits_payload(seq) -> np.ndarray:
    """A sequence's allowed ids, biases, bad words and last generated tokens, packed (`EDITS_LAYOUT`)."""
    params = seq.params
    rows = {name: np.full(shape, -1 if dtype == "int32" else 0, dtype) for name, shape, dtype in EDITS_LAYOUT.fields}
    allowed = params.allowed_token_ids or ()
    rows["allowed_ids"][:len(allowed)] = allowed
    rows["bias_ids"][:len(params.logit_bias)] = list(params.logit_bias)
    rows["bias"][:len(params.logit_bias)] = list(params.logit_bias.values())
    for word, ids in zip(rows["bad_words"], seq.bad_words):
        word[len(word) - len(ids):] = ids
    recent = seq.output_ids[-(MAX_BAD_WORD_TOKENS - 1):]
    rows["recent"][len(rows["recent"]) - len(recent):] = recent
    return EDITS_LAYOUT.pack(rows)


@functools.partial(jax.jit, donate_argnames=("state",))
def _load_edits(state: SlotState, slot, payload) -> SlotState:
    """payload: `edits_payload`'s."""
    one = LogitEdits(**{name: x[None] for name, x in EDITS_LAYOUT.unpack(payload).items()})
    return SlotState(state.tokens, state.penalties, load_edits_row(state.edits, slot, one))


IDLE_ANNOUNCE_SECONDS = 5.0  # an idle leader's no-op to the other processes, at most this often
# Compiled steps shared by the runners of one process (tests and benchmarks build several engines of the same
# model): those a live runner holds, and the SHARED_EXECUTABLES most recently used besides. Unbounded, a test
# worker that had built 50-odd engines ran out of memory mappings (XLA:CPU maps three regions per kernel, ~600
# a step; vm.max_map_count is 65,530) and crashed inside the next compile.
SHARED_EXECUTABLES = 32
_EXECUTABLES: collections.OrderedDict[tuple, object] = collections.OrderedDict()
_LIVE: weakref.WeakValueDictionary[tuple, object] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()
_COMPILING: dict[tuple, threading.Lock] = {}


class ModelRunner:
    """Owns the device state; `dispatch` takes the host's plan(s) and returns the packed device output.

    With data parallelism (mesh 'data' = D > 1) a step takes one plan per data shard (None for an idle
    shard), each over the shard's B / D slots and local page ids; D = 1 takes a single plan."""

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, params: dict, mesh):
        self.cfg, self.engine, self.params, self.mesh = cfg, engine, params, mesh
        self.kv = init_kv_pool(cfg, engine, mesh)
        self.shards = mesh.shape["data"]
        self.local = engine.shard()  # what one data shard schedules
        B, V = engine.max_slots, cfg.vocab_size
        by_slot = NamedSharding(mesh, P("data"))
        tokens = jax.jit(lambda: jnp.zeros(B, jnp.int32), out_shardings=by_slot)()
        penalties = jax.jit(lambda: empty_penalty_state(B, V), out_shardings=PenaltyState(by_slot, by_slot))()
        edits = jax.jit(lambda: empty_edits(B, MAX_LOGIT_EDITS, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS),
                        out_shardings=LogitEdits(*[by_slot] * 5))()
        self.state = SlotState(tokens, penalties, edits)
        self._score = _own_jit(_score, static_argnames=("cfg", "backend"), donate_argnames=("kv",))
        self._executables: dict[Layout, object] = {}  # the step shapes this runner has used: their compiled steps
        self.page_buckets = engine.width_buckets()
        layout = engine.kv_layout(cfg)
        if engine.kv_groups != layout.windows:  # the scheduler pages by kv_groups, the step by the layout
            raise ValueError(f"the engine's KV cache groups {engine.kv_groups} are not this model's "
                             f"{layout.windows}: resolve the EngineConfig against the model")
        self.groups = layout.num_groups  # G: block tables per row
        self.compile_seconds = 0.0
        self._last_announced = time.monotonic()

    @property
    def num_compiles(self) -> int:
        """Step shapes this runner has compiled or reused."""
        return len(self._executables)

    @property
    def layouts(self) -> set[Layout]:
        """The step shapes this runner has compiled or reused."""
        return set(self._executables)

    def _executable(self, layout: Layout):
        """The compiled step for `layout`: this runner's own, else one another runner of the same model, pool
        and mesh compiled in this process (see SHARED_EXECUTABLES), else compiled now."""
        if layout in self._executables:
            return self._executables[layout]
        key = (layout, self.engine.decode_steps, self.cfg, self.engine.attention_backend, self.engine.dtype,
               self.kv.k.shape, self.kv.k.dtype, self.mesh.shape_tuple, tuple(self.mesh.device_ids.flat))
        with _COMPILING.setdefault(key, threading.Lock()):  # one compile per shape, whichever thread asks
            with _SHARED_LOCK:
                executable = _EXECUTABLES.get(key) or _LIVE.get(key)
            if executable is None:
                executable = self._compile(layout)
            with _SHARED_LOCK:
                _LIVE[key] = _EXECUTABLES[key] = executable
                _EXECUTABLES.move_to_end(key)
                while len(_EXECUTABLES) > SHARED_EXECUTABLES:
                    _EXECUTABLES.popitem(last=False)
        self._executables[layout] = executable
        return executable

    def lower(self, layout: Layout, platforms: tuple[str, ...] | None = None):
        """The step for `layout` lowered for this runner's devices, or for `platforms` (("cuda",): what a GPU
        would compile, from any machine; tests check the kernels' Triton lowering that way)."""
        width = sum(int(np.prod(shape)) for _, shape, _ in layout.fields)
        packed = jax.ShapeDtypeStruct((self.shards, width), jnp.int32, sharding=NamedSharding(self.mesh, P("data")))
        step = _own_jit(_step, static_argnames=("cfg", "backend", "layout", "max_steps", "mesh"),
                        donate_argnames=("kv", "state"))
        traced = step.trace(self.params, self.kv, self.state, packed, cfg=self.cfg,
                            backend=self.engine.attention_backend, layout=layout,
                            max_steps=self.engine.decode_steps, mesh=self.mesh)
        return traced.lower() if platforms is None else traced.lower(lowering_platforms=platforms)

    def _compile(self, layout: Layout):
        start = time.perf_counter()
        executable = self.lower(layout).compile()
        took = time.perf_counter() - start
        self.compile_seconds += took
        log.info("compiled the step for %s in %.2fs (%d shapes this runner, %.1fs compiling in all)",
                 _describe(layout), took, len(self._executables) + 1, self.compile_seconds)
        return executable

    def _plans(self, plan) -> list[StepPlan | None]:
        return list(plan) if isinstance(plan, (list, tuple)) else [plan]

    def layout_for(self, plan) -> Layout:
        """The one step shape every shard's plan fits: the widest block table, the longest chunk."""
        plans = [p for p in self._plans(plan) if p is not None]
        C, W = step_buckets(self.engine, plans)
        R = step_rows(self.engine, plans, C)
        scored = any(chunk.next_tokens is not None for p in plans for chunk in p.prefills)
        rounds = passes = None
        masked = any(p.token_mask is not None for p in plans)
        if masked:
            R = self.local.max_slots  # a grammar's steps take every row: fewer shapes to compile
        if self.engine.control_flow == "static":
            num_steps = max(p.num_steps for p in plans)  # a grammar's rows decode one token a dispatch: when no
            #                                              shard's plan has more, the step runs one round
            rounds = num_steps if masked and num_steps <= 1 else step_rounds(self.engine, C, num_steps)
            rows = {name: np.concatenate([p.sampling[name] for p in plans]) for name in plans[0].sampling}
            passes = Passes.needed(rows, self.cfg.vocab_size) if rounds else Passes()
        return Layout.build(self.local.max_slots, W, C, self.local.max_prefill_seqs, scored, rounds, passes, R,
                            mask_words(self.cfg.vocab_size) if masked else 0, self.groups)

    def _values(self, plan: StepPlan | None, layout: Layout) -> dict:
        """One shard's inputs for `layout`; an idle shard (None) decodes nothing and prefills no tokens."""
        B, W = self.local.max_slots, layout.shape("block_tables")[2]
        plan = plan or _idle_plan(B, W, self.groups)
        values = _slot_values(plan, W)
        if layout.shape("rows") is not None:  # the decoding slots' rows, then idle rows (slot B: none)
            rows = decoding_slots(plan, B, layout.shape("rows")[0])
            idle = _slot_values(_idle_plan(1, W, self.groups), W)
            values = {name: np.concatenate([value, idle[name]])[rows] for name, value in values.items()}
            values["rows"] = rows
        values["num_steps"] = plan.num_steps
        if layout.shape("token_mask") is not None:
            everything = np.full(layout.shape("token_mask"), -1, np.int32)
            values["token_mask"] = everything if plan.token_mask is None else plan.token_mask
        C = (layout.shape("prefill_tokens") or (0,))[0]
        if C:
            E = layout.shape("prefill_slot")[0]
            chunks = plan.prefills
            per_prompt = {name: np.zeros(E, np.int32) for name in ("start", "length", "slot", "sample")}
            for e, chunk in enumerate(chunks):
                for name, value in zip(per_prompt, (chunk.start, len(chunk.tokens), chunk.slot, chunk.sample)):
                    per_prompt[name][e] = value
            values.update({f"prefill_{name}": row for name, row in per_prompt.items()})
            values["prefill_tokens"] = _packed([chunk.tokens for chunk in chunks], C)
            if layout.shape("next_tokens") is not None:
                values["next_tokens"] = _packed([chunk.next_tokens if chunk.next_tokens is not None
                                                 else np.zeros(len(chunk.tokens), np.int32) for chunk in chunks], C)
        return values

    def dispatch(self, plan, layout: Layout | None = None) -> jax.Array:
        """Start the step (in `layout`, by default `layout_for(plan)`); returns the packed output [D, m] (its
        copy to the host already started). With several processes, the others are told first
        (`distributed.announce`) and make the same call."""
        plans = self._plans(plan)
        layout = layout or self.layout_for(plans)
        for shard, p in enumerate(plans):
            for chunk in p.prefills if p is not None else []:
                if chunk.load_rows:
                    self._load_rows(shard * self.local.max_slots + chunk.slot, p.seqs[chunk.slot])
        packed = np.stack([layout.pack(self._values(p, layout)) for p in plans])
        distributed.announce(distributed.STEP, step_fields(layout), packed)
        return self._run(layout, packed)

    def _run(self, layout: Layout, packed: np.ndarray) -> jax.Array:
        inputs = _global(packed, NamedSharding(self.mesh, P("data")))
        out, self.kv, self.state = self._executable(layout)(self.params, self.kv, self.state, inputs)
        out.copy_to_host_async()
        return out

    def idle(self) -> None:
        """The engine has nothing to run: keep the other processes' collectives from timing out."""
        if time.monotonic() - self._last_announced > IDLE_ANNOUNCE_SECONDS:
            distributed.announce(distributed.NOOP)
            self._last_announced = time.monotonic()

    def close(self) -> None:
        """Release the other processes from `follow` (process 0, at shutdown)."""
        distributed.announce(distributed.STOP)

    def replay_step(self, fields: np.ndarray, payload: np.ndarray) -> None:
        """A step process 0 announced (processes other than 0)."""
        self._run(self.layout_from(fields), payload.reshape(self.shards, -1))

    def layout_from(self, fields) -> Layout:
        """The layout `step_fields` announced."""
        W, C, scored, rounds, passes, R, words = (int(f) for f in fields[:7])
        static = (None, None) if rounds < 0 else (rounds, Passes.from_code(passes))
        return Layout.build(self.local.max_slots, W, C, self.local.max_prefill_seqs, bool(scored), *static, R, words,
                            self.groups)

    def score(self, tokens: np.ndarray, start: int, block_table: np.ndarray) -> np.ndarray:
        """Write one chunk (positions start..start+len) into the given pages of data shard 0 ([P], or [G, P]: a
        table per KV cache group, no page in two); -> logits [len, V]."""
        table = np.asarray(block_table, np.int32)
        table = table.reshape(-1, table.shape[-1])
        if len(table) != self.groups:
            raise ValueError(f"score takes a block table per KV cache group ({self.groups}), got {len(table)}")
        batch = Batch(jnp.asarray(tokens, jnp.int32)[None], jnp.arange(start, start + len(tokens))[None],
                      jnp.asarray(table)[None])
        out, self.kv = self._score(self.params, self.kv, batch, cfg=self.cfg, backend=self.engine.attention_backend)
        return np.asarray(out[0])

    def _load_rows(self, slot: int, seq) -> None:
        """A newly admitted sequence's device rows, those its sampling uses (other rows ignore stale ones)."""
        if seq.params.uses_penalties:
            self._load_penalties(slot, seq)
        if seq.params.uses_edits:
            self._load_edits(slot, seq)

    def _load_penalties(self, slot: int, seq) -> None:
        V = self.cfg.vocab_size
        mask = np.zeros(V, np.int32)
        mask[seq.prompt_ids] = 1
        counts = np.bincount(np.asarray(seq.output_ids, np.int64), minlength=V).astype(np.int32)
        distributed.announce(distributed.PENALTIES, (slot,), np.concatenate([mask, counts]))
        self._set_penalties(slot, mask, counts)

    def _set_penalties(self, slot: int, mask: np.ndarray, counts: np.ndarray) -> None:
        whole = NamedSharding(self.mesh, P())
        self.state = _load_penalties(self.state, _global(np.int32(slot), whole), _global(mask, whole),
                                     _global(counts, whole))

    def replay_penalties(self, fields: np.ndarray, payload: np.ndarray) -> None:
        V = self.cfg.vocab_size
        self._set_penalties(int(fields[0]), payload[:V], payload[V:])

    def _load_edits(self, slot: int, seq) -> None:
        payload = edits_payload(seq)
        distributed.announce(distributed.EDITS, (slot,), payload)
        self.replay_edits((slot,), payload)

    def replay_edits(self, fields, payload: np.ndarray) -> None:
        """Load a slot's `LogitEdits`: process 0 from `_load_edits`, the others as it announced."""
        whole = NamedSharding(self.mesh, P())
        payload = np.asarray(payload, np.int32)
        self.state = _load_edits(self.state, _global(np.int32(int(fields[0])), whole), _global(payload, whole))

    def warmup(self, sampled: bool = True) -> None:
        """Compile every (chunk bucket, page width, decode bucket) a step can meet; prompt-logprob variants,
        and with static control flow the samplers other than greedy and plain random (or other than greedy
        if not `sampled`), are left to `warmup_rest()` or to first use."""
        for layout in self._shapes([Passes(), Passes(draw=True)][:1 + sampled], scored=(False,)):
            self._executable(layout)
        log.info("warm-up: %d executables compiled in %.1fs", self.num_compiles, self.compile_seconds)

    def warmup_rest(self) -> None:
        """Compile what `warmup()` left to first use: prompt logprobs, and with static control flow every
        other sampler (penalties, top-k/top-p/min-p, logprobs) at every shape, the fewest passes first; then
        the steps of structured outputs (a grammar's token mask) for greedy and plain random sampling. Meant
        for a background thread while the engine serves (`jaxinfer serve` starts one): a step whose shape
        is still to come compiles it itself, and one whose shape is compiling waits for that compile only."""
        start, before = time.perf_counter(), self.num_compiles
        static = self.engine.control_flow == "static"
        for passes in Passes.every() if static else [None]:
            for layout in self._shapes([passes], scored=(False, True)):
                self._executable(layout)
        for layout in self._shapes([Passes(), Passes(draw=True)] if static else [None], (False,), masked=True):
            self._executable(layout)
        log.info("background warm-up: %d more executables compiled in %.1fs", self.num_compiles - before,
                 time.perf_counter() - start)

    def _shapes(self, samplers: list, scored: tuple[bool, ...], masked: bool = False):
        """The layouts of every step shape the engine can meet, for the given samplers (`Passes`; static
        control flow) and prompt-logprob flags (chunk steps only); `masked`: those of steps that carry a grammar's
        token mask instead (every row, one round when static: see `layout_for`)."""
        B, Z = self.local.max_slots, self.engine.page_size
        words = mask_words(self.cfg.vocab_size) if masked else 0
        buckets = self.engine.prefill_buckets()
        shortest = dict(zip(buckets, (1,) + tuple(b + 1 for b in buckets)))  # fewest tokens that pad to C
        for C in (0,) + buckets:
            for W in self.page_buckets:
                if C and W * Z < shortest[C] and W != self.page_buckets[-1]:
                    continue  # no chunk padded to C ends this early
                for score in scored if C else (False,):
                    for static in self._static_variants(C, samplers, masked):
                        for R in (self.engine.decode_buckets or (B,)) if not (C or masked) else (B,):
                            yield Layout.build(B, W, C, self.local.max_prefill_seqs, score, *static, R, words,
                                               self.groups)

    def _static_variants(self, C: int, samplers: list, masked: bool = False) -> list[tuple[int | None, Passes | None]]:
        """(rounds, passes) for chunk bucket C: a prefill-only step (no rounds), then each sampler at the
        step's rounds; (None, None) alone with dynamic control flow. A masked step always samples, in one round."""
        if self.engine.control_flow != "static":
            return [(None, None)]
        if masked:
            return [(1, passes) for passes in samplers]
        rounds = 1 if C else self.engine.decode_steps
        return ([(0, Passes())] if C else []) + [(rounds, passes) for passes in samplers]


def _packed(parts: list, size: int) -> np.ndarray:
    """Token rows end to end, zero-padded to `size`."""
    out = np.zeros(size, np.int32)
    joined = np.concatenate(parts) if parts else out[:0]
    out[:len(joined)] = joined
    return out


def _global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value every process holds whole (each process places its own shards)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def step_fields(layout: Layout) -> tuple[int, ...]:
    """What the other processes need to rebuild a step's layout: W, C, prompt logprobs, rounds, passes, R, and the
    words of a grammar's token mask (0: none)."""
    C = (layout.shape("prefill_tokens") or (0,))[0]
    static = (-1, 0) if layout.rounds is None else (layout.rounds, layout.passes.code)
    return (layout.shape("block_tables")[2], C, int(layout.shape("next_tokens") is not None), *static,
            layout.shape("positions")[0], (layout.shape("token_mask") or (0, 0))[1])


def _idle_plan(B: int, W: int, G: int) -> StepPlan:
    """B slots that decode nothing and prefill nothing."""
    return StepPlan(np.full(B, -1, np.int32), np.zeros(B, np.int32), 0, np.zeros((B, G, W), np.int32),
                    neutral_sampling(B), np.zeros(B, np.int32), np.full((B, MAX_BANNED), -1, np.int32), [], {})


def _slot_values(plan: StepPlan, W: int) -> dict:
    """The plan's per-slot inputs [B, ...], block tables cut to W pages."""
    return dict(plan.sampling, positions=plan.positions, steps=plan.steps, block_tables=plan.block_tables[:, :, :W],
                min_tokens_left=plan.min_tokens_left, banned=plan.banned)


def _describe(layout: Layout) -> str:
    C = (layout.shape("prefill_tokens") or (0,))[0]
    extra = " with prompt logprobs" if layout.shape("next_tokens") else ""
    if layout.shape("rows") is not None:
        extra += f", {layout.shape('rows')[0]} rows"
    if layout.shape("token_mask") is not None:
        extra += ", a grammar's token mask"
    if layout.rounds is not None:
        passes = [name for name, on in dataclasses.asdict(layout.passes).items() if on]
        extra += f", {layout.rounds} rounds, sampler passes: {', '.join(passes) or 'none'}"
    return f"chunk {C}, {layout.shape('block_tables')[2]} pages per row{extra}"


def unpack_result(out: np.ndarray, plan: StepPlan, max_steps: int, R: int | None = None) -> StepResult:
    """One shard's packed output of an R-row step (R = B by default) -> its StepResult over every slot."""
    B = len(plan.positions)
    R = B if R is None else R
    rows = out[:max_steps * R * PACK].reshape(max_steps, R, PACK)[:max(plan.num_steps, 1)]
    if R < B:
        slots = decoding_slots(plan, B, R)
        full = np.zeros((rows.shape[0], B + 1, PACK), np.int32)
        full[:, slots] = rows
        rows = full[:, :B]
    as_float = lambda a: np.ascontiguousarray(a).view(np.float32)  # noqa: E731
    result = StepResult(rows[:, :, 0], as_float(rows[:, :, 2]), rows[:, :, 1], rows[:, :, 3:3 + MAX_LOGPROBS],
                        as_float(rows[:, :, 3 + MAX_LOGPROBS:]))
    if any(chunk.next_tokens is not None for chunk in plan.prefills):
        prompt = out[max_steps * B * PACK:].reshape(-1, PACK - 1)[:sum(len(chunk.tokens) for chunk in plan.prefills)]
        result.prompt_logprobs = (as_float(prompt[:, 1]), prompt[:, 0], prompt[:, 2:2 + MAX_LOGPROBS],
                                  as_float(prompt[:, 2 + MAX_LOGPROBS:]))
    return result


class JaxExecutor:
    """The scheduler's `Executor` over a `ModelRunner`: a plan, or with data parallelism a list of them."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def dispatch(self, plan):
        layout = self.runner.layout_for(plan)
        return plan, layout.shape("positions")[0], self.runner.dispatch(plan, layout)

    def idle(self) -> None:
        self.runner.idle()

    def collect(self, handle):
        plan, R, out = handle
        out, steps = np.asarray(out), self.runner.engine.decode_steps
        if not isinstance(plan, list):
            return unpack_result(out[0], plan, steps, R)
        return [unpack_result(row, p, steps, R) if p is not None else None for row, p in zip(out, plan)]
