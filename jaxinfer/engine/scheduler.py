"""The scheduler: which sequences run in the next step, and with which pages.

Each step carries every decoding slot (one or several tokens each) and the
prefill chunks of up to `max_prefill_seqs` prompts, packed in arrival order
into a budget of `prefill_chunk` tokens, so a long prompt is admitted piece by
piece while running streams keep decoding, and short prompts share a step. The scheduler
plans step N+1 before step N's tokens are read: positions advance by
construction, the device feeds each slot its own last sampled token, and EOS is
found one step late (the surplus token is dropped). Pages come from a
reference-counted allocator with a prefix cache; when they run out, the newest
running sequence is preempted (pages freed, requeued, recomputed later).
Each KV cache group (config.KVLayout) has its own block table over the one
pool: a global group holds a sequence's whole context (its prompt's pages from
admission), a sliding group only its window (pages per chunk, those behind the
window freed as the sequence advances).

Host code only; no JAX. The plan is flat numpy arrays for an `Executor`.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time

import numpy as np

from jaxinfer.config import EngineConfig, bucket
from jaxinfer.engine.pages import NULL_PAGE, PageAllocator, chain_hashes, pages_for
from jaxinfer.engine.request import MAX_BANNED, Sequence, Status

log = logging.getLogger(__name__)

SAMPLING_FIELDS = {  # SamplingParams field -> (row dtype, neutral value)
    "temperature": (np.float32, 0.0), "top_k": (np.int32, 0), "top_p": (np.float32, 1.0),
    "min_p": (np.float32, 0.0), "presence_penalty": (np.float32, 0.0),
    "frequency_penalty": (np.float32, 0.0), "repetition_penalty": (np.float32, 1.0),
}


def neutral_sampling(B: int) -> dict[str, np.ndarray]:
    """Sampling rows that change nothing: greedy, no top-k/p, no penalties, seed 0, no logprobs."""
    rows = {name: np.full(B, neutral, dtype) for name, (dtype, neutral) in SAMPLING_FIELDS.items()}
    rows["seed"] = np.zeros(B, np.uint32)
    rows["wants_logprobs"] = np.zeros(B, np.int32)
    rows["uses_edits"] = np.zeros(B, np.int32)
    return rows


@dataclasses.dataclass
class PrefillChunk:
    slot: int
    tokens: np.ndarray  # [c] int32, positions start .. start + c - 1
    start: int
    sample: bool  # the chunk ends the sequence's known tokens: sample the next one
    next_tokens: np.ndarray | None  # [c] the token after each position, when prompt logprobs are wanted
    load_rows: bool  # the sequence was just admitted: load its device rows (penalty counts, logit edits) it uses


@dataclasses.dataclass
class StepPlan:
    """One dispatch. Rows are slots [B]; only `seqs` stays on the host."""

    positions: np.ndarray  # [B] int32 position of each slot's first decode token; -1: not decoding
    steps: np.ndarray  # [B] int32 decode tokens the slot produces in this dispatch (0: none)
    num_steps: int  # sampling rounds: the largest of `steps`, at least 1 if the prefill samples
    block_tables: np.ndarray  # [B, G, P] int32: a table per KV cache group
    sampling: dict[str, np.ndarray]  # SAMPLING_FIELDS, "seed" (uint32), "wants_logprobs", "uses_edits" (0/1); [B] each
    min_tokens_left: np.ndarray  # [B] int32: `banned` is masked for this many more tokens
    banned: np.ndarray  # [B, MAX_BANNED] int32, -1 padded
    prefills: list[PrefillChunk]  # packed in this order into the step's chunk
    seqs: dict[int, Sequence]  # slot -> sequence producing tokens in this step
    token_mask: np.ndarray | None = None  # [B, ceil(V / 32)] int32 bitmask of the tokens each slot may sample in
    #                                       round 0 (every bit set: any); None: no slot samples under a grammar


@dataclasses.dataclass
class StepResult:
    """Tokens [num_steps, B]: column b holds slot b's decode tokens, or (row 0) the token sampled
    after its prefill chunk. Logprob fields may be None when the executor does not compute them."""

    tokens: np.ndarray
    logprobs: np.ndarray | None = None  # [S, B] float32
    ranks: np.ndarray | None = None  # [S, B] int32
    top_ids: np.ndarray | None = None  # [S, B, MAX_LOGPROBS] int32
    top_logprobs: np.ndarray | None = None  # [S, B, MAX_LOGPROBS] float32
    prompt_logprobs: tuple | None = None  # over the packed chunk's c tokens: (logprob [c], rank [c], top ids [c, k],
    #                                       top logprobs [c, k])


def _held(seq: Sequence) -> bool:
    """The sequence's next token is held to its grammar (it has one, and no thinking comes first any more)."""
    return seq.grammar is not None and seq.grammar.active


def step_buckets(engine: EngineConfig, plans: list[StepPlan]) -> tuple[int, int]:
    """(C, W): the compiled shape these plans (one per data shard) run in: the longest chunk's prefill
    bucket (0: no prefill) and the page-width bucket of the furthest position any of them touches."""
    last, chunks = 0, []
    for p in plans:
        last = max(last, int((p.positions + p.steps - 1).max()))
        for chunk in p.prefills:
            last = max(last, chunk.start + len(chunk.tokens) - 1)
        if p.prefills:
            chunks.append(sum(len(chunk.tokens) for chunk in p.prefills))
    W = bucket(last // engine.page_size + 1, engine.width_buckets())
    return (bucket(max(chunks), engine.prefill_buckets()) if chunks else 0), W


def step_rows(engine: EngineConfig, plans: list[StepPlan], C: int) -> int:
    """R, the rows the step computes: every slot beside a prefill chunk, else the smallest decode bucket that
    holds every shard's decoding slots (compacted to the front by `decoding_slots`)."""
    B = len(plans[0].positions)
    if C or engine.decode_buckets is None:
        return B
    return bucket(max(int((p.steps > 0).sum()) for p in plans), engine.decode_buckets)


def decoding_slots(plan: StepPlan | None, B: int, R: int) -> np.ndarray:
    """[R] the slot each row of an R-row step computes: every slot when R = B, else the decoding slots in
    order, then B (no slot) for the rest."""
    if R == B:
        return np.arange(B, dtype=np.int32)
    rows = np.full(R, B, np.int32)
    live = np.flatnonzero(plan.steps > 0) if plan is not None else []
    rows[:len(live)] = live
    return rows


def step_rounds(engine: EngineConfig, C: int, num_steps: int) -> int:
    """The decode rounds a step of chunk bucket C runs: its plan's `num_steps`, or with static control flow
    the compiled count (none for a chunk that samples nothing, one beside a chunk, else `decode_steps`)."""
    if engine.control_flow != "static":
        return num_steps
    return num_steps if C and num_steps <= 1 else engine.decode_steps


@dataclasses.dataclass
class Counters:
    prompt_tokens: int = 0  # prompt tokens of admitted sequences (first admission only)
    generation_tokens: int = 0
    prefill_tokens_computed: int = 0  # tokens run through prefill (includes recomputation)
    preemptions: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which served from it
    steps: int = 0


class Scheduler:
    def __init__(self, engine: EngineConfig, counters: Counters | None = None, clock=time.monotonic):
        self.cfg = engine
        self.clock = clock  # seconds; the planner's simulation runs this scheduler on a simulated clock
        B, P = engine.max_slots, engine.pages_per_seq
        self.windows = engine.kv_groups  # [G] each KV cache group's window (None: global)
        self._sliding = [group for group, window in enumerate(self.windows) if window is not None]
        self.pages = PageAllocator(engine.num_pages, engine.enable_prefix_caching)
        self.slots: list[Sequence | None] = [None] * B
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.prefilling: Sequence | None = None
        self.counters = counters or Counters()  # data-parallel shards share one set
        self._tables = np.zeros((B, len(self.windows), P), np.int32)
        self._rows = neutral_sampling(B)
        self._banned = np.full((B, MAX_BANNED), -1, np.int32)

    # --- requests in and out -------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_new: int) -> None:
        """Refuse what could never run: the pool must hold the whole sequence alone (but its last sampled
        token, whose KV is never written)."""
        need, capacity = self.cfg.sequence_pages(prompt_len + max_new - 1), self.pages.num_pages - 1
        if need > capacity:
            raise MemoryError(f"a request of {prompt_len} prompt tokens + {max_new} new tokens needs {need} KV "
                              f"pages of {self.cfg.page_size} tokens; the whole pool has {capacity}")

    def add(self, seq: Sequence) -> None:
        self.check_fits(len(seq.prompt_ids), seq.max_new)
        if seq.params.prompt_logprobs is not None and not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # the first prompt token has no logprob (vLLM)
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """End a sequence now (EOS, stop string, length, abort): its pages and slot are free at once."""
        if seq.finished:
            return
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            self._release(seq)
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        seq.finished_at = self.clock()

    def _release(self, seq: Sequence) -> None:
        for pages in reversed(seq.pages):  # global groups' pages are evicted last
            self.pages.free([page for page in pages if page != NULL_PAGE])
        seq.pages, seq.decoding, seq.num_computed = [], False, 0
        if seq is self.prefilling:
            self.prefilling = None
        self.slots[seq.slot] = None
        self._tables[seq.slot] = NULL_PAGE
        for name, neutral in neutral_sampling(1).items():  # an empty slot must not keep a sampler pass running
            self._rows[name][seq.slot] = neutral[0]
        seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.counters.preemptions += 1
        self.add(seq)  # back in arrival order: ahead of every later request

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def awaits_tokens(self) -> bool:
        """A sequence under a grammar has a token in flight: its next mask needs that token, so the step in flight
        should be read before the next is planned (else that sequence sits the next step out)."""
        return any(_held(s) and s.pending for s in self.running)

    def kv_pages(self) -> tuple[int, int]:
        """(pages held by requests, usable pages)."""
        return self.pages.num_used, self.pages.num_pages - 1

    def outstanding_tokens(self) -> int:
        """Tokens still to compute for every sequence here: uncomputed prompt plus tokens left to sample."""
        seqs = self.waiting + self.running
        return sum(max(s.num_known - s.num_computed, 0) + max(s.remaining, 0) for s in seqs)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (call only with nothing running: a running sequence's pages stay named)."""
        self.pages.reset_cache()

    def check_idle(self) -> None:
        """With nothing running: every page is free or cached-idle and every slot is free (tests)."""
        self.pages.check()
        assert all(slot is None for slot in self.slots), "a slot is still taken"
        assert self.pages.num_free == self.pages.num_pages - 1, f"{self.pages.num_used} pages are still in use"

    # --- planning ------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step, or None when nothing can run until in-flight tokens are read."""
        if self.prefilling is not None:  # its next chunk's sliding pages (its prompt's global ones it holds)
            seq = self.prefilling
            self._grow(seq, min(seq.num_known, seq.num_computed + self.cfg.prefill_chunk))
        one = self.prefilling is not None or self._can_admit() or any(_held(s) for s in self.running)
        steps = self._plan_decode(1 if one else self.cfg.decode_steps)
        prefills = self._plan_prefills()
        if not prefills and not steps:
            return None
        return self._build_plan(steps, prefills)

    def _plan_decode(self, k: int) -> dict[int, int]:
        """Decode steps per slot, pages allocated for them; preempts the newest sequences if short."""
        steps = {}
        for seq in sorted(self.running, key=Sequence.sort_key):
            if seq.finished or seq.slot is None or not seq.decoding or seq.remaining <= 0:
                continue
            if _held(seq) and seq.pending:
                continue  # its mask needs the token in flight
            n = min(k, seq.remaining)
            if self._grow(seq, seq.num_computed + n):
                steps[seq.slot] = n
                seq.num_computed += n
                seq.pending += n
        return steps

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages for `num_tokens` positions in every group (freeing first what slid out of a window),
        preempting newer sequences; False if `seq` itself had to be preempted."""
        self._slide(seq)
        missing = self._missing(seq, [num_tokens] * len(self.windows))
        need = sum(missing)
        while not self.pages.can_allocate(need):
            victim = max(self.running, key=Sequence.sort_key)
            self._preempt(victim)
            if victim is seq:
                return False
        self._extend(seq, missing)
        return True

    def _window_start(self, group: int, position: int) -> int:
        """The first page a query at `position` reads in `group` (0 in a global group)."""
        window = self.windows[group]
        return 0 if window is None else max(position - window + 1, 0) // self.cfg.page_size

    def _slide(self, seq: Sequence) -> None:
        """Free the pages of sliding groups that no query from `num_computed` on will read."""
        for group in self._sliding:
            pages = seq.pages[group]
            behind = min(self._window_start(group, seq.num_computed), len(pages))
            if not behind or pages[behind - 1] == NULL_PAGE:  # the null pages lead: nothing new fell behind
                continue
            self.pages.free([page for page in pages[:behind] if page != NULL_PAGE])
            pages[:behind] = [NULL_PAGE] * behind
            self._tables[seq.slot, group, :behind] = NULL_PAGE

    def _missing(self, seq: Sequence, ends: list[int]) -> list[int]:
        """Fresh pages each group needs to hold positions up to `ends[group]` (a sliding group: from its window)."""
        return [max(pages_for(end, self.cfg.page_size) - max(len(pages), self._window_start(g, seq.num_computed)), 0)
                for g, (pages, end) in enumerate(zip(seq.pages, ends))]

    def _extend(self, seq: Sequence, missing: list[int]) -> None:
        """Allocate each group's `missing` pages, after null pages up to its window where it slid past its end."""
        for group, count in enumerate(missing):
            if not count:
                continue
            pages = seq.pages[group]
            first = len(pages)
            pages += [NULL_PAGE] * max(self._window_start(group, seq.num_computed) - first, 0)
            pages += self.pages.allocate(count)
            self._tables[seq.slot, group, first:len(pages)] = pages[first:]

    def _plan_prefills(self) -> list[PrefillChunk]:
        """The unfinished prompt's next chunk, then new admissions in queue order, while the token budget
        and `max_prefill_seqs` allow; only the last chunk can stop short of its prompt's end."""
        chunks, budget = [], self.cfg.prefill_chunk
        while budget > 0 and len(chunks) < self.cfg.prompts_per_step:
            admitted = self.prefilling is None
            seq = self.prefilling or self._admit(budget)
            if seq is None:
                break
            chunks.append(self._chunk(seq, budget, admitted))
            budget -= len(chunks[-1].tokens)
        return chunks

    def _chunk(self, seq: Sequence, budget: int, admitted: bool) -> PrefillChunk:
        start = seq.num_computed
        end = min(seq.num_known, start + budget)
        tokens = np.asarray(seq.all_ids[start:end], np.int32)
        seq.num_computed = end
        self.counters.prefill_tokens_computed += end - start
        self._register_full_pages(seq)
        done = end == seq.num_known
        if done:
            self.prefilling, seq.decoding, seq.pending = None, True, 1
        next_tokens = None
        if seq.params.prompt_logprobs is not None and start + 1 < len(seq.prompt_ids):
            next_tokens = np.zeros(len(tokens), np.int32)
            following = seq.prompt_ids[start + 1:end + 1]
            next_tokens[:len(following)] = following
        return PrefillChunk(seq.slot, tokens, start, done, next_tokens, admitted)

    def _can_admit(self) -> bool:
        """Whether the head of the queue could start its prefill now (ignoring prefix-cache hits): only
        then are decode dispatches cut to one step so its prefill is not kept waiting."""
        if not self.waiting or None not in self.slots or self.waiting[0].pending:
            return False
        known = self.waiting[0].num_known
        first_chunk = min(known, self.cfg.prefill_chunk)
        need = sum(pages_for(known if window is None else first_chunk, self.cfg.page_size) for window in self.windows)
        return self.pages.can_allocate(need + self._headroom())

    def _headroom(self) -> int:
        """Pages kept back at admission: a page per group for each decoding sequence, which may need them soon."""
        return len(self.windows) * sum(1 for s in self.running if s.decoding)

    def _admit(self, budget: int) -> Sequence | None:
        """Take the head of the queue into a free slot if its uncached tokens fit in free pages: every group's
        cached prefix, a global group's pages for the whole prompt, a sliding group's for the first chunk
        (`budget` tokens)."""
        if not self.waiting or None not in self.slots or self.waiting[0].pending:
            return None
        seq = self.waiting[0]
        hashes = self.cache_names(seq)
        hit = self.cache_hit(hashes)
        names = [self._group_names(hashes, g)[self._window_start(g, hit * self.cfg.page_size):hit]
                 for g in range(len(self.windows))]
        end = min(seq.num_known, hit * self.cfg.page_size + budget)
        # Each group holds `hit` pages once matched (null ones before a sliding window): the rest are fresh.
        missing = [max(pages_for(seq.num_known if window is None else end, self.cfg.page_size) - hit, 0)
                   for window in self.windows]
        idle = sum(self.pages.num_idle(group_names) for group_names in names)
        if not self.pages.can_allocate(sum(missing) + self._headroom() + idle):
            return None  # its cached pages were not taken, so their place in the LRU order is unchanged
        self.waiting.pop(0)
        seq.slot = self.slots.index(None)
        self.slots[seq.slot] = seq
        seq.status = Status.RUNNING
        seq.num_computed = hit * self.cfg.page_size
        seq.pages = [[NULL_PAGE] * (hit - len(group_names)) + self.pages.match(group_names) for group_names in names]
        for group, pages in enumerate(seq.pages):
            self._tables[seq.slot, group, :len(pages)] = pages
        self._extend(seq, missing)
        seq.hashes = hashes[:hit]
        self._set_rows(seq)
        self._count_admission(seq, hit)
        self.prefilling = seq
        return seq

    def cache_hit(self, hashes: list[bytes]) -> int:
        """How many leading pages of `hashes` a sequence can take from the cache: the longest prefix every global
        group holds whole, and whose last pages (as many as its window reads) every sliding group holds."""
        hit, runs = len(hashes), {}  # sliding group -> [n]: how many cached pages end at page n - 1
        for group, window in enumerate(self.windows):
            names = self._group_names(hashes, group)
            if window is None:
                hit = min(hit, self.pages.cached_prefix(names))
                continue
            runs[group] = [0]
            for name in names:
                runs[group].append(runs[group][-1] + 1 if self.pages.is_cached(name) else 0)
        while hit and any(run[hit] < hit - self._window_start(g, hit * self.cfg.page_size) for g, run in runs.items()):
            hit -= 1
        return hit

    def _group_names(self, hashes: list[bytes], group: int) -> list[bytes]:
        """Page names in a group: group 0's are the chain's own, the others' suffixed by the group."""
        return hashes if group == 0 else [h + group.to_bytes(2, "little") for h in hashes]

    def cache_names(self, seq: Sequence) -> list[bytes]:
        """Names of the full pages before the last known token (always computed) that a cache hit could serve;
        none when prompt logprobs are wanted, since they need the logits of every prompt position."""
        root = self._hash_root(seq)
        if root is None or seq.params.prompt_logprobs is not None:
            return []
        return chain_hashes(seq.all_ids[:-1], self.cfg.page_size, root)

    def _count_admission(self, seq: Sequence, hit_pages: int) -> None:
        if seq.first_scheduled is not None:
            return  # a resumed sequence: counted when it first arrived
        seq.first_scheduled = self.clock()
        seq.num_cached_tokens = hit_pages * self.cfg.page_size
        self.counters.prompt_tokens += len(seq.prompt_ids)
        if self.pages.caching and seq.params.prompt_logprobs is None:  # a lookup in the prefix cache (vLLM)
            self.counters.prefix_queries += len(seq.prompt_ids)
            self.counters.prefix_hits += seq.num_cached_tokens

    def _set_rows(self, seq: Sequence) -> None:
        for name in SAMPLING_FIELDS:
            self._rows[name][seq.slot] = getattr(seq.params, name)
        self._rows["seed"][seq.slot] = seq.seed
        self._rows["wants_logprobs"][seq.slot] = seq.params.logprobs is not None
        self._rows["uses_edits"][seq.slot] = seq.params.uses_edits
        banned = sorted(seq.stop_ids | set(seq.params.stop_token_ids))[:MAX_BANNED] if seq.params.min_tokens else []
        self._banned[seq.slot] = -1
        self._banned[seq.slot, :len(banned)] = banned

    def _register_full_pages(self, seq: Sequence) -> None:
        """Name every page whose tokens are known and whose KV is (being) computed."""
        limit = min(seq.num_known, seq.num_computed)
        full = limit // self.cfg.page_size
        root = self._hash_root(seq)
        if full <= len(seq.hashes) or root is None:
            return
        parent = seq.hashes[-1] if seq.hashes else root
        start = len(seq.hashes) * self.cfg.page_size
        seq.hashes += chain_hashes(seq.all_ids[start:full * self.cfg.page_size], self.cfg.page_size, parent)
        for group, pages in enumerate(seq.pages):
            names = self._group_names(seq.hashes, group)
            for i in range(start // self.cfg.page_size, full):
                if pages[i] != NULL_PAGE:  # a sliding group may have freed it already
                    self.pages.register(pages[i], names[i])

    def _hash_root(self, seq: Sequence) -> bytes | None:
        """Where the chain of a sequence's page names starts: with the prefix cache on, shared by every request
        of the same cache salt (none: b""); with it off, the request's own, so that only its n > 1 siblings
        share pages; None: no names."""
        if self.pages.caching:
            return b"" if seq.cache_salt is None else b"salt " + seq.cache_salt.encode()
        return f"request {seq.request_id}".encode() if seq.params.n > 1 else None

    def _build_plan(self, steps: dict[int, int], prefills: list[PrefillChunk]) -> StepPlan:
        B = self.cfg.max_slots
        positions, step_counts = np.full(B, -1, np.int32), np.zeros(B, np.int32)
        min_left = np.zeros(B, np.int32)
        for slot, n in steps.items():
            seq = self.slots[slot]
            positions[slot], step_counts[slot] = seq.num_computed - n, n
            min_left[slot] = seq.params.min_tokens - (len(seq.output_ids) + seq.pending - n)
        seqs = {slot: self.slots[slot] for slot in steps}
        for chunk in prefills:
            seq = seqs[chunk.slot] = self.slots[chunk.slot]
            min_left[chunk.slot] = seq.params.min_tokens - len(seq.output_ids)
        rounds = max(max(steps.values(), default=0), int(any(chunk.sample for chunk in prefills)))
        sampling = list(steps) + [chunk.slot for chunk in prefills if chunk.sample]
        return StepPlan(positions, step_counts, rounds, self._tables.copy(),
                        {name: row.copy() for name, row in self._rows.items()}, min_left,
                        self._banned.copy(), prefills, seqs, self._token_mask([seqs[slot] for slot in sampling]))

    def _token_mask(self, sampling: list[Sequence]) -> np.ndarray | None:
        """The bitmask rows of the slots that sample under a grammar (one token each), others all set (also those
        whose grammar waits for the end of a reasoning model's thinking)."""
        guided = [seq for seq in sampling if _held(seq)]
        if not guided:
            return None
        mask = np.full((self.cfg.max_slots, guided[0].grammar.mask_words), -1, np.int32)
        for seq in guided:
            seq.grammar.fill_mask(mask[seq.slot])
        return mask

    # --- results -------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[Sequence]:
        """Read a step's tokens into its sequences; finish those that hit EOS, a stop token or their
        length. Returns the sequences that got tokens or finished (tokens past a finish are dropped)."""
        now = self.clock()
        touched, chunks, offset = [], {}, 0
        for chunk in plan.prefills:
            chunks[chunk.slot] = chunk, offset
            offset += len(chunk.tokens)
        for slot, seq in plan.seqs.items():
            is_prefill = slot in chunks
            if is_prefill:
                chunk, offset = chunks[slot]
                if chunk.next_tokens is not None and result.prompt_logprobs is not None:
                    mine = tuple(a[offset:offset + len(chunk.tokens)] for a in result.prompt_logprobs)
                    self._add_prompt_logprobs(seq, chunk.start, mine)
                if not chunk.sample:
                    continue
            count, known = (1 if is_prefill else int(plan.steps[slot])), len(seq.output_ids)
            for i in range(count):
                seq.pending -= 1
                if not seq.finished and not seq.dropping:
                    self._append(seq, result, i, slot)
            seq.dropping = seq.dropping and seq.pending > 0
            if len(seq.output_ids) > known:
                self._delivered(seq, now)
            touched.append(seq)
        return touched

    @staticmethod
    def _delivered(seq: Sequence, now: float) -> None:
        """Time a step's tokens for a sequence: as in vLLM, one inter-token gap per step that gave it tokens,
        however many it gave (a multi-round dispatch or a stop string's cut does not add gaps of 0)."""
        if seq.first_token is None:
            seq.first_token = now
        else:
            seq.token_gaps.append(now - seq.last_token)
        seq.last_token = now

    @staticmethod
    def _add_prompt_logprobs(seq: Sequence, start: int, chunk: tuple) -> None:
        """Entry j is for prompt token j (entry 0 is None); a recomputed chunk adds nothing twice."""
        logprob, rank, top_ids, top_logprobs = chunk
        k = seq.params.prompt_logprobs
        for i in range(len(logprob)):
            if start + i + 1 == len(seq.prompt_logprobs) < len(seq.prompt_ids):
                seq.prompt_logprobs.append((float(logprob[i]), int(rank[i]), top_ids[i, :k].tolist(),
                                            top_logprobs[i, :k].tolist()))

    def _append(self, seq: Sequence, result: StepResult, row: int, column: int) -> None:
        token = int(result.tokens[row, column])
        seq.output_ids.append(token)
        if result.logprobs is not None and seq.params.logprobs is not None:
            k = seq.params.logprobs
            seq.logprobs.append((float(result.logprobs[row, column]), int(result.ranks[row, column]),
                                 result.top_ids[row, column, :k].tolist(),
                                 result.top_logprobs[row, column, :k].tolist()))
        self.counters.generation_tokens += 1
        if seq.slot is not None:
            self._register_full_pages(seq)
        thinking = seq.grammar is not None and not seq.grammar.active
        if seq.grammar is not None and not self._follow_grammar(seq, token):
            return
        self._check_stop(seq, token)
        if thinking and seq.grammar.active and seq.pending and not seq.finished:
            self._rewind(seq)

    def _rewind(self, seq: Sequence) -> None:
        """The thinking ended with tokens after it already sampled or in flight, unheld by the grammar: drop them
        as they are read, and requeue the sequence (ahead of later requests) to recompute its last tokens from
        the cached pages, so that its next token is sampled under the grammar. Not a preemption."""
        seq.dropping = True
        self._release(seq)
        self.add(seq)

    def _follow_grammar(self, seq: Sequence, token: int) -> bool:
        """Advance the sequence's grammar; False if that finished it: the grammar is complete and the EOS it now
        allows alone could not end the sequence (ignore_eos, or min_tokens not reached), or the token broke it
        (which the mask rules out)."""
        if not seq.grammar.accept(token):
            log.warning("request %s: token %d breaks its structured output; ending it", seq.request_id, token)
        elif not seq.grammar.complete or token in seq.stop_ids or token in seq.params.stop_token_ids:
            return True  # a stop token that completes it: `_check_stop` ends the sequence
        elif seq.stop_ids and len(seq.output_ids) >= seq.params.min_tokens:
            return True  # its EOS comes next
        self.finish(seq, "stop")
        return False

    def _check_stop(self, seq: Sequence, token: int) -> None:
        if len(seq.output_ids) >= seq.params.min_tokens:
            if token in seq.params.stop_token_ids:
                return self.finish(seq, "stop", token)
            if token in seq.stop_ids:
                return self.finish(seq, "stop", None if token == seq.eos_id else token)
        if len(seq.output_ids) >= seq.max_new:
            self.finish(seq, "length")
