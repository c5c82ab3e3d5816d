"""The seam between scheduling and execution, and a fake executor whose outputs are computable by hand.

An executor takes a `StepPlan` and returns a `StepResult` in two halves:
`dispatch` starts the step and returns at once (the device works while the host
plans the next step); `collect` waits for it and reads its tokens. Steps run in
dispatch order. Decode rows take their input token from the executor's own
per-slot state (the token the slot sampled last), never from the host.

`FakeExecutor` keeps one token id per KV position in place of keys and values,
and "samples" a hash of everything a slot can read through its block table. A
paging bug (a page owned twice, a cached page overwritten, a wrong prefix hit,
a preempted sequence resumed badly) changes its output, so scheduler tests
compare against `fake_continuation`, computed without any paging at all. With
several KV cache groups, every group's table must show the same tokens over its
window (a sliding group's page freed too early, or reused while read, fails).
Host code only; no JAX.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np

from jaxinfer.engine.scheduler import StepPlan, StepResult


class Executor(Protocol):
    def dispatch(self, plan: StepPlan) -> Any: ...

    def collect(self, handle: Any) -> StepResult: ...


def fake_next_token(context, seed: int, vocab: int, banned=()) -> int:
    """The fake model: a hash of the whole context and the seed, skipping banned ids."""
    digest = hashlib.blake2b(np.asarray(context, np.int64).tobytes() + int(seed).to_bytes(8, "little"),
                             digest_size=8).digest()
    token = int.from_bytes(digest, "little") % vocab
    while token in banned:
        token = (token + 1) % vocab
    return token


def fake_continuation(prompt, n: int, seed: int, vocab: int, stop_ids=(), min_tokens: int = 0,
                      window: int | None = None) -> list[int]:
    """What a request gets from `FakeExecutor` run alone, without paging: up to n tokens, ending early
    at the first stop id once min_tokens tokens exist. `window`: every layer slides, reading its last tokens."""
    tokens, out = list(prompt), []
    while len(out) < n:
        token = fake_next_token(tokens[-window:] if window else tokens, seed, vocab,
                                stop_ids if len(out) < min_tokens else ())
        tokens.append(token)
        out.append(token)
        if token in stop_ids and len(out) >= min_tokens:
            break
    return out


class FakeExecutor:
    def __init__(self, num_pages: int, page_size: int, max_slots: int, vocab: int = 1000,
                 windows: tuple[int | None, ...] = (None,)):
        self.kv = np.full((num_pages, page_size), -1, np.int64)  # the token whose "KV" sits there
        self.slot_tokens = np.full(max_slots, -1, np.int64)
        self.page_size, self.vocab, self.windows = page_size, vocab, windows
        self.dispatched = []  # plans in dispatch order (tests inspect them)

    def _write(self, tables, position: int, token: int) -> None:
        for table in tables:  # [G, P]: every group's layers write the position
            page = table[position // self.page_size]
            assert page != 0, f"position {position} has no page (the null page)"
            self.kv[page, position % self.page_size] = token

    def _next(self, tables, length: int, seed: int, banned) -> int:
        """The token after `length` positions: a hash of what the widest group reads; each group must read the
        same tokens over its own window."""
        widest = None if None in self.windows else max(self.windows)
        seen = max(length - widest, 0) if widest else 0
        context = None
        for table, window in sorted(zip(tables, self.windows), key=lambda tw: -(tw[1] or length)):
            first = max(length - window, 0) if window else 0
            positions = np.arange(first, length)
            visible = self.kv[table[positions // self.page_size], positions % self.page_size]
            assert (visible >= 0).all(), "read a KV position that was never written"
            context = visible if context is None else context
            assert (visible == context[first - seen:]).all(), "a KV cache group reads other tokens than the rest"
        return fake_next_token(context, seed, self.vocab, banned)

    def _banned(self, plan: StepPlan, slot: int, step: int) -> set:
        if step >= plan.min_tokens_left[slot]:
            return set()
        return set(int(t) for t in plan.banned[slot] if t >= 0)

    def dispatch(self, plan: StepPlan) -> StepResult:
        B = len(plan.positions)
        tokens = np.full((max(plan.num_steps, 1), B), -1, np.int32)
        seeds = plan.sampling["seed"]
        for chunk in plan.prefills:
            table = plan.block_tables[chunk.slot]
            for i, token in enumerate(chunk.tokens):
                self._write(table, chunk.start + i, int(token))
            if chunk.sample:
                end = chunk.start + len(chunk.tokens)
                token = self._next(table, end, seeds[chunk.slot], self._banned(plan, chunk.slot, 0))
                tokens[0, chunk.slot] = self.slot_tokens[chunk.slot] = token
        for slot in np.flatnonzero(plan.steps):
            table = plan.block_tables[slot]
            for i in range(plan.steps[slot]):
                position = plan.positions[slot] + i
                self._write(table, position, int(self.slot_tokens[slot]))
                token = self._next(table, position + 1, seeds[slot], self._banned(plan, slot, i))
                tokens[i, slot] = self.slot_tokens[slot] = token
        self.dispatched.append(plan)
        return StepResult(tokens)

    def collect(self, handle: StepResult) -> StepResult:
        return handle


class ShardedFakeExecutor:
    """One FakeExecutor per data shard, for the data-parallel scheduler's plan lists (page ids are local
    to each shard, as on the device)."""

    def __init__(self, shards: list[FakeExecutor]):
        self.shards = shards

    def dispatch(self, plans: list[StepPlan | None]) -> list[StepResult | None]:
        return [shard.dispatch(plan) if plan is not None else None for shard, plan in zip(self.shards, plans)]

    def collect(self, handle: list[StepResult | None]) -> list[StepResult | None]:
        return handle
